"""Real savings of routed execution (issue 4): plain ResNet vs masked vs routed SkipNet, on this CPU.

    python benchmarks/inference_speed.py            # the full table (~10-15 minutes on 2 cores)
    python benchmarks/inference_speed.py --quick    # a smoke run (~1-2 minutes)

Inference: for every batch size, the plain ResNet (``all_on``) is timed once, interleaved with the masked and the
routed SkipNet at every keep ratio (forced Bernoulli(keep) decisions, gates computed), after BatchNorm calibration
on random batches (see :mod:`skipnet.bench`). Training: one SGD step of the plain ResNet, of SP (hard gates,
masked) and of HRL (``mode="sample"`` with forced decisions, CE + REINFORCE on ``trace.log_probs``) with routed
and with masked execution, all interleaved. Every ratio is measured within one run.

With ``--threads 1`` (the default here: on a 2-core machine shared with other jobs two-thread timings swing
by integer factors) the calling thread's CPU time is recorded next to the wall clock; it is immune to other jobs
taking the core away. Writes ``benchmarks/results/inference_speed.json`` (``--out``) and prints tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from skipnet.bench import bench_inference, bench_train, calibrate_bn, set_threads
from skipnet.registry import create_model

HERE = Path(__file__).resolve().parent

FULL = {
    "inference": [
        # (arch, image size, batch sizes, keep ratios)
        ("cifar10_rnn_gate_110", 32, [1, 16, 64, 256], [0.25, 0.5, 0.75, 1.0]),
        ("imagenet_rnn_gate_101", 224, [1, 8, 32], [0.25, 0.5, 0.75, 1.0]),
    ],
    "train": ("cifar10_rnn_gate_110", 128, [0.25, 0.5, 0.75, 1.0]),
}
QUICK = {
    "inference": [
        ("cifar10_rnn_gate_110", 32, [1, 64], [0.5, 1.0]),
        ("imagenet_rnn_gate_101", 224, [1], [0.5]),
    ],
    "train": ("cifar10_rnn_gate_110", 32, [0.5]),
}


def repeats_for(arch: str, batch: int, quick: bool) -> tuple[int, int]:
    """(repeats, warmup) scaled so that every configuration takes a comparable time."""
    if quick:
        return (5, 1) if batch <= 16 else (3, 1)
    if arch.startswith("imagenet"):
        return {1: (10, 2), 8: (5, 1)}.get(batch, (3, 1))
    return {1: (30, 3), 16: (20, 2), 64: (10, 2)}.get(batch, (5, 1))


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }


def print_inference(rows: list[dict]) -> None:
    cpu = any("cpu_ms_plain" in r for r in rows)
    head = (
        f"{'arch':<22} {'batch':>5} {'keep':>5} {'ran':>5} {'plain ms':>10} {'masked ms':>10} {'routed ms':>10} "
        f"{'speedup':>8} {'ideal':>6} {'eff':>5}"
    )
    print(head + (f" {'cpu spd':>8} {'cpu eff':>8}" if cpu else "") + f" {'max|diff|':>10}")
    for r in rows:
        line = (
            f"{r['arch']:<22} {r['batch_size']:>5} {r['keep_requested']:>5.2f} {r['keep']:>5.2f} "
            f"{r['latency_ms_plain']:>10.2f} {r['latency_ms_masked']:>10.2f} {r['latency_ms_routed']:>10.2f} "
            f"{r['speedup']:>7.2f}x {r['ideal_speedup']:>5.2f}x {r['efficiency']:>5.2f}"
        )
        if cpu:
            line += f" {r.get('speedup_cpu', float('nan')):>7.2f}x {r.get('efficiency_cpu', float('nan')):>8.2f}"
        print(line + f" {r['max_abs_diff']:>10.1e}")


def print_train(res: dict) -> None:
    print(
        f"\ntraining step, {res['arch']}, batch {res['batch_size']}, {res['threads']} thread(s), "
        f"median of {res['repeats']} interleaved rounds"
    )
    cpu = res.get("cpu_ms", {})
    print(f"{'variant':<18} {'wall ms':>10} {'/ plain':>8}" + (f" {'CPU ms':>10} {'/ plain':>8}" if cpu else ""))
    for name, ms in res["latency_ms"].items():
        line = f"{name:<18} {ms:>10.1f} {ms / res['latency_ms']['plain']:>8.3f}"
        if cpu:
            line += f" {cpu[name]:>10.1f} {cpu[name] / cpu['plain']:>8.3f}"
        print(line)
    for key in ("ratios", "ratios_cpu"):
        if key in res:
            print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in res[key].items()))


def run_inference(cfg: dict, args: argparse.Namespace, rows: list[dict]) -> None:
    """The inference table: each configured architecture (seeded, BatchNorm calibrated on random batches) at each
    of its batch sizes; appends the rows to ``rows`` and prints them as they come."""
    for arch, size, batches, keeps in cfg["inference"]:
        if args.skip_imagenet and arch.startswith("imagenet"):
            continue
        torch.manual_seed(args.seed)
        model = create_model(arch)
        small = arch.startswith("imagenet")
        calibrate_bn(model, size, batches=2 if small else 4, batch_size=8 if small else 32, seed=args.seed)
        for batch in batches:
            repeats, warmup = repeats_for(arch, batch, args.quick)
            t0 = time.time()
            found = bench_inference(
                model,
                batch_size=batch,
                keeps=keeps,
                image_size=size,
                repeats=repeats,
                warmup=warmup,
                seed=args.seed,
                info={"source": "arch", "bn": "calibrated on random batches"},
            )
            rows.extend(found)
            print_inference(found)
            print(f"  ({time.time() - t0:.0f} s)", flush=True)
        del model


def run_train(cfg: dict, args: argparse.Namespace) -> dict:
    """The training-step table (seeded), printed; returns :func:`skipnet.bench.bench_train`'s result."""
    arch, batch, keeps = cfg["train"]
    torch.manual_seed(args.seed)
    repeats, warmup = (3, 1) if args.quick else (5, 1)
    res = bench_train(arch, batch_size=batch, keeps=keeps, repeats=repeats, warmup=warmup, seed=args.seed)
    print_train(res)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small smoke configuration")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see above)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-imagenet", action="store_true", help="leave out imagenet_rnn_gate_101")
    ap.add_argument("--skip-train", action="store_true", help="leave out the training-step table")
    ap.add_argument("--skip-inference", action="store_true", help="only the training-step table")
    ap.add_argument("--out", default=str(HERE / "results" / "inference_speed.json"), help="JSON output path")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    started = time.time()
    report: dict = {
        "benchmark": "inference_speed",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.date.today().isoformat(),
        "quick": args.quick,
        "machine": machine(),
        "inference": [],
    }
    if not args.skip_inference:
        run_inference(cfg, args, report["inference"])
    if not args.skip_train:
        report["train"] = run_train(cfg, args)

    report["machine"]["loadavg_end"] = os.getloadavg()
    report["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
