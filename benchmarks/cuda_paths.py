"""Routed execution on a CUDA device: the equivalence checks the CPU test suite makes, then plain vs routed latency.

    python benchmarks/cuda_paths.py [--quick] [--out benchmarks/results/cuda_paths.json]

Needs a CUDA device (CI has none; the test suite checks the same properties on the CPU). Checks, on the device:

- greedy routed vs masked inference (gates with per-sample decisions): same decisions, logit difference;
- forced keep-0.5 decisions, routed vs masked; the same under bf16 autocast (agreement reported, not required:
  bf16 convolutions on a sub-batch may round differently);
- HRL (``sample`` mode, forced decisions, eval-mode BN): parameter gradients routed vs masked;
- SP (``hard`` mode, masked, straight-through): gradients on the device vs float64 on the CPU.

Then ``skipnet.bench.bench_inference`` on the device (CUDA-synchronised medians) for ``cifar10_rnn_gate_110`` at
batch sizes 1, 64, 256 and keep ratios 0.5 and 1.0. Prints tables and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from skipnet import create_model
from skipnet.bench import bench_inference, calibrate_bn, random_decisions
from skipnet.losses import hybrid_returns, reinforce_loss

RESULTS = Path(__file__).resolve().parent / "results"


def trained_like(name: str, device: torch.device, dtype=torch.float32):
    """BN-calibrated weights and gates scaled up so that decisions differ between samples."""
    torch.manual_seed(0)
    model = create_model(name)
    calibrate_bn(model, model.config.image_size)
    with torch.no_grad():
        for p in model.gates.parameters():
            p.mul_(4.0)
    return model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()


def images(model, batch: int, device, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = model.config.image_size
    x = torch.randn(batch, 3, s, s, generator=g, dtype=dtype)
    return x.to(device).contiguous(memory_format=torch.channels_last)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def checks(device: torch.device, archs: list[str]) -> list[dict]:
    """The equivalence checks, in true float32 (TF32 off: with TF32 a sub-batch and the full batch, or the device
    and the CPU, differ by TF32's 10-bit rounding, ~1e-3 relative, which would hide a real fault)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return [_check(device, arch) for arch in archs]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _check(device: torch.device, arch: str) -> dict:
    model = trained_like(arch, device)
    batch = 64 if arch.startswith("cifar") else 8
    x = images(model, batch, device)
    y = torch.randint(0, model.config.num_classes, (batch,), device=device)
    d = random_decisions(batch, model.num_gates, 0.5, seed=3).to(device)
    with torch.inference_mode():
        r, m = model(x, "greedy", execution="routed"), model(x, "greedy", execution="masked")
        fr, fm = model(x, decisions=d, execution="routed"), model(x, decisions=d, execution="masked")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            br, bm = model(x, "greedy", execution="routed"), model(x, "greedy", execution="masked")
    row = {
        "arch": arch,
        "batch": batch,
        "greedy_keep": float(r.trace.decisions.float().mean()),
        "greedy_decisions_match": bool(torch.equal(r.trace.decisions, m.trace.decisions)),
        "greedy_max_abs_diff": float((r.logits - m.logits).abs().max()),
        "forced_max_abs_diff": float((fr.logits - fm.logits).abs().max()),
        "bf16_decision_agreement": float((br.trace.decisions == bm.trace.decisions).float().mean()),
        "bf16_max_abs_diff": float((br.logits.float() - bm.logits.float()).abs().max()),
    }
    # HRL gradients, routed vs masked (eval-mode BN: the sub-batch and the batch normalise alike).
    g = {}
    for execution in ("routed", "masked"):
        net = copy.deepcopy(model)
        out = net(x, "sample", decisions=d, execution=execution)
        ce = F.cross_entropy(out.logits, y, reduction="none")
        (ce.mean() + reinforce_loss(out.trace.log_probs, hybrid_returns(ce, out.trace.decisions, 0.1))).backward()
        g[execution] = grads(net)
    row["hrl_grad_max_rel_diff"] = max(rel(g["routed"][n], g["masked"][n]) for n in g["masked"])
    # SP (hard, straight-through, masked): the device against float64 on the CPU.
    small = x[:16]
    ref = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    dev = copy.deepcopy(model)
    for net, inp in ((ref, small.cpu().double()), (dev, small)):
        out = net(inp, "hard")
        F.cross_entropy(out.logits, y[:16].to(inp.device)).backward()
    gr, gd = grads(ref), grads(dev)
    row["sp_grad_max_rel_diff_vs_cpu_f64"] = max(rel(gd[n], gr[n]) for n in gr if gr[n].abs().max() > 0)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, batch 1 and 64 only")
    ap.add_argument("--checks-only", action="store_true", help="the equivalence checks, no timing")
    ap.add_argument("--out", default=str(RESULTS / "cuda_paths.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_paths: no CUDA device on this machine", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    t0 = time.time()
    rows = checks(device, ["cifar10_rnn_gate_38", "imagenet_rnn_gate_50"])
    print(
        "| arch | batch | greedy keep | decisions match | max diff greedy | forced | bf16 agree | bf16 diff "
        "| HRL grad rel diff | SP grad rel diff vs CPU f64 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['batch']} | {r['greedy_keep']:.3f} | {r['greedy_decisions_match']} | "
              f"{r['greedy_max_abs_diff']:.2e} | {r['forced_max_abs_diff']:.2e} | {r['bf16_decision_agreement']:.4f} | "
              f"{r['bf16_max_abs_diff']:.2e} | {r['hrl_grad_max_rel_diff']:.2e} | "
              f"{r['sp_grad_max_rel_diff_vs_cpu_f64']:.2e} |")  # fmt: skip
    timing = []
    model = trained_like("cifar10_rnn_gate_110", torch.device("cpu"))
    for batch in () if args.checks_only else (1, 64) if args.quick else (1, 64, 256):
        timing += bench_inference(
            copy.deepcopy(model),
            batch_size=batch,
            keeps=(0.5, 1.0),
            repeats=10 if args.quick else 30,
            warmup=5,
            device=device,
            info={"source": "arch"},
        )
    print("\n| batch | keep | plain ms | masked ms | routed ms | speed-up | ideal | efficiency | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in timing:
        print(f"| {r['batch_size']} | {r['keep_requested']} | {r['latency_ms_plain']:.2f} | "
              f"{r['latency_ms_masked']:.2f} | {r['latency_ms_routed']:.2f} | {r['speedup']:.2f} | "
              f"{r['ideal_speedup']:.2f} | {r['efficiency']:.2f} | {r['max_abs_diff']:.1e} |")  # fmt: skip
    out = {
        "benchmark": "cuda_paths",
        "command": "python benchmarks/cuda_paths.py" + (" --quick" if args.quick else ""),
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "checks": rows,
        "inference": timing,
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
