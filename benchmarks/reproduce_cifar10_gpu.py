"""The CIFAR-10 headline (plain ResNet-38 vs SkipNet-38 SP -> HRL) on one GPU inside a fixed time budget.

    python benchmarks/reproduce_cifar10_gpu.py --data PATH --out DIR --budget 480 [--results DIR]

What ``reproduce_cifar10.py --scale cpu`` cannot afford on two CPU cores: a longer schedule, supervised
pre-training from scratch as in the authors' code (not from the base weights), and several HRL runs side by
side. The script first times a few training steps of each kind on the device, then sizes the schedule so
that the whole run ends inside ``--budget`` seconds:

  phase A (in parallel): plain ResNet-38 (stage base) and SkipNet-38, recurrent gate, stage sp from
           scratch, the same epochs, one-cycle lr 0.1, SGD Nesterov, weight decay 5e-4, batch 128;
  phase B (in parallel): HRL from the SP checkpoint at each alpha, constant lr, EMA baseline;
  phase C: latency of the plain, masked and routed networks on the device (CUDA-synchronised).

Phases A and B are declared :class:`skipnet.experiments.Run` s, run side by side by
:class:`skipnet.experiments.Runner` (each a normal ``skipnet train`` run in its own directory under ``--out``,
its log beside it): a run still going at its phase's deadline is stopped (SIGTERM: it writes a resumable
checkpoint) and reported in ``stopped_a``/``stopped_b``; a failed run is reported in ``failed_a``/``failed_b``
and the script goes on with what there is. Run again on the same ``--out``, finished runs are skipped and
stopped ones resume. Test accuracy is that of the checkpoint chosen on the validation split. Writes
``reproduce_cifar10_gpu.json`` to ``--results`` and ``models0.tar``, ``models1.tar`` (weights only, no
optimizer state) beside it, so the models can be examined elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from skipnet.experiments import Run, RunFailed, Runner
from skipnet.results import test_fields

START = time.time()
THREADS = "2"  # CPU threads of each training process
OPT = ["--schedule", "onecycle", "--nesterov", "--weight-decay", "5e-4"]
BASE, SP = "base_r38", "sp_r38_rnn"

log = logging.getLogger("reproduce_cifar10_gpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz or its ImageFolder root")
    ap.add_argument("--out", required=True, help="run directories")
    ap.add_argument("--results", default=None, help="where the json and models.tar go (default: --out)")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole script")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5, 1.0])
    ap.add_argument("--hrl-lr", type=float, default=0.003)
    ap.add_argument("--max-epochs", type=float, default=40)
    ap.add_argument("--hrl-schedule", default="constant", help="HRL lr schedule (constant as the paper, or cosine)")
    ap.add_argument(
        "--sp-from-base",
        type=float,
        default=None,
        metavar="E",
        help="instead of SP from scratch beside the base run: SP for E epochs from the base checkpoint after it",
    )
    ap.add_argument("--base-epochs", type=float, default=None, help="fix the base (and SP) epochs instead of sizing")
    ap.add_argument("--no-arch-bench", action="store_true", help="bench only the trained HRL models")
    ap.add_argument("--smoke", action="store_true", help="a tiny CPU-sized run to check the script itself")
    return ap.parse_args(argv)


def probe(arch: str, mode: str, device: torch.device, steps: int, batch: int = 128) -> float:
    """Seconds per training step of ``arch`` in gate mode ``mode`` on random data (after a warm-up)."""
    from skipnet.gated import GatedResNet
    from skipnet.registry import get_config

    torch.manual_seed(0)
    model = GatedResNet(get_config(arch)).to(device).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        out = model(x, mode)
        loss = F.cross_entropy(out.logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary_row(out: Path, name: str) -> dict:
    d: dict = {"name": name}
    s = out / name / "summary.json"
    if s.exists():
        j = json.loads(s.read_text())
        d |= test_fields(j["test"]) | {
            "best_val_accuracy": j.get("best_val_accuracy"),
            "steps": j.get("steps"),
            "train_time_s": j.get("train_time_s"),
        }
    m = out / name / "metrics.jsonl"
    if m.exists():
        rows = [json.loads(r) for r in m.read_text().splitlines() if r.strip()]
        d["val_curve"] = [{k: r.get(k) for k in ("step", "val_accuracy", "val_macs_reduction", "val_cp")} for r in rows]
    return d


def bench_device(device: torch.device, specs: list[tuple[str, object]], batches: list[int], repeats: int) -> list:
    """Plain vs masked vs routed latency (median of CUDA-synchronised rounds) for each model and batch size."""
    from skipnet.bench import random_decisions
    from skipnet.checkpoint import load_checkpoint, model_from_checkpoint
    from skipnet.cost import cost_model
    from skipnet.gated import GatedResNet
    from skipnet.registry import get_config

    rows = []
    for label, spec in specs:
        if isinstance(spec, Path):
            model = model_from_checkpoint(load_checkpoint(spec))
            keep = None
        else:
            torch.manual_seed(0)
            model = GatedResNet(get_config(str(label)))
            keep = float(spec)  # type: ignore[arg-type]
        model = model.to(device).to(memory_format=torch.channels_last).eval()
        cm = cost_model(model, 32)
        for b in batches:
            x = torch.randn(b, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            d = None if keep is None else random_decisions(b, model.num_gates, keep, 1).to(device)
            fns = {
                "plain": lambda m=model, x=x: m(x, "all_on"),
                "masked": lambda m=model, x=x, d=d: m(x, "greedy", decisions=d, execution="masked"),
                "routed": lambda m=model, x=x, d=d: m(x, "greedy", decisions=d, execution="routed"),
            }
            with torch.inference_mode():
                om, orr = fns["masked"](), fns["routed"]()
                times: dict[str, list[float]] = {k: [] for k in fns}
                for r in range(repeats + 3):
                    for k, fn in fns.items():
                        sync(device)
                        t = time.perf_counter()
                        fn()
                        sync(device)
                        if r >= 3:
                            times[k].append(time.perf_counter() - t)
            med = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
            dec = orr.trace.decisions
            ideal = float(cm.total_macs_all_on) / float(cm.macs_per_image(dec.cpu()).mean())
            rows.append(
                {
                    "model": label,
                    "batch_size": b,
                    "keep": float(dec.float().mean()),
                    **{f"latency_ms_{k}": round(v, 3) for k, v in med.items()},
                    "speedup": round(med["plain"] / med["routed"], 3),
                    "speedup_masked": round(med["plain"] / med["masked"], 3),
                    "ideal_speedup": round(ideal, 3),
                    "efficiency": round(med["plain"] / med["routed"] / ideal, 3),
                    "max_abs_diff": float((om.logits - orr.logits).abs().max()),
                }
            )
            log.info("bench %s", rows[-1])
    return rows


def _portable(arg: str) -> str:
    """An argument as recorded in the report: no absolute path of the machine that ran it (a path inside the
    repository relative to it; any other absolute path as $DIR/<name>)."""
    if not os.path.isabs(arg):
        return arg
    repo = Path(__file__).resolve().parents[1]
    path = Path(arg)
    return str(path.relative_to(repo)) if path.is_relative_to(repo) else f"$DIR/{path.name}"


def _portable_command(runner: Runner, run: Run) -> str:
    """The ``skipnet train`` command of ``run`` as recorded: ``--out`` as ``$OUT``, other paths as in ``argv``."""
    out = str(runner.out)
    return " ".join(a.replace(out, "$OUT") if out in a else _portable(a) for a in runner.command(run))


def header(args: argparse.Namespace, device: torch.device) -> dict:
    """The report's start: the budget, the command line, the device and torch."""
    report: dict = {"budget_s": args.budget, "argv": [_portable(a) for a in sys.argv]}
    if device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(device)
    report["torch"] = torch.__version__
    log.info("device %s, torch %s", report.get("device", device), torch.__version__)
    return report


def prepare_data(args: argparse.Namespace) -> tuple[list[str], int]:
    """The options every run shares and the training steps per epoch. The data cache is built once here, before
    several runs would race to build it."""
    from skipnet.data import load_data

    bundle = load_data(args.data, batch_size=128, val_split=0.1, seed=0)
    spe = len(bundle.train)
    log.info("data ready: %d train images, %d steps per epoch", bundle.train.num_samples, spe)
    common = ["--device", args.device, "--batch-size", "128", "--val-split", "0.1", "--threads", THREADS]
    if args.smoke:
        common += ["--limit-train", "1024", "--limit-test", "512"]
        spe = 1024 * 9 // 10 // 128
    return common, spe


def probe_all(device: torch.device, smoke: bool) -> dict[str, float]:
    """Seconds per training step of the base, SP and HRL networks on the device."""
    n = 5 if smoke else 30
    t = {
        "base": probe("cifar10_resnet_38", "all_on", device, n),
        "sp": probe("cifar10_rnn_gate_38", "hard", device, n),
        "hrl": probe("cifar10_rnn_gate_38", "sample", device, n),
    }
    log.info("probe: s/step base %.4f, sp %.4f, hrl %.4f", t["base"], t["sp"], t["hrl"])
    return t


def train_group(runner: Runner, runs: list[Run], deadline: float, report: dict, phase: str) -> None:
    """Train ``runs`` side by side until ``deadline``; the runs stopped there, or the failure, go in ``report``
    (a failed run ends the phase, not the script: the other runs' results are still reported)."""
    report.setdefault("commands", {}).update({r.name: _portable_command(runner, r) for r in runs})
    try:
        stopped = runner.train(runs, parallel=len(runs), deadline=deadline)
    except RunFailed as exc:
        log.error("phase %s: %s", phase, exc)
        report.setdefault(f"failed_{phase}", []).append(str(exc))
        return
    report.setdefault(f"stopped_{phase}", []).extend(stopped)


def phase_a(runner: Runner, args: argparse.Namespace, common: list[str], spe: int, probes: dict, report: dict) -> None:
    """Base and SP side by side (or SP from the base after it, ``--sp-from-base``), sized to about 55% of the
    time left. Two processes share the device (launch-bound work interleaves): each is assumed ~1.4x slower
    than alone, plus ~8% for evaluation and start-up."""
    t_a = 0.55 * (START + args.budget - time.time())
    epochs = min(args.max_epochs, max(1, int(t_a / (1.4 * 1.08 * spe * max(probes["base"], probes["sp"])))))
    if args.base_epochs:
        epochs = args.base_epochs
    if args.smoke:
        epochs = 1
    report["epochs"] = epochs
    sched = [*OPT, "--lr", "0.1", "--epochs", str(epochs)]
    base = Run(BASE, ("cifar10_resnet_38", "--stage", "base", *common, *sched))
    a_start = time.time()
    if args.sp_from_base is None:  # the authors' recipe: SP from scratch, the same schedule as the base
        sp = Run(SP, ("cifar10_rnn_gate_38", "--stage", "sp", *common, *sched))
        train_group(runner, [base, sp], a_start + t_a * 1.25, report, "a")
    else:  # SP as a short fine-tune of the base weights
        train_group(runner, [base], a_start + t_a * 1.25, report, "a")
        init = ["--init", f"{{runs}}/{BASE}/best.pt"]
        sp_opt = [*OPT, "--lr", "0.05", "--epochs", str(args.sp_from_base), *init]
        sp = Run(SP, ("cifar10_rnn_gate_38", "--stage", "sp", *common, *sp_opt))
        if (runner.dir(BASE) / "best.pt").exists():
            train_group(runner, [sp], a_start + t_a * 1.6, report, "a")
    report["phase_a_s"] = round(time.time() - a_start, 1)


def phase_b(runner: Runner, args: argparse.Namespace, common: list[str], t_hrl: float, report: dict) -> list[str]:
    """HRL at each alpha from the SP checkpoint, side by side, until the time left less some for the bench and
    the packing; the names of the HRL runs (none without an SP checkpoint)."""
    if not (runner.dir(SP) / "best.pt").exists():
        return []
    t_b = START + args.budget - time.time() - (40 if not args.smoke else 20)
    iters = int(t_b * 0.85 / (max(1.0, 0.35 * len(args.alphas)) * t_hrl * 1.1))
    if args.smoke:
        iters = 4
    report["hrl_iters"] = iters
    hrl = ["--schedule", args.hrl_schedule, "--lr", str(args.hrl_lr), "--baseline", "ema", "--iters", str(iters)]
    hrl += ["--eval-every", str(max(1, iters // 6)), "--init", f"{{runs}}/{SP}/best.pt"]
    runs = [
        Run(f"hrl_r38_rnn_a{a:g}", ("cifar10_rnn_gate_38", "--stage", "hrl", *common, *hrl, "--alpha", str(a)))
        for a in args.alphas
    ]
    b_start = time.time()
    train_group(runner, runs, b_start + t_b, report, "b")
    report["phase_b_s"] = round(time.time() - b_start, 1)
    return [r.name for r in runs]


def phase_c(device: torch.device, args: argparse.Namespace, out: Path, hrl_names: list[str], report: dict) -> None:
    """Real time on the device: the routed SkipNet-110 at half and full keep and each trained HRL model."""
    try:
        specs: list[tuple[str, object]] = []
        if not args.no_arch_bench:
            specs += [("cifar10_rnn_gate_110", 0.5), ("cifar10_rnn_gate_110", 1.0)]
        specs += [(n, out / n / "best.pt") for n in hrl_names if (out / n / "best.pt").exists()]
        report["bench"] = bench_device(device, specs, [1, 64, 256] if not args.smoke else [1, 8], 20)
    except Exception as exc:  # noqa: BLE001 - the training results matter more; keep them
        report["bench_error"] = f"{type(exc).__name__}: {exc}"
        log.error("%s", report["bench_error"])


def pack(out: Path, results: Path, names: list[str]) -> None:
    """Weights only (no optimizer state), so the models fit through a small pipe: two files, each under 16 MB."""
    from skipnet.checkpoint import load_checkpoint

    for part, group in enumerate((names[:3], names[3:])):
        with tarfile.open(results / f"models{part}.tar", "w") as tar:
            for n in group:
                p = out / n / "best.pt"
                if not p.exists():
                    continue
                ck = load_checkpoint(p)
                ck["optimizer"] = None
                tmp = out / f"{n}.pt"
                torch.save(ck, tmp)
                tar.add(tmp, arcname=f"{n}.pt")
                for extra in ("summary.json", "metrics.jsonl", "config.json"):
                    if (out / n / extra).exists():
                        tar.add(out / n / extra, arcname=f"{n}/{extra}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Path(args.results or out)
    results.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report = header(args, device)
    common, spe = prepare_data(args)
    probes = report["probe_s_per_step"] = probe_all(device, args.smoke)
    runner = Runner(out, args.data)
    phase_a(runner, args, common, spe, probes, report)
    hrl_names = phase_b(runner, args, common, probes["hrl"], report)
    names = [BASE, SP, *hrl_names]
    report["runs"] = [summary_row(out, n) for n in names]
    (results / "reproduce_cifar10_gpu.json").write_text(json.dumps(report, indent=2))
    phase_c(device, args, out, hrl_names, report)
    (results / "reproduce_cifar10_gpu.json").write_text(json.dumps(report, indent=2))
    pack(out, results, names)
    log.info("done in %.0f s", time.time() - START)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
