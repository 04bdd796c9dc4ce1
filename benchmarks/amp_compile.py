"""Training-step time under mixed precision and ``torch.compile`` on this machine (issue 7).

For one architecture and batch, times a full training step (forward, loss, backward, SGD step) of

- SP: straight-through hard gates, masked execution (every block for every sample), cross-entropy;
- HRL: sampled gates, routed execution (each block on the samples that execute it), CE + REINFORCE;

in fp32 and under ``torch.autocast`` bf16 (what ``--amp bf16`` does), eager and compiled:

- ``model``: ``torch.compile(model, dynamic=True)`` -- what ``skipnet train --compile`` does;
- ``blocks``: only the residual branch of the blocks compiled (``skipnet.gated.residual_branch``, dynamic batch),
  the routing staying eager (reference notes §6).

Compilation is slow on a small CPU, so compiled variants can run on a smaller ``--compile-arch`` (eager is
timed there too, for the comparison). Each compiled variant starts from an empty inductor cache, so the
first step includes the full compile; later recompilations (new routing patterns) show in ``max_s``.

    python benchmarks/amp_compile.py --json benchmarks/results/amp_compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import skipnet.gated as gated
from skipnet import create_model
from skipnet.distributed import compile_model
from skipnet.stages import STAGES


def time_steps(arch: str, stage: str, batch: int, amp: str, compiled: str, steps: int, warmup: int) -> dict:
    torch._dynamo.reset()
    original = gated.residual_branch
    if compiled == "blocks":
        gated.residual_branch = torch.compile(original, dynamic=True)
    try:
        torch.manual_seed(0)
        model = create_model(arch).to(memory_format=torch.channels_last).train()
        train_model = compile_model(model) if compiled == "model" else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        size = model.config.image_size
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, model.config.num_classes, (batch,), generator=gen)
        st = STAGES[stage]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
        times, executed = [], []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            with ctx:
                out = train_model(x, st.train_mode)
                ce = F.cross_entropy(out.logits.float(), y, reduction="none")
                loss, _ = st.loss(ce, out.trace, alpha=0.1, beta=1.0, rl_weight=1.0, baseline=None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            executed.append(out.trace.decisions.float().mean().item())
    finally:
        gated.residual_branch = original
    timed = times[warmup:]
    return {
        "arch": arch,
        "stage": stage,
        "batch": batch,
        "amp": amp,
        "compile": compiled,
        "first_step_s": round(times[0], 3),
        "median_s": round(statistics.median(timed), 4),
        "max_s": round(max(timed), 4),
        "executed": round(statistics.mean(executed), 3),
        "loss_finite": bool(torch.isfinite(loss).item()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="cifar10_rnn_gate_38")
    p.add_argument("--compile-arch", default="tiny_rnn_gate_14", help="architecture for the compiled variants")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", nargs="+", default=["sp", "hrl"])
    p.add_argument("--compile", nargs="*", default=["model", "blocks"], help="compiled variants to time")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

    precisions = ("fp32", "bf16")
    plan = [(args.arch, stage, amp, "eager") for stage in args.stages for amp in precisions]
    if args.compile:
        small = args.compile_arch
        plan += [(small, stage, amp, "eager") for stage in args.stages for amp in precisions]
        plan += [(small, stage, amp, c) for c in args.compile for stage in args.stages for amp in precisions]
    rows = []
    for arch, stage, amp, compiled in plan:
        if compiled != "eager":  # a cold inductor cache for each compiled variant: the first step is honest
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
        row = time_steps(arch, stage, args.batch, amp, compiled, args.steps, args.warmup)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "note": "median of timed steps after warm-up; random images; gates at their random init (p ~ 0.5)",
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
