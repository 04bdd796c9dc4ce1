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

Every run is a normal ``skipnet train`` run in its own directory under ``--out`` (test accuracy is that of the
checkpoint chosen on the validation split). Writes ``reproduce_cifar10_gpu.json`` to ``--results`` and
``models.tar`` (weights only, no optimizer state) beside it, so the models can be examined elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from skipnet.results import test_fields

START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


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


def launch(name: str, args: list[str], out: Path, threads: int) -> tuple[str, subprocess.Popen]:
    cmd = [sys.executable, "-m", "skipnet", "train", *args, "--out", str(out / name), "--threads", str(threads)]
    log(f"start {name}: {' '.join(cmd[2:])}")
    f = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return name, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: list[tuple[str, subprocess.Popen]], deadline: float) -> dict[str, int | None]:
    """Wait for every process until ``deadline``; then SIGTERM the rest (their checkpoints stay)."""
    rcs: dict[str, int | None] = {}
    while len(rcs) < len(procs):
        for name, p in procs:
            if name not in rcs and p.poll() is not None:
                rcs[name] = p.returncode
                log(f"{name} finished rc={p.returncode}")
        if time.time() > deadline:
            for name, p in procs:
                if name not in rcs:
                    log(f"{name}: over the budget, stopping it")
                    os.killpg(p.pid, signal.SIGTERM)
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
                    rcs[name] = None
            break
        time.sleep(1)
    return rcs


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
            log(f"bench {rows[-1]}")
    return rows


def _portable(arg: str) -> str:
    """An argument as recorded in the report: no absolute path of the machine that ran it (a path inside the
    repository relative to it; any other absolute path as $DIR/<name>)."""
    if not os.path.isabs(arg):
        return arg
    repo = Path(__file__).resolve().parents[1]
    path = Path(arg)
    return str(path.relative_to(repo)) if path.is_relative_to(repo) else f"$DIR/{path.name}"


def main() -> int:
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
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Path(args.results or out)
    results.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    deadline = START + args.budget
    report: dict = {"budget_s": args.budget, "argv": [_portable(a) for a in sys.argv]}
    if device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(device)
    report["torch"] = torch.__version__
    log(f"device {report.get('device', device)}, torch {torch.__version__}")

    # The data cache is built once here, before several runs would race to build it.
    from skipnet.data import load_data

    bundle = load_data(args.data, batch_size=128, val_split=0.1, seed=0)
    spe = len(bundle.train)
    log(f"data ready: {bundle.train.num_samples} train images, {spe} steps per epoch")
    common = ["--data", args.data, "--device", args.device, "--batch-size", "128", "--val-split", "0.1"]
    threads = 2
    if args.smoke:
        common += ["--limit-train", "1024", "--limit-test", "512"]
        spe = 1024 * 9 // 10 // 128

    n_probe = 5 if args.smoke else 30
    t_base = probe("cifar10_resnet_38", "all_on", device, n_probe)
    t_sp = probe("cifar10_rnn_gate_38", "hard", device, n_probe)
    t_hrl = probe("cifar10_rnn_gate_38", "sample", device, n_probe)
    report["probe_s_per_step"] = {"base": t_base, "sp": t_sp, "hrl": t_hrl}
    log(f"probe: s/step base {t_base:.4f}, sp {t_sp:.4f}, hrl {t_hrl:.4f}")

    # Phase A: base and SP side by side. Two processes share the device (launch-bound work interleaves):
    # assume each runs ~1.4x slower than alone, plus ~8% for evaluation and start-up.
    left = deadline - time.time()
    t_a = 0.55 * left
    epochs = min(args.max_epochs, max(1, int(t_a / (1.4 * 1.08 * spe * max(t_base, t_sp)))))
    if args.base_epochs:
        epochs = args.base_epochs
    if args.smoke:
        epochs = 1
    report["epochs"] = epochs
    opt = ["--schedule", "onecycle", "--nesterov", "--weight-decay", "5e-4"]
    sched = [*opt, "--lr", "0.1", "--epochs", str(epochs)]
    a_start = time.time()
    if args.sp_from_base is None:  # the authors' recipe: SP from scratch, the same schedule as the base
        procs = [
            launch("base_r38", ["cifar10_resnet_38", "--stage", "base", *common, *sched], out, threads),
            launch("sp_r38_rnn", ["cifar10_rnn_gate_38", "--stage", "sp", *common, *sched], out, threads),
        ]
        report["rc_a"] = wait_all(procs, a_start + t_a * 1.25)
    else:  # SP as a short fine-tune of the base weights
        procs = [launch("base_r38", ["cifar10_resnet_38", "--stage", "base", *common, *sched], out, threads)]
        report["rc_a"] = wait_all(procs, a_start + t_a * 1.25)
        sp = [*opt, "--lr", "0.05", "--epochs", str(args.sp_from_base), "--init", str(out / "base_r38" / "best.pt")]
        procs = [launch("sp_r38_rnn", ["cifar10_rnn_gate_38", "--stage", "sp", *common, *sp], out, threads)]
        report["rc_a"] |= wait_all(procs, a_start + t_a * 1.6)
    report["phase_a_s"] = round(time.time() - a_start, 1)

    # Phase B: HRL at each alpha from the SP checkpoint, side by side.
    sp_best = out / "sp_r38_rnn" / "best.pt"
    hrl_names = []
    if sp_best.exists():
        left = deadline - time.time()
        t_b = left - (40 if not args.smoke else 20)  # keep time for the bench and the packing
        k = len(args.alphas)
        iters = int(t_b * 0.85 / (max(1.0, 0.35 * k) * t_hrl * 1.1))
        if args.smoke:
            iters = 4
        report["hrl_iters"] = iters
        hrl = ["--schedule", args.hrl_schedule, "--lr", str(args.hrl_lr), "--baseline", "ema", "--iters", str(iters)]
        hrl += ["--eval-every", str(max(1, iters // 6))]
        procs = []
        for a in args.alphas:
            name = f"hrl_r38_rnn_a{a:g}"
            hrl_names.append(name)
            procs.append(
                launch(
                    name,
                    ["cifar10_rnn_gate_38", "--stage", "hrl", *common, *hrl, "--alpha", str(a), "--init", str(sp_best)],
                    out,
                    threads,
                )
            )
        b_start = time.time()
        report["rc_b"] = wait_all(procs, b_start + t_b)
        report["phase_b_s"] = round(time.time() - b_start, 1)

    report["runs"] = [summary_row(out, n) for n in ["base_r38", "sp_r38_rnn", *hrl_names]]
    (results / "reproduce_cifar10_gpu.json").write_text(json.dumps(report, indent=2))

    # Phase C: real time on the device.
    try:
        specs: list[tuple[str, object]] = []
        if not args.no_arch_bench:
            specs += [("cifar10_rnn_gate_110", 0.5), ("cifar10_rnn_gate_110", 1.0)]
        specs += [(n, out / n / "best.pt") for n in hrl_names if (out / n / "best.pt").exists()]
        report["bench"] = bench_device(device, specs, [1, 64, 256] if not args.smoke else [1, 8], 20)
    except Exception as exc:  # noqa: BLE001 - the training results matter more; keep them
        report["bench_error"] = f"{type(exc).__name__}: {exc}"
        log(report["bench_error"])
    (results / "reproduce_cifar10_gpu.json").write_text(json.dumps(report, indent=2))

    # Weights only (no optimizer state), so the models fit through a small pipe.
    from skipnet.checkpoint import load_checkpoint

    names = ["base_r38", "sp_r38_rnn", *hrl_names]
    for part, group in enumerate((names[:3], names[3:])):
        with tarfile.open(results / f"models{part}.tar", "w") as tar:  # two files: each stays under 16 MB
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
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
