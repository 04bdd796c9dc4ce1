"""``skipnet sweep --init SP_CKPT --data SPEC --alphas A ... --out DIR``: the accuracy/cost trade-off over alpha.

Trains hybrid RL (Eq. 5-6) from one supervised-pre-trained checkpoint at each alpha in turn, each a declared
:class:`skipnet.experiments.Run` of ``skipnet train`` into its own run directory ``DIR/alpha_<a>/`` (run by
:class:`skipnet.experiments.Runner`: a rerun resumes unfinished runs and skips finished ones; each run's log is
``DIR/alpha_<a>.log``), then tabulates the test numbers of each run's ``best.pt`` (chosen on validation) with the SP
starting point: ``DIR/sweep.json``, ``DIR/sweep.md`` and ``DIR/tradeoff.png`` (paper appendix Fig. 12), each written
atomically.

Every run trains and is evaluated at the greedy threshold of ``--init`` (a calibrated checkpoint's own), the
threshold of the starting point's row. ``DIR/sweep-runs.json`` records, before any run starts, the SHA-256 of the
``--init`` file each run was declared from: a rerun reuses (or resumes) a run only if ``--init`` still has those
contents, every option that can change its numbers is the run's (an option left at its default included; threads,
workers, logging and the device may differ) and ``--data`` holds the data it was trained and tested on (another path
of it is fine: the split sizes and labels the run recorded are compared); otherwise one line, before anything
trains. The start row's data is checked as ``skipnet eval`` checks it (channels, image size, classes of ``--init``).
``DIR`` holds only what a sweep writes; anything else there (a user's file, a training run) is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from skipnet.analysis import eval_point
from skipnet.checkpoint import data_record, load_checkpoint, load_model, require_same_classes
from skipnet.commands._common import add_data_args, add_optim_args, check_out, require_learned_gates
from skipnet.cost import cost_model
from skipnet.distributed import DistContext
from skipnet.errors import SkipnetError, check_value
from skipnet.evaluate import data_for_checkpoint, eval_loader, eval_mode_for, run_eval
from skipnet.experiments import Run, Runner, literal
from skipnet.fileio import atomic_write, json_text
from skipnet.registry import get_config
from skipnet.rundir import BEST, LAST, SUMMARY, data_fingerprint, describe_difference
from skipnet.runsetup import load_run_data
from skipnet.trainconfig import RESUME_MAY_CHANGE, TrainConfig, default_batch_size, resolve_defaults

log = logging.getLogger(__name__)


DOCS = "docs/training.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train hybrid RL at several alphas from one SP checkpoint and tabulate the trade-off",
        description="Train stage hrl from --init at each alpha into OUT/alpha_<a>/ (resumable), evaluate each "
        "best.pt on the test split and write sweep.json, sweep.md and tradeoff.png. Options left unset take "
        "the trainer's HRL defaults (lr 1e-4 constant, 10k iterations on CIFAR).",
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


# ------------------------------------------------------------------------------------------ what --out may hold
RECORD = "sweep-runs.json"  # per run: the --init it was declared from, and the SHA-256 of that file's contents
PNG = b"\x89PNG\r\n\x1a\n"


def _json_with(key: str) -> Callable[[bytes], bool]:
    def test(data: bytes) -> bool:
        obj = json.loads(data.decode())
        return isinstance(obj, dict) and key in obj

    return test


# The files a sweep writes in --out, each with how to tell an existing one of that name is a sweep's own.
SUMMARIES: dict[str, Callable[[bytes], bool]] = {
    "sweep.json": _json_with("rows"),
    "sweep.md": lambda data: data.startswith(b"# Hybrid-RL sweep over"),
    "tradeoff.png": lambda data: data.startswith(PNG),
    RECORD: _json_with("runs"),
}


def _is_ours(entry: Path) -> bool:
    """Whether ``entry`` of ``--out`` is a sweep's: a summary (by its contents), a run directory ``alpha_<a>/`` or
    its log ``alpha_<a>.log``, or a temporary file an interrupted atomic write of a summary left."""
    name = entry.name
    if entry.is_symlink():  # writing through it would change its target
        return False
    if name in SUMMARIES:
        if not entry.is_file():  # a directory, a FIFO ...: not what a sweep writes (and not to be opened)
            return False
        try:
            with open(entry, "rb") as f:
                return SUMMARIES[name](f.read(1 << 20))
        except (OSError, ValueError):
            return False
    stem = name.removesuffix(".log")
    if stem.startswith("alpha_"):
        try:
            float(stem.removeprefix("alpha_"))
        except ValueError:
            return False
        return entry.is_file() if name.endswith(".log") else entry.is_dir()
    return name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in SUMMARIES)


def checked_out(value: str) -> Path:
    """``--out`` as a directory a sweep may write: a writable path, not a file, holding only what a sweep wrote (a
    user's ``sweep.md`` or a training run's files would be overwritten or mixed with the sweep's)."""
    check_out(value)
    out = Path(value)
    if out.exists() and not out.is_dir():
        raise SkipnetError(f"--out {out} is a file; sweep writes a directory of runs, so give a directory name")
    try:
        foreign = [p.name for p in sorted(out.iterdir()) if not _is_ours(p)] if out.exists() else []
    except OSError as exc:
        raise SkipnetError(f"--out {out}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if foreign:
        raise SkipnetError(
            f"--out {out} holds {', '.join(foreign[:3])} that sweep did not write, and a sweep there could overwrite "
            "it; give a new directory or an earlier sweep's"[:300]
        )
    return out


def checked_alphas(values: list[float]) -> list[float]:
    """``--alphas`` sorted, repeats dropped; each >= 0 and each of its own run directory, or one line."""
    alphas = sorted(set(values))
    for a in alphas:
        check_value("alphas", a, lambda v: v >= 0, ">= 0")  # NaN, infinity and beyond float32 too
    names = [alpha_dir(Path(), a).name for a in alphas]
    for a, b, name, other in zip(alphas, alphas[1:], names, names[1:]):
        if name == other:
            raise SkipnetError(
                f"--alphas {a!r} and {b!r} both name the run directory {name} (it keeps 6 significant digits); "
                "give alphas that differ within them"
            )
    return alphas


# ------------------------------------------------------------------------------------------ the start and its runs
def start_threshold(model: Any, ckpt: dict[str, Any], init: str) -> float:
    """The greedy threshold of ``--init``, at which every run trains and is evaluated (as the start row is); refuses,
    as calibrate and analyze do, a checkpoint whose gates were never trained or decide at random."""
    from skipnet.policy import ALL_SKIP_THRESHOLD

    require_learned_gates(model, ckpt, f"--init {init}", "sweep")
    threshold = float(model.threshold)
    if threshold == ALL_SKIP_THRESHOLD:
        raise SkipnetError(
            f"--init {init} is calibrated to skip every gated block (threshold {threshold:g}): hybrid RL has no "
            "route to learn there; give the checkpoint before calibration (or one calibrated to a smaller budget)"
        )
    return threshold


def train_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The data and optimisation options of ``args`` that differ from their defaults, as ``skipnet train``
    arguments (both commands take the same options, :func:`add_data_args` and :func:`add_optim_args`), each value
    passed through literally (:func:`skipnet.experiments.literal`)."""
    p = argparse.ArgumentParser()
    add_data_args(p)
    add_optim_args(p)
    out: list[str] = []
    for action in p._actions:  # noqa: SLF001 - argparse's only list of an option's flag and default
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in ("help", "data") or value in (None, action.default):
            continue
        flag = action.option_strings[-1]
        out += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, literal(str(value))]  # noqa: SLF001
    return tuple(out)


def declare(
    args: argparse.Namespace, arch: str, alphas: list[float], val_split: float, threshold: float = 0.5
) -> list[Run]:
    """One HRL run per alpha from ``--init``, in ``alpha_<a>/``, at ``threshold`` (``--init``'s)."""
    common = (arch, "--stage", "hrl", "--init", literal(args.init), "--val-split", f"{val_split!r}")
    common += ("--threshold", f"{threshold!r}", *train_args(args))
    return [Run(alpha_dir(Path(), a).name, (*common, "--alpha", f"{a!r}")) for a in alphas]


def trained_rows(runner: Runner, runs: list[Run], alphas: list[float]) -> list[dict[str, Any]]:
    """Each run's row from its ``summary.json``: the trainer's own test evaluation of ``best.pt`` (chosen on
    validation)."""
    rows = []
    for run, a in zip(runs, alphas):
        summary = json.loads((runner.dir(run.name) / SUMMARY).read_text())
        test = summary.get("test") or {}
        if not test:
            raise SkipnetError(f"{runner.dir(run.name)} finished without test metrics")
        best = dict(best_step=summary.get("best_step"), best_val_accuracy=summary.get("best_val_accuracy"))
        rows.append(_row(f"α={a:g}", a, run.name, test, **best, checkpoint=str(runner.dir(run.name) / BEST)))
    return rows


# ------------------------------------------------------------------------------------------ reusing earlier runs
def init_digest(init: str) -> str:
    """The SHA-256 of the file ``--init`` names (``pretrained:NAME`` and a save_pretrained directory resolved)."""
    from skipnet.zoo import resolve_checkpoint, sha256_of

    return sha256_of(resolve_checkpoint(init))


def read_record(out: Path) -> dict[str, Any]:
    """The runs of :data:`RECORD` in ``out`` (``{}`` if none): name -> ``{"init", "init_sha256"}``."""
    try:
        runs = json.loads((out / RECORD).read_text()).get("runs")
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in runs.items() if isinstance(v, dict)} if isinstance(runs, dict) else {}


def check_same_init(runner: Runner, runs: list[Run], init: str, digest: str) -> None:
    """A run an earlier sweep into the same ``--out`` trained (a checkpoint or summary there) is reused or resumed
    only if the sweep recorded that it was declared from ``--init`` contents of this ``digest``: one line
    otherwise, before anything trains (the same path may hold another checkpoint now)."""
    record = read_record(runner.out)
    for run in runs:
        where = runner.dir(run.name)
        if not any((where / n).exists() for n in (LAST, BEST, SUMMARY)):
            continue  # nothing trained there yet
        entry = record.get(run.name, {})
        before = entry.get("init_sha256")
        if before == digest:
            continue
        if not isinstance(before, str):
            raise SkipnetError(
                f"{where} holds a run that {runner.out / RECORD} does not tie to the contents of an --init file, so "
                f"it may not come from {init}: choose another --out"
            )
        raise SkipnetError(
            f"{where} was trained from another --init: {entry.get('init')} had SHA-256 {before[:12]}... then, {init} "
            f"has {digest[:12]}... now; a sweep from this file trains other runs: choose another --out"
        )


def write_record(out: Path, runs: list[Run], init: str, digest: str) -> None:
    """Record, before they train, that ``runs`` start from ``--init`` contents of ``digest`` (atomically; the
    entries of other runs kept)."""
    record = read_record(out) | {r.name: {"init": init, "init_sha256": digest} for r in runs}
    try:
        atomic_write(out / RECORD, lambda f: f.write(json_text({"runs": record}, indent=2).encode()))
    except OSError as exc:
        raise SkipnetError(f"--out {out}: cannot write in it ({exc.strerror or type(exc).__name__})") from None


# Options a run of the sweep may have had with other values and still be reused: those that cannot change its
# numbers (threads, workers, logging, the device and the memory layout, which training turns off where the CPU
# kernels would crash; where the data is: its contents are compared instead, :func:`check_same_data`), its length
# (compared apart, :func:`check_same_length`) and ``--init`` (compared by its contents, :func:`check_same_init`).
# Every other option, a default included, must be the run's.
MAY_DIFFER = RESUME_MAY_CHANGE | {"init", "channels_last"}


def saved_run(run: Path) -> tuple[TrainConfig, dict[str, Any]] | None:
    """``(options, checkpoint)`` of the run in ``run`` (its ``last.pt``, else ``best.pt``): the options it ran with,
    its defaults filled in; ``None`` where no checkpoint is left to say how it was trained."""
    path = next((run / n for n in (LAST, BEST) if (run / n).exists()), None)
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    return TrainConfig.from_dict(ckpt["train_config"]), ckpt


def would_train(cfg: TrainConfig, ckpt: dict[str, Any], arch: tuple[str, str, int]) -> TrainConfig:
    """``cfg`` (a new run of the sweep, unset options ``None``) with the values ``skipnet train`` would fill in
    (:func:`~skipnet.trainconfig.resolve_defaults`; ``arch``: family, data set and gated blocks of ``--init``'s
    network), the epoch length, on which ``--eval-every``'s default depends, that of the data the saved run in
    ``ckpt`` recorded (other data is refused apart: :func:`check_same_data`)."""
    family, dataset, gates = arch
    images = (ckpt.get("data_fingerprint") or {}).get("train_images")
    batch = cfg.batch_size or default_batch_size(family)
    steps = images // batch if isinstance(images, int) and images >= batch else None
    resolved = resolve_defaults(cfg, family, dataset, gates, steps or 1)
    if steps is None and cfg.eval_every is None:  # not recorded: no value to compare, the run's is not taken
        resolved.eval_every = None
    return resolved


def other_option(cfg: TrainConfig, resolved: TrainConfig, saved: TrainConfig) -> tuple[str, Any, str] | None:
    """``(option, saved value, new value in words)`` of the first option but :data:`MAY_DIFFER` that the new run
    (``cfg`` as given, ``resolved`` as it would train: an option left unset takes its stage's default) has with
    another value than the ``saved`` run had; else ``None``."""
    for f in fields(TrainConfig):
        value, before = getattr(resolved, f.name), getattr(saved, f.name)
        if f.name in MAY_DIFFER or value == before:
            continue
        if getattr(cfg, f.name) is None:
            shown = "one epoch, of a size the run did not record" if value is None else repr(value)
            return f.name.replace("_", "-"), before, f"left to its default ({shown})"
        return f.name.replace("_", "-"), before, f"not {value!r}"
    return None


def check_same_run(cfg: TrainConfig, arch: tuple[str, str, int]) -> TrainConfig | None:
    """A run of an earlier sweep into the same ``--out`` (finished, or to be resumed) is reused only if this sweep
    asks for the same run: every option that can change its numbers at the value it would train with (a default
    included, whether or not the run's ``config.json`` says which of its values were defaults), the threshold and,
    once finished, its length; one line otherwise. Its ``--init`` is checked by contents, not by name
    (:func:`check_same_init`), its data by what the run recorded of it (:func:`check_same_data`). Returns the
    run's checkpoint (``None``: none is left, only a summary, and nothing says how it was trained)."""
    found = saved_run(Path(cfg.out))
    if found is None:
        return None
    saved, ckpt = found
    changed = other_option(cfg, would_train(cfg, ckpt, arch), saved)
    if changed is not None:
        name, before, value = changed
        raise SkipnetError(
            f"{cfg.out} holds a run of other options ({name} {before!r}, {value}); a sweep of these options trains "
            "other runs: choose another --out"
        )
    return ckpt


def check_same_length(cfg: TrainConfig, ckpt: dict[str, Any]) -> None:
    """A finished run is reused only at the length this sweep asks for (when it asks for one)."""
    saved = TrainConfig.from_dict(ckpt["train_config"])

    def length(c: TrainConfig) -> str:
        return f"--iters {c.iters}" if c.iters is not None else f"--epochs {c.epochs:g}"

    if (cfg.epochs, cfg.iters) != (None, None) and (cfg.epochs, cfg.iters) != (saved.epochs, saved.iters):
        raise SkipnetError(
            f"{cfg.out} finished with {length(saved)}, not {length(cfg)}; a sweep of another length trains other "
            "runs: choose another --out"
        )


def check_same_data(args: argparse.Namespace, trained: list[tuple[Path, dict[str, Any]]]) -> None:
    """The runs ``trained`` (their directory and checkpoint) are reused only on the data they were trained,
    validated and tested on: ``--data`` (another path of the same data is fine) loaded as they loaded it must
    have the split sizes and labels their checkpoints record (``data_fingerprint``); one line otherwise (their
    test numbers, beside a start row evaluated on other images, would compare nothing)."""
    recorded = [(run, ckpt) for run, ckpt in trained if isinstance(ckpt.get("data_fingerprint"), dict)]
    if not recorded:
        return
    saved = recorded[0][1]
    cfg = TrainConfig.from_dict(saved["train_config"])  # the same data options in each (check_same_run)
    cfg = replace(cfg, data=args.data, data_dir=args.data_dir, download=args.download)
    data = load_run_data(cfg, get_config(cfg.arch), DistContext(), saved, resumed=True)  # as a resume loads it
    now = data_fingerprint(data)
    for run, ckpt in recorded:
        for key, before in ckpt["data_fingerprint"].items():
            if before != now.get(key):
                raise SkipnetError(
                    f"{run} was trained and tested on other data than --data {args.data} "
                    f"({describe_difference(key, before, now.get(key))}); a sweep on this data trains other runs: "
                    "choose another --out"
                )


# ------------------------------------------------------------------------------------------ the command
def prepare(args: argparse.Namespace) -> tuple[Runner, list[Run], list[float], Any, dict[str, Any], float, Any]:
    """Check everything, then record the runs: ``(runner, runs, alphas, SP model, its checkpoint, threshold, the
    data of the start row)``. Nothing is written, nothing trains, before every check has passed."""
    out = checked_out(args.out)
    alphas = checked_alphas(args.alphas)
    sp_model, sp_ckpt = load_model(args.init, map_location="cpu")
    threshold = start_threshold(sp_model, sp_ckpt, args.init)
    arch = sp_ckpt["arch"]["name"]
    val_split = args.val_split
    if val_split is None:
        val_split = float(data_record(sp_ckpt).get("val_split", TrainConfig.val_split) or 0.0)
    common = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    common |= {"arch": arch, "stage": "hrl", "init": args.init, "val_split": val_split, "threshold": threshold}
    common |= {"resume": True}

    def config(a: float) -> TrainConfig:
        return TrainConfig(**(common | {"alpha": a, "out": str(alpha_dir(out, a))}))

    for a in alphas:  # a bad option is refused here, in one line, before any run starts
        config(a).validate()
    data = start_data(args, sp_model, sp_ckpt)
    runs = declare(args, arch, alphas, val_split, threshold)
    runner = Runner(out, args.data)
    digest = init_digest(args.init)
    check_same_init(runner, runs, args.init, digest)
    trained = []
    registered = get_config(arch)  # the family and data set skipnet train resolves the runs' defaults for
    shape = (registered.family, registered.dataset, sp_model.num_gates)
    for r, a in zip(runs, alphas, strict=True):  # a run to reuse or resume: of these options, length, data
        ckpt = check_same_run(config(a), shape)
        if ckpt is not None and runner.finished(r):
            check_same_length(config(a), ckpt)
        if ckpt is not None:
            trained.append((runner.dir(r.name), ckpt))
    check_same_data(args, trained)
    write_record(out, runs, args.init, digest)
    return runner, runs, alphas, sp_model, sp_ckpt, threshold, data


def start_data(args: argparse.Namespace, sp_model: Any, sp_ckpt: dict[str, Any]) -> Any:
    """The data of the start row, as ``--init`` saw it, checked as ``skipnet eval`` checks it: the channels, image
    size and classes of ``--init`` (:func:`skipnet.checkpoint.require_same_classes`), in one line otherwise."""
    data = data_for_checkpoint(
        sp_ckpt, sp_model, args.data, data_dir=args.data_dir, download=args.download, limit=args.limit_test
    )
    require_same_classes(sp_model, data, f"--init {args.init}", data_record(sp_ckpt).get("classes"))
    return data


def write_summaries(out: Path, result: dict[str, Any], title: str, plot: Callable[[Path], Any]) -> None:
    """``sweep.json``, ``sweep.md`` and ``tradeoff.png`` (drawn by ``plot(path)``, first and aside), each written
    atomically: an interruption or a full disk leaves each of them whole, the earlier or the new one."""
    with tempfile.TemporaryDirectory(prefix="skipnet-sweep-") as tmp:
        plot(Path(tmp) / "tradeoff.png")
        png = (Path(tmp) / "tradeoff.png").read_bytes()
    atomic_write(out / "sweep.json", lambda f: f.write(json_text(result, indent=2).encode()))
    atomic_write(out / "sweep.md", lambda f: f.write(markdown_table(result["rows"], title).encode()))
    atomic_write(out / "tradeoff.png", lambda f: f.write(png))


def run(args: argparse.Namespace) -> int:
    from skipnet.device import pick_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    runner, runs, alphas, sp_model, sp_ckpt, threshold, data = prepare(args)
    runner.train(runs)  # resumes an unfinished run, skips a finished one
    rows = trained_rows(runner, runs, alphas)

    # The SP starting point on the same test images, as a reference.
    device = pick_device(args.device)
    sp_model.to(device).to(memory_format=torch.channels_last)
    cost = cost_model(sp_model)
    rec = run_eval(sp_model, eval_loader(data, "test"), cost, mode=eval_mode_for(sp_model))  # as it was trained
    sp_point = eval_point(rec, cost, sp_model.config.num_classes)
    sp_row = _row("SP (start)", None, "init", sp_point, checkpoint=args.init)

    arch, table = sp_ckpt["arch"]["name"], [sp_row, *rows]
    result = {"init": args.init, "arch": arch, "data": args.data, "threshold": threshold}
    result |= {"macs_all_on": cost.total_macs_all_on, "rows": table}
    title = f"Hybrid-RL sweep over α from {args.init} ({arch}, threshold {threshold:g})"
    from skipnet import plots  # matplotlib: imported by the commands that draw, when they draw

    write_summaries(
        runner.out,
        result,
        title,
        lambda path: plots.plot_tradeoff(
            path,
            macs_all_on=cost.total_macs_all_on,
            own=sp_point,
            own_label="SP starting point",
            others=[(r["label"], r) for r in rows],
            connect_others=True,
            title=f"Accuracy vs computation over α, {arch} (test split, threshold {threshold:g})",
        ),
    )
    if args.json:
        print(json_text(result))
        return 0
    print(markdown_table(table, f"sweep of {arch} from {args.init}").split("\n", 2)[2], end="")
    print(f"wrote {runner.out / 'sweep.json'}, sweep.md and tradeoff.png (every row at threshold {threshold:g})")
    return 0
