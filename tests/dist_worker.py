"""Checks run inside ``torchrun`` by ``tests/test_distributed.py`` (not collected by pytest).

torchrun --nproc_per_node=2 tests/dist_worker.py train OUT_JSON RUNS_JSON
    Each element of RUNS_JSON is the argument list of one ``skipnet train`` run; after each run every rank
    compares its parameters with every other rank's (all_gather). Rank 0 writes OUT_JSON.
torchrun --nproc_per_node=2 tests/dist_worker.py kinv OUT_JSON
    K-invariance: loss and gradient of a DDP step with 2 processes x batch b equal those of 1 process x
    batch 2b (eval-mode BN, float64) for the SP loss and the HRL loss with seeded sampled decisions and
    with a forced pattern in which one rank executes a block that the other does not; every stage trains
    two steps under DDP with identical weights after; SyncBatchNorm call order under ``--sync-bn``'s
    execution. Rank 0 writes OUT_JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from skipnet import create_model
from skipnet.distributed import DistContext, setup
from skipnet.losses import Baseline
from skipnet.stages import STAGES


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def param_spread(model: nn.Module) -> float:
    """Largest difference between any rank's parameters and rank 0's (0.0 when in sync)."""
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    return max(float((t - every[0]).abs().max()) for t in every)


# ------------------------------------------------------------------------------------------ train
def run_train(out_json: str, runs: list[list[str]]) -> None:
    from skipnet.commands.train import config_from_args, register
    from skipnet.train import Trainer

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    report = []
    ctx = None
    for argv in runs:
        args = parser.parse_args(["train", *argv])
        cfg = config_from_args(args)
        cfg.validate()
        trainer = Trainer(cfg)
        summary = trainer.fit()
        ctx = ctx or trainer.dist  # the first trainer's context created the process group: it alone destroys it
        entry = {
            "argv": argv,
            "world": trainer.world,
            "steps": _gather(trainer.step),
            "spread": param_spread(trainer.model),
            "ddp": type(trainer.train_model).__name__,
            "find_unused": bool(getattr(trainer.train_model, "find_unused_parameters", False)),
            "test_images": summary.get("test", {}).get("images"),
        }
        report.append(entry)
        trainer.train_model = trainer.model  # free DDP before the process group goes (DistContext.cleanup)
    if dist.get_rank() == 0:
        with open(out_json, "w") as f:
            json.dump(report, f)
    dist.barrier()
    del trainer
    ctx.cleanup()
    assert not dist.is_initialized(), "the process group outlived the worker's runs (gloo aborts at exit)"


# ------------------------------------------------------------------------------------------ k-invariance
def _cfg(stage: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(stage=stage, compile=False, sync_bn=False, device="cpu", amp="none", **kw)


def _step_loss(model, stage, x, y, decisions, baseline, execution="auto"):
    mode = STAGES[stage].train_mode
    out = model(x, mode, decisions=decisions, execution=execution)
    ce = F.cross_entropy(out.logits, y, reduction="none")
    loss, _ = STAGES[stage].loss(ce, out.trace, alpha=0.1, beta=1.0, rl_weight=1.0, baseline=baseline)
    return loss


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def _compare(got: dict, ref: dict) -> tuple[float, list[str]]:
    """Max abs difference of gradients; names whose gradient is None on one side and non-zero on the other."""
    worst, bad = 0.0, []
    for n, r in ref.items():
        g = got[n]
        if r is None or g is None:
            other = g if r is None else r
            if other is not None and float(other.abs().max()) > 0:
                bad.append(n)
            continue
        worst = max(worst, float((g - r).abs().max() / (r.abs().max() + 1e-12)))
    return worst, bad


def run_kinv(out_json: str) -> None:
    ctx = setup(_cfg("sp"))
    rank, world = ctx.rank, ctx.world
    report: dict = {"world": world}

    torch.manual_seed(0)
    base = create_model("tiny_rnn_gate_14").double()
    with torch.no_grad():  # calibrate BN running statistics (same on every rank), then freeze them
        for _ in range(3):
            base.train()(torch.randn(32, 3, 32, 32, dtype=torch.float64), "all_on")
    base.eval()
    n_gates = base.num_gates
    g = torch.Generator().manual_seed(1)
    b = 8
    x = torch.randn(world * b, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (world * b,), generator=g)
    rows = slice(rank * b, (rank + 1) * b)

    with torch.no_grad():  # decisions sampled from the policy with a fixed seed
        torch.manual_seed(2)
        sampled = base(x, "sample").trace.decisions
    forced = torch.bernoulli(torch.full((world * b, n_gates), 0.5, dtype=torch.float64), generator=g)
    forced[:b, 1], forced[b:, 1] = 1.0, 0.0  # block 1: every sample of rank 0, none of rank 1
    forced[:b, 3], forced[b:, 3] = 0.0, 1.0  # block 3: the opposite
    forced[:, 2] = 0.0  # block 2: no sample anywhere

    cases = [("sp", None, "none"), ("hrl", sampled, "none"), ("hrl", sampled, "batch"), ("hrl", forced, "ema")]
    for stage, dec, kind in cases:
        ref_model = copy.deepcopy(base)
        ref_base = Baseline(kind)
        if kind == "ema":  # a non-trivial moving average from an earlier step, the same on every rank
            ref_base.value = torch.linspace(-0.5, 0.5, n_gates, dtype=torch.float64)
        ref_loss = _step_loss(ref_model, stage, x, y, dec, ref_base)
        ref_loss.backward()
        ref_grads = _grads(ref_model)

        model = copy.deepcopy(base)
        ddp = ctx.wrap(model, _cfg(stage))
        base_r = ctx.baseline(kind)
        if kind == "ema":
            base_r.value = torch.linspace(-0.5, 0.5, n_gates, dtype=torch.float64)
        loss = _step_loss(ddp, stage, x[rows], y[rows], None if dec is None else dec[rows], base_r)
        loss.backward()
        got_loss = float(ctx.all_mean(loss.detach()))
        grads = _grads(model)
        worst, bad = _compare(grads, ref_grads)
        flat = torch.cat(
            [(torch.zeros_like(p) if grads[n] is None else grads[n]).reshape(-1) for n, p in model.named_parameters()]
        )
        every = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(every, flat)
        key = f"{stage}/{kind}/{'sampled' if dec is sampled else 'forced' if dec is forced else 'none'}"
        report[key] = {
            "loss": got_loss,
            "ref_loss": float(ref_loss),
            "grad_rel_err": worst,
            "grad_none_mismatch": bad,
            "grad_rank_spread": max(float((t - every[0]).abs().max()) for t in every),
            "find_unused": ddp.find_unused_parameters,
            "baseline_after": None if base_r.value is None else float((base_r.value - ref_base.value).abs().max()),
            # gated block 2 (layer2.1) runs for no sample in the forced pattern: no gradient anywhere
            "idle_block_grad_none": all(grads[n] is None for n in grads if n.startswith("backbone.layer2.1.")),
        }

    # Every stage trains two steps under DDP with real data shards, in train mode; weights stay identical.
    stages = {}
    for stage in STAGES:
        torch.manual_seed(0)
        model = create_model("tiny_rnn_gate_14")
        ddp = ctx.wrap(model, _cfg(stage))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        base_r = ctx.baseline("batch")
        gen = torch.Generator().manual_seed(10 + rank)
        for _ in range(2):
            xs = torch.randn(6, 3, 32, 32, generator=gen)
            ys = torch.randint(0, 10, (6,), generator=gen)
            out = ddp(xs, STAGES[stage].train_mode)
            ce = F.cross_entropy(out.logits, ys, reduction="none")
            loss, _ = STAGES[stage].loss(ce, out.trace, alpha=0.1, beta=1.0, rl_weight=1.0, baseline=base_r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        stages[stage] = {"spread": param_spread(model), "find_unused": ddp.find_unused_parameters}
    report["stages"] = stages

    # SyncBatchNorm needs every rank to call the same BNs in the same order. Under --sync-bn the trainer's
    # forward uses ``DistContext.train_execution`` ("masked"); record the order of BN calls per rank.
    order = {}
    sync_ctx = DistContext(rank=rank, world=world, sync_bn=True)
    for execution in ("auto", sync_ctx.train_execution):
        model = copy.deepcopy(base).train()
        calls: list[str] = []
        hooks = [
            m.register_forward_pre_hook(lambda mod, inp, name=name, calls=calls: calls.append(name))
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        loss = _step_loss(model, "hrl", x[rows], y[rows], forced[rows], None, execution=execution)
        loss.backward()
        for h in hooks:
            h.remove()
        seqs = _gather(calls)
        order[execution] = all(s == seqs[0] for s in seqs)
    report["bn_call_order_equal"] = order
    del ddp  # free DDP before the process group goes (DistContext.cleanup)

    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    ctx.cleanup()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "train":
        run_train(sys.argv[2], json.loads(sys.argv[3]))
    elif sys.argv[1] == "kinv":
        run_kinv(sys.argv[2])
    else:
        raise SystemExit(f"unknown check {sys.argv[1]!r}")
