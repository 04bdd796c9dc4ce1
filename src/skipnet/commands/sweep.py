"""``skipnet sweep --init SP_CKPT --data SPEC --alphas A ... --out DIR``: the accuracy/cost trade-off over alpha.

Trains hybrid RL (Eq. 5-6) from one supervised-pre-trained checkpoint at each alpha in turn, each a declared
:class:`skipnet.experiments.Run` of ``skipnet train`` into its own run directory ``DIR/alpha_<a>/`` (run by
:class:`skipnet.experiments.Runner`: a rerun resumes unfinished runs and skips finished ones; each run's log is
``DIR/alpha_<a>.log``), then tabulates the test numbers of each run's ``best.pt`` (chosen on validation) with the SP
starting point: ``DIR/sweep.json``, ``DIR/sweep.md`` and ``DIR/tradeoff.png`` (paper appendix Fig. 12).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from skipnet import plots
from skipnet.analysis import eval_point, require_gates
from skipnet.checkpoint import load_checkpoint, load_model
from skipnet.commands._common import add_data_args, add_optim_args
from skipnet.cost import cost_model
from skipnet.errors import SkipnetError
from skipnet.evaluate import data_for_checkpoint, eval_loader, eval_mode_for, run_eval
from skipnet.experiments import Run, Runner
from skipnet.trainconfig import TrainConfig, changed_option, options_set

log = logging.getLogger(__name__)


DOCS = "docs/training.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train hybrid RL at several alphas from one SP checkpoint and tabulate the trade-off",
        description="Train stage hrl from --init at each alpha into OUT/alpha_<a>/ (resumable), evaluate each "
        "best.pt on the test split and write sweep.json, sweep.md and tradeoff.png. Options left unset take "
        "the trainer's HRL defaults (lr 1e-4 constant, 10k iterations on CIFAR).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--init", required=True, help="the supervised-pre-trained (SP) checkpoint every run starts from")
    add_data_args(p)
    p.add_argument("--alphas", type=float, nargs="+", required=True, help="cost weights alpha to train at")
    p.add_argument("--out", required=True, help="parent directory of the run directories alpha_<a>/")
    add_optim_args(p)
    p.add_argument(
        "--val-split", type=float, default=None, help="validation fraction (default: the SP checkpoint's own)"
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=run)


def alpha_dir(out: Path, alpha: float) -> Path:
    return out / f"alpha_{alpha:g}"


def _row(label: str, alpha: float | None, run: str, test: dict[str, Any], **extra: Any) -> dict[str, Any]:
    keys = ("accuracy", "macs_mean", "macs_reduction", "computation_percentage", "images")
    return {"label": label, "alpha": alpha, "run": run} | {k: test.get(k) for k in keys} | extra


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| run | α | test accuracy | MACs/image | MACs reduction | CP | best step | val accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        alpha = "–" if r["alpha"] is None else f"{r['alpha']:g}"
        best = "–" if r.get("best_step") is None else str(r["best_step"])
        val = "–" if r.get("best_val_accuracy") is None else f"{r['best_val_accuracy']:.2f}%"
        lines.append(
            f"| {r['run']} | {alpha} | {r['accuracy']:.2f}% | {r['macs_mean']:.4g} | {r['macs_reduction']:.1f}% "
            f"| {r['computation_percentage']:.1f}% | {best} | {val} |"
        )
    return "\n".join(lines) + "\n"


def train_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The data and optimisation options of ``args`` that differ from their defaults, as ``skipnet train``
    arguments (both commands take the same options, :func:`add_data_args` and :func:`add_optim_args`)."""
    p = argparse.ArgumentParser()
    add_data_args(p)
    add_optim_args(p)
    out: list[str] = []
    for action in p._actions:  # noqa: SLF001 - argparse's only list of an option's flag and default
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in ("help", "data") or value in (None, action.default):
            continue
        flag = action.option_strings[-1]
        out += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]  # noqa: SLF001
    return tuple(out)


def declare(args: argparse.Namespace, arch: str, alphas: list[float], val_split: float) -> list[Run]:
    """One HRL run per alpha from ``--init``, in ``alpha_<a>/``."""
    common = (arch, "--stage", "hrl", "--init", args.init, "--val-split", f"{val_split!r}", *train_args(args))
    return [Run(alpha_dir(Path(), a).name, (*common, "--alpha", f"{a!r}")) for a in alphas]


def trained_rows(runner: Runner, runs: list[Run], alphas: list[float]) -> list[dict[str, Any]]:
    """Each run's row from its ``summary.json``: the trainer's own test evaluation of ``best.pt`` (chosen on
    validation)."""
    rows = []
    for run, a in zip(runs, alphas):
        summary = json.loads((runner.dir(run.name) / "summary.json").read_text())
        test = summary.get("test") or {}
        if not test:
            raise SkipnetError(f"{runner.dir(run.name)} finished without test metrics")
        best = dict(best_step=summary.get("best_step"), best_val_accuracy=summary.get("best_val_accuracy"))
        rows.append(_row(f"α={a:g}", a, run.name, test, **best, checkpoint=str(runner.dir(run.name) / "best.pt")))
    return rows


def _same_file(a: str, b: str) -> bool:
    """Whether two names of ``--init`` are the same file (or files of the same bytes)."""
    pa, pb = Path(a), Path(b)
    if not (pa.is_file() and pb.is_file()):
        return a == b
    return os.path.samefile(pa, pb) or pa.read_bytes() == pb.read_bytes()


def check_same_run(cfg: TrainConfig) -> None:
    """A finished run of an earlier sweep into the same ``--out`` is reused only if this sweep asks for the same
    run (the options ``--resume`` would refuse to change, and its length): one line otherwise."""
    run = Path(cfg.out)
    ckpt = next((run / n for n in ("last.pt", "best.pt") if (run / n).exists()), None)
    if ckpt is None:  # only its summary is left: nothing says how it was trained
        return
    saved = TrainConfig.from_dict(load_checkpoint(ckpt)["train_config"])
    if saved.init and cfg.init and _same_file(saved.init, cfg.init):  # the same checkpoint named another way
        cfg = replace(cfg, init=saved.init)
    changed = changed_option(cfg, saved, options_set(cfg) | {"init", "alpha", "val_split"})
    if changed is not None:
        name, before, value = changed
        raise SkipnetError(
            f"{cfg.out} holds a finished run of other options ({name} {before!r}, not {value!r}); choose another --out"
        )

    def length(c: TrainConfig) -> str:
        return f"--iters {c.iters}" if c.iters is not None else f"--epochs {c.epochs:g}"

    if (cfg.epochs, cfg.iters) != (None, None) and (cfg.epochs, cfg.iters) != (saved.epochs, saved.iters):
        raise SkipnetError(
            f"{cfg.out} finished with {length(saved)}, not {length(cfg)}; a sweep of another length trains other "
            "runs: choose another --out"
        )


def run(args: argparse.Namespace) -> int:
    from skipnet.device import pick_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    alphas = sorted(set(args.alphas))
    if any(a < 0 for a in alphas):
        raise SkipnetError("--alphas must be >= 0")
    sp_model, sp_ckpt = load_model(args.init, map_location="cpu")
    require_gates(sp_model, "sweep")
    arch = sp_ckpt["arch"]["name"]
    val_split = args.val_split
    if val_split is None:
        val_split = float(sp_ckpt.get("data", {}).get("val_split", 0.1) or 0.0)
    out = Path(args.out)
    common = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    common |= {"arch": arch, "stage": "hrl", "init": args.init, "val_split": val_split, "resume": True}
    for a in alphas:  # a bad option is refused here, in one line, before any run starts
        TrainConfig(**(common | {"alpha": a, "out": str(alpha_dir(out, a))})).validate()
    runs = declare(args, arch, alphas, val_split)
    runner = Runner(out, args.data)
    for r, a in zip(runs, alphas, strict=True):  # an unfinished run refuses other options itself (--resume)
        if runner.finished(r):
            check_same_run(TrainConfig(**(common | {"alpha": a, "out": str(alpha_dir(out, a))})))
    runner.train(runs)  # resumes an unfinished run, skips a finished one
    rows = trained_rows(runner, runs, alphas)

    # The SP starting point on the same test images, as a reference.
    device = pick_device(args.device)
    data = data_for_checkpoint(
        sp_ckpt, sp_model, args.data, data_dir=args.data_dir, download=args.download, limit=args.limit_test
    )
    sp_model.to(device).to(memory_format=torch.channels_last)
    cost = cost_model(sp_model)
    rec = run_eval(sp_model, eval_loader(data, "test"), cost, mode=eval_mode_for(sp_model))  # as it was trained
    sp_point = eval_point(rec, cost, sp_model.config.num_classes)
    sp_row = _row("SP (start)", None, "init", sp_point, checkpoint=args.init)

    table = [sp_row, *rows]
    result = {"init": args.init, "arch": arch, "data": args.data, "macs_all_on": cost.total_macs_all_on, "rows": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    (out / "sweep.md").write_text(markdown_table(table, f"Hybrid-RL sweep over α from {args.init} ({arch})"))
    plots.plot_tradeoff(
        out / "tradeoff.png",
        macs_all_on=cost.total_macs_all_on,
        own=sp_point,
        own_label="SP starting point",
        others=[(r["label"], r) for r in rows],
        connect_others=True,
        title=f"Accuracy vs computation over α, {arch} (test split)",
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(markdown_table(table, f"sweep of {arch} from {args.init}").split("\n", 2)[2], end="")
    print(f"wrote {out / 'sweep.json'}, sweep.md and tradeoff.png")
    return 0
