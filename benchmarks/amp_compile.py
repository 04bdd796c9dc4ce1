"""Training-step time under mixed precision and ``torch.compile`` on this machine (issue 7).

For one architecture and batch, times a full training step (forward, loss, backward, SGD step) of

- SP: straight-through hard gates, masked execution (every block for every sample), cross-entropy;
- HRL: sampled gates, routed execution (each block on the samples that execute it), CE + REINFORCE;

in fp32 and under ``torch.autocast`` bf16 (what ``--amp bf16`` does), eager and compiled:

- ``model``: ``torch.compile(model, dynamic=True)`` -- what ``skipnet train --compile`` does;
- ``blocks``: only the residual branch of the blocks compiled (``skipnet.blocks.residual_branch``, dynamic batch),
  the routing staying eager (reference notes §6).

Compilation is slow on a small CPU, so compiled variants can run on a smaller ``--compile-arch`` (eager is
timed there too). A compiled variant alternates step by step with an eager twin, so that both see the same
machine load (``eager_median_s``); it starts from an empty inductor cache, so its first step includes the
whole compile, and later recompilations (new routing patterns) show in ``max_s``.

    python benchmarks/amp_compile.py --json benchmarks/results/amp_compile.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import skipnet.blocks as blocks
import skipnet.gates as gates
from skipnet import create_model
from skipnet.checkpoint import unwrap
from skipnet.distributed import compile_model
from skipnet.stages import STAGES

_SPATIAL_MEAN = gates.spatial_mean


def _plain_spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def time_steps(arch: str, stage: str, batch: int, amp: str, compiled: str, steps: int, warmup: int) -> dict:
    """Time training steps of one variant. A compiled variant alternates, step by step, with an eager twin
    (same weights, same inputs), so that both see the same machine load: ``eager_median_s``."""
    torch._dynamo.reset()
    original = blocks.residual_branch
    body = torch.compile(original, dynamic=True) if compiled == "blocks" else original
    if compiled == "model":
        # The gates' channels_last-preserving average pool (a custom autograd.Function) does not trace
        # under dynamic shapes in this PyTorch; compiled, inductor generates its own backward anyway.
        gates.spatial_mean = _plain_spatial_mean
    try:
        torch.manual_seed(0)
        model = create_model(arch).to(memory_format=torch.channels_last).train()
        size = model.config.image_size
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, model.config.num_classes, (batch,), generator=gen)
        st = STAGES[stage]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
        runs = {"main": (compile_model(model) if compiled == "model" else model, body)}
        if compiled != "eager":
            twin = copy.deepcopy(model)
            runs["eager"] = (twin, original)
        opts = {k: torch.optim.SGD(unwrap(m).parameters(), lr=1e-3, momentum=0.9) for k, (m, _) in runs.items()}
        times: dict[str, list[float]] = {k: [] for k in runs}
        executed = []
        for _ in range(warmup + steps):
            for key, (train_model, branch) in runs.items():
                blocks.residual_branch = branch
                t0 = time.perf_counter()
                with ctx:
                    out = train_model(x, st.train_mode)
                    ce = F.cross_entropy(out.logits.float(), y, reduction="none")
                    loss, _ = st.loss(ce, out.trace, alpha=0.1, beta=1.0, rl_weight=1.0, baseline=None)
                opts[key].zero_grad(set_to_none=True)
                loss.backward()
                opts[key].step()
                times[key].append(time.perf_counter() - t0)
                if key == "main":
                    executed.append(out.trace.decisions.float().mean().item())
                    finite = bool(torch.isfinite(loss).item())
    finally:
        blocks.residual_branch = original
        gates.spatial_mean = _SPATIAL_MEAN
    timed = times["main"][warmup:]
    row = {
        "arch": arch,
        "stage": stage,
        "batch": batch,
        "amp": amp,
        "compile": compiled,
        "first_step_s": round(times["main"][0], 3),
        "median_s": round(statistics.median(timed), 4),
        "max_s": round(max(timed), 4),
        "executed": round(statistics.mean(executed), 3),
        "loss_finite": finite,
    }
    if "eager" in times:
        row["eager_median_s"] = round(statistics.median(times["eager"][warmup:]), 4)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="cifar10_rnn_gate_38")
    p.add_argument("--compile-arch", default="tiny_rnn_gate_14", help="architecture for the compiled variants")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="rounds of the eager variants (round-robin)")
    p.add_argument("--stages", nargs="+", default=["sp", "hrl"])
    p.add_argument("--compile", nargs="*", default=["model", "blocks"], help="compiled variants to time")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

    precisions = ("fp32", "bf16")
    eager = [(args.arch, stage, amp, "eager") for stage in args.stages for amp in precisions]
    if args.compile:
        small = args.compile_arch
        eager += [(small, stage, amp, "eager") for stage in args.stages for amp in precisions]
    # Eager variants run round-robin, ``--repeat`` times: on a shared machine the load drifts, and
    # alternating keeps the fp32/bf16 comparison fair. Reported: the median of the rounds' medians (the
    # other fields, first_step_s and max_s included, are those of the first round).
    rounds: dict[tuple, list[dict]] = {}
    for _ in range(args.repeat):
        for key in eager:
            row = time_steps(*key[:2], args.batch, *key[2:], args.steps, args.warmup)
            rounds.setdefault(key, []).append(row)
            print(json.dumps(row), flush=True)
    rows = []
    for runs in rounds.values():
        medians = sorted(r["median_s"] for r in runs)
        rows.append(runs[0] | {"median_s": statistics.median(medians), "round_medians_s": medians})
    compiled_plan = [(args.compile_arch, st, amp, c) for c in args.compile for st in args.stages for amp in precisions]
    for arch, stage, amp, compiled in compiled_plan:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # cold: honest first step
        try:
            row = time_steps(arch, stage, args.batch, amp, compiled, args.steps, args.warmup)
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result too
            reason = str(exc).strip().splitlines()[0][:300]
            row = {"arch": arch, "stage": stage, "batch": args.batch, "amp": amp, "compile": compiled}
            row["error"] = f"{type(exc).__name__}: {reason}"
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
