"""Wall-clock benchmarks: the plain ResNet against masked and routed SkipNet execution (issue 4, "real savings").

Every figure compares variants timed **in the same run, on the same inputs, interleaved**: each round runs every
variant once, in an order rotated from round to round, so that drift in a shared machine's load hits all of
them alike; the reported latency is the median over rounds (the minimum is kept too). Inference runs in eval
mode under ``torch.inference_mode`` with the model and inputs in ``channels_last``.

The three inference variants share one set of weights:

- ``plain``: ``mode="all_on"`` -- every block, no gate: exactly the plain ResNet on the same backbone.
- ``masked``: every block for every sample, mixed with the 0/1 decision (what the authors' code does).
- ``routed``: each block runs on the samples that execute it only (:func:`skipnet.executors.route_indices`).

Decisions are either *forced* -- Bernoulli(keep) per sample and gate, drawn once and fixed across repeats;
the gates are still computed, so their cost counts -- or, for a checkpoint, taken greedily by its learned gates
at its stored threshold. ``ideal_speedup`` is the plain network's MACs over the MACs the routed run actually
spent (gates included, :meth:`skipnet.cost.CostModel.macs_per_image`); ``efficiency`` is the measured speedup
over that ideal.

An untrained network in eval mode has running BatchNorm statistics at their initial (0, 1), so activations grow
by orders of magnitude through 50 residual blocks and a float32 difference between two execution orders looks
huge. :func:`calibrate_bn` therefore first sets every running statistic to the cumulative average over a few
random batches (train-mode ``all_on`` passes under ``no_grad`` with ``momentum=None``;
:func:`calibrate_batchnorm` does it on any batches), which keeps activations O(1) and ``max_abs_diff`` meaningful.
Checkpoints keep their trained statistics.

Benchmarks on real images without a trained model (the export benchmarks) use a *bias-set* model
(:func:`bias_set_model`): BatchNorm calibrated on real training images, then the gates' bias bisected
(:func:`bisect_gate_bias`) until the learned greedy gates execute a wanted fraction of the blocks, with decisions
that vary from image to image as a trained model's do. :func:`load_bench_data`, :func:`split_pixels` and
:func:`environment` are their data and their record of the machine.
"""

from __future__ import annotations

import copy
import datetime as dt
import gc
import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from skipnet.cost import cost_model
from skipnet.errors import SkipnetError
from skipnet.gated import GatedResNet
from skipnet.registry import create_model
from skipnet.zoo import WEIGHTS

if TYPE_CHECKING:
    from skipnet.data import DataBundle

CHANNELS_LAST = torch.channels_last
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # a normalisation: (mean, std) per channel


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads)`` when given; returns the number of threads in use."""
    if threads is not None:
        if threads < 1:
            raise SkipnetError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def is_checkpoint(spec: str) -> bool:
    """Whether ``spec`` names a checkpoint (a file, ``pretrained:NAME`` or a ``save_pretrained`` directory) rather
    than a registered architecture."""
    path = Path(spec)
    saved = path.is_dir() and (path / WEIGHTS).is_file()  # a folder named after an architecture is not
    return spec.startswith("pretrained:") or spec.endswith((".pt", ".pth", ".ckpt")) or path.is_file() or saved


def load_subject(spec: str) -> tuple[GatedResNet, dict[str, Any]]:
    """The model to benchmark: a fresh (BN-calibrated by the caller) architecture, or a trained checkpoint.

    Returns ``(model, info)`` where ``info`` has ``source`` (``"arch"`` or ``"checkpoint"``), ``arch`` and, for a
    checkpoint, ``path`` and ``threshold``.
    """
    if not is_checkpoint(spec):
        model = create_model(spec)
        return model, {"source": "arch", "arch": model.config.name}
    from skipnet.checkpoint import load_model  # the checkpoint format lives there

    model, _ = load_model(spec, map_location="cpu")
    return model, {"source": "checkpoint", "arch": model.config.name, "path": spec, "threshold": model.threshold}


def random_images(batch: int, model: GatedResNet, image_size: int, seed: int) -> Tensor:
    """Seeded N(0, 1) images (B, C, S, S) in ``channels_last``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.config.in_channels, image_size, image_size, generator=gen)
    return x.contiguous(memory_format=CHANNELS_LAST)


def random_decisions(batch: int, n_gates: int, keep: float, seed: int) -> Tensor:
    """Forced decisions: Bernoulli(``keep``) per sample and gate, (B, N), seeded."""
    if not 0.0 <= keep <= 1.0:
        raise SkipnetError(f"--keep must be in [0, 1], got {keep}")
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((batch, n_gates), float(keep)), generator=gen)


@torch.no_grad()
def calibrate_batchnorm(model: GatedResNet, batches: Iterable[Tensor], keep: Tensor | None = None) -> None:
    """Set every BatchNorm running statistic to its cumulative average over train-mode ``all_on`` passes on
    ``batches`` (inputs as the model takes them: normalised); with ``keep`` (1, N), passes of that one static route
    (forced decisions: the blocks it skips keep their reset statistics unless the passes run them masked).

    Every BatchNorm's statistics are reset and its momentum set to ``None`` (cumulative moving average) for the
    passes, then restored. ``batches`` may be any iterable, e.g. a generator making each batch when it is needed.
    Gate BNs (in feed-forward gates) are not visited by ``all_on`` and keep their initial statistics. Leaves the
    model in eval mode, also when a pass fails.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for x in batches:
            if keep is None:
                model(x, "all_on")
            else:
                model(x, "random", decisions=keep.to(x.device).expand(x.shape[0], -1))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


def calibrate_bn(model: GatedResNet, image_size: int, batches: int = 4, batch_size: int = 16, seed: int = 0) -> None:
    """:func:`calibrate_batchnorm` on ``batches`` seeded random-input batches (:func:`random_images`, seeds
    ``seed + 1000 + b``, in the model's dtype).

    For untrained networks only (see the module docstring): keeps eval-mode activations O(1); forced decisions do
    not depend on the gate BNs it leaves alone. Leaves the model in eval mode.
    """
    dtype = next(model.parameters()).dtype
    images = (random_images(batch_size, model, image_size, seed + 1000 + b).to(dtype) for b in range(batches))
    calibrate_batchnorm(model, images)


@torch.no_grad()
def bisect_gate_bias(
    model: GatedResNet, images: Tensor, keep: float, *, scale: float = 20.0, tol: float = 0.01, steps: int = 30
) -> float:
    """Make an untrained model's learned greedy gates execute about ``keep`` of the gated blocks on ``images``.

    Scales the weight of every gate's output layer by ``scale`` (so that the gate logits spread and decisions vary
    from image to image and block to block), then bisects one bias shared by all gates (:meth:`set_gate_bias`) in
    [-200, 200] until greedy decisions on ``images`` (normalised, in eval mode) execute a fraction within ``tol`` of
    ``keep``, or for ``steps`` steps at most. Changes the model in place and leaves it in eval mode with the last
    bias tried; returns the fraction of (image, gate) decisions that bias executes.
    """
    if model.gates is None:
        raise SkipnetError(f"{model.config.name} has no gates to set a bias on")
    if not 0.0 <= keep <= 1.0:
        raise SkipnetError(f"keep must be in [0, 1], got {keep}")
    model.eval()
    for fc in model.gates.heads():  # the recurrent gate's one layer, or each feed-forward gate's
        fc.weight.mul_(scale)
    lo, hi = -200.0, 200.0
    frac = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        model.set_gate_bias(mid)
        frac = float(model(images, "greedy").trace.decisions.mean())
        if abs(frac - keep) < tol:
            break
        lo, hi = (mid, hi) if frac < keep else (lo, mid)
    return frac


def load_bench_data(spec: str | Path, limit_train: int | None = 2048) -> tuple[DataBundle, Stats]:
    """A data set to benchmark on real images: its :class:`~skipnet.data.DataBundle`, loaded in this process (no
    loader workers), the test split whole in batches of 500, the training split limited to ``limit_train`` images
    (enough to calibrate BatchNorm); and its normalisation ``(mean, std)``, as :func:`skipnet.export.export_model`
    takes it."""
    from skipnet.data import load_data

    data = load_data(str(spec), batch_size=256, eval_batch_size=500, limit_train=limit_train, workers=0)
    return data, (tuple(data.mean), tuple(data.std))


def split_pixels(data: DataBundle, split: str, n: int | None = None) -> Tensor:
    """The first ``n`` images (all without ``n``) of ``split`` of a data bundle, in evaluation order and without
    augmentation, as [0, 1] pixels: the bundle's normalisation undone (what exported graphs take). Sets the split's
    loader to evaluation (``train = False``) for good."""
    loader = data.split(split)
    if hasattr(loader, "train"):
        loader.train = False
    xs, got = [], 0
    for x, _ in loader:
        xs.append(x)
        got += len(x)
        if n is not None and got >= n:
            break
    x = torch.cat(xs)[:n]
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    return x * std + mean


def bias_set_model(arch: str, data: DataBundle, stats: Stats, keep: float, n: int = 64) -> tuple[GatedResNet, float]:
    """An untrained ``arch`` whose gates decide as a trained model's do, for benchmarks without a trained one.

    Built with ``torch.manual_seed(0)``; BatchNorm calibrated (:func:`calibrate_batchnorm`) on the first 512
    training images of ``data`` in batches of 128; then :func:`bisect_gate_bias` to ``keep`` on its first ``n``
    test images. Images are normalised with ``stats`` ``(mean, std)``. Returns ``(model in eval mode, fraction of
    gated blocks executed on those test images)``; its accuracy is meaningless (random convolution weights).
    """
    torch.manual_seed(0)
    model = create_model(arch)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in stats)
    train_px = (split_pixels(data, "train", 512) - mean) / std
    calibrate_batchnorm(model, [train_px[i : i + 128] for i in range(0, 512, 128)])
    test = (split_pixels(data, "test", n) - mean) / std
    reached = bisect_gate_bias(model, test, keep)
    return model.eval(), reached


def environment(*packages: str) -> dict[str, Any]:
    """Where and when a benchmark ran, to record beside its numbers: the date and time, the version of each of
    ``packages`` (imported; e.g. ``"torch", "onnxruntime"``), Python's, the machine's architecture, its CPU count
    and the command line."""
    env: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds")}
    env |= {name: importlib.import_module(name).__version__ for name in packages}
    return env | {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "command": " ".join(sys.argv),
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    cpu: dict[str, list[float]] | None = None,
    sync: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each callable over ``repeats`` rounds, after ``warmup`` rounds.

    Each round calls every function once; the order rotates by one each round. Garbage collection is paused
    while timing. If ``cpu`` is given it receives the calling thread's CPU seconds per call as well
    (``time.thread_time``): with one intra-op thread all the work runs in that thread, so this figure ignores
    the time a shared machine's other jobs take the core away, which wall-clock time cannot. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before and after each call, so that asynchronous device work is
    timed in full.
    """
    if repeats < 1:
        raise SkipnetError(f"--repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise SkipnetError(f"--warmup must be >= 0, got {warmup}")
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    if cpu is not None:
        cpu.update({n: [] for n in names})
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if sync is not None:
                    sync()
                c0 = time.thread_time()
                t0 = time.perf_counter()
                fns[name]()
                if sync is not None:
                    sync()
                dt = time.perf_counter() - t0
                dc = time.thread_time() - c0
                if r >= warmup:
                    times[name].append(dt)
                    if cpu is not None:
                        cpu[name].append(dc)
    finally:
        if was_enabled:
            gc.enable()
    return times


def _ms(samples: Sequence[float]) -> float:
    return 1e3 * statistics.median(samples)


def bench_inference(
    model: GatedResNet,
    *,
    batch_size: int,
    keeps: Sequence[float | None] = (None,),
    image_size: int | None = None,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    info: dict[str, Any] | None = None,
    images: Tensor | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Time plain / masked / routed inference of ``model`` at one batch size, for each keep ratio.

    Args:
        model: the network (left in eval mode, converted to ``channels_last``).
        keeps: keep ratios to force (Bernoulli decisions); ``None`` means the model's own greedy gates decide.
            ``plain`` is timed once, interleaved with the masked and routed variants of every keep ratio.
        info: extra fields copied into every result (``source``, ``arch``, ...).
        images: the inputs (B, C, S, S), e.g. real test images on which learned gates decide as they would in
            use; default seeded N(0, 1) noise.
        device: where to run (default: where the model is). On CUDA every call is synchronised before and after.

    Returns one dict per keep ratio, with the keys documented in :mod:`skipnet.commands.bench`.
    """
    size = _check(model, batch_size, keeps, image_size)
    cm = cost_model(model.eval(), size)
    if device is not None:
        model.to(device)
    model.to(memory_format=CHANNELS_LAST)
    dev = next(model.parameters()).device
    x = random_images(batch_size, model, size, seed) if images is None else images
    x = x.to(dev).contiguous(memory_format=CHANNELS_LAST)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None

    fns, runs = _variants(model, x, keeps, seed)
    with torch.inference_mode():
        checks = [(run["masked"](), run["routed"]()) for run in runs]
        cpu: dict[str, list[float]] = {}
        times = time_interleaved(fns, repeats, warmup, cpu, sync)

    inputs = "random N(0, 1)" if images is None else "real images"
    common = {"inputs": inputs} | (info or {})  # the caller's account of the images wins
    common |= {"arch": model.config.name, "image_size": size, "batch_size": batch_size}
    one_thread = torch.get_num_threads() == 1 and dev.type == "cpu"
    results = []
    for j, (run, (out_m, out_r)) in enumerate(zip(runs, checks)):
        dec = out_r.trace.decisions.cpu()
        row = common | _setup(run["keep_requested"], dec, dev) | {"repeats": repeats, "warmup": warmup, "seed": seed}
        macs_plain = float(cm.total_macs_all_on)
        macs_routed = float(cm.macs_per_image(dec).mean()) if dec.numel() else macs_plain
        row |= _latencies(times, j, macs_plain, macs_routed)
        row["max_abs_diff"] = float((out_r.logits.float() - out_m.logits.float()).abs().max())
        row["decisions_match"] = bool(torch.equal(out_r.trace.decisions, out_m.trace.decisions))
        if one_thread:  # CPU time of the only compute thread: robust to other jobs on a shared machine
            row |= _cpu_times(cpu, row, j)
        results.append(row)
    return results


def _variants(
    model: GatedResNet, x: Tensor, keeps: Sequence[float | None], seed: int
) -> tuple[dict[str, Callable[[], Any]], list[dict[str, Any]]]:
    """The timed calls (plain once; masked and routed per keep ratio, on the same forced decisions) and, per
    keep ratio, its masked and routed calls."""
    fns: dict[str, Callable[[], Any]] = {"plain": lambda: model(x, "all_on")}
    runs: list[dict[str, Any]] = []
    for j, keep in enumerate(keeps):
        d = None if keep is None else random_decisions(x.shape[0], model.num_gates, keep, seed + 1 + j).to(x.device)
        masked = _bind(model, x, d, "masked")
        routed = _bind(model, x, d, "routed")
        fns[f"masked{j}"], fns[f"routed{j}"] = masked, routed
        runs.append({"keep_requested": keep, "masked": masked, "routed": routed})
    return fns, runs


def _check(model: GatedResNet, batch_size: int, keeps: Sequence[float | None], image_size: int | None) -> int:
    """Refuse what cannot be timed, in one line; the image size to time at."""
    if batch_size < 1:
        raise SkipnetError(f"--batch-size must be >= 1, got {batch_size}")
    size = image_size or model.config.image_size
    if size < 8:
        raise SkipnetError(f"--image-size must be >= 8, got {size}")
    if any(k is None for k in keeps) and model.gates is None:
        raise SkipnetError(f"{model.config.name} has no gates to decide: give --keep to force decisions")
    return size


def _setup(keep: float | None, dec: Tensor, dev: torch.device) -> dict[str, Any]:
    """How the decisions of one keep ratio were made and what the routed run executed."""
    return {
        "decisions": "learned greedy gates" if keep is None else "forced Bernoulli(keep)",
        "keep_requested": keep,
        "keep": float(dec.mean()) if dec.numel() else 1.0,
        "device": str(dev),
        "threads": torch.get_num_threads(),
    }


def _latencies(times: dict[str, list[float]], j: int, macs_plain: float, macs_routed: float) -> dict[str, Any]:
    """Median and minimum latencies of keep ratio ``j``, the speedups and their ideal (the MACs ratio)."""
    plain_ms, masked_ms, routed_ms = _ms(times["plain"]), _ms(times[f"masked{j}"]), _ms(times[f"routed{j}"])
    ideal = macs_plain / macs_routed
    return {
        "latency_ms_plain": plain_ms,
        "latency_ms_masked": masked_ms,
        "latency_ms_routed": routed_ms,
        "latency_ms_min_plain": 1e3 * min(times["plain"]),
        "latency_ms_min_masked": 1e3 * min(times[f"masked{j}"]),
        "latency_ms_min_routed": 1e3 * min(times[f"routed{j}"]),
        "speedup": plain_ms / routed_ms,
        "speedup_masked": plain_ms / masked_ms,
        "macs_plain": macs_plain,
        "macs_routed": macs_routed,
        "ideal_speedup": ideal,
        "efficiency": plain_ms / routed_ms / ideal,
    }


def _cpu_times(cpu: dict[str, list[float]], row: dict[str, Any], j: int) -> dict[str, Any]:
    """The calling thread's CPU milliseconds of keep ratio ``j`` (one compute thread only)."""
    cpu_plain, cpu_routed = _ms(cpu["plain"]), _ms(cpu[f"routed{j}"])
    return {
        "cpu_ms_plain": cpu_plain,
        "cpu_ms_masked": _ms(cpu[f"masked{j}"]),
        "cpu_ms_routed": cpu_routed,
        "speedup_cpu": cpu_plain / cpu_routed,
        "efficiency_cpu": cpu_plain / cpu_routed / row["ideal_speedup"],
    }


def _bind(model: GatedResNet, x: Tensor, decisions: Tensor | None, execution: str) -> Callable[[], Any]:
    return lambda: model(x, "greedy", decisions=decisions, execution=execution)


# --------------------------------------------------------------------------------------------------- training


def _train_step_fn(
    model: GatedResNet,
    x: Tensor,
    y: Tensor,
    kind: str,
    decisions: Tensor | None = None,
    execution: str = "auto",
    alpha: float = 0.1,
    lr: float = 0.01,
) -> Callable[[], float]:
    """One SGD step of ``kind``: ``plain`` (all_on, CE), ``sp`` (hard gates, masked, CE) or ``hrl``.

    ``hrl`` is the hybrid RL step with forced decisions: ``mode="sample"`` forward (routed or masked), CE +
    the REINFORCE term of Eq. 6 on ``trace.log_probs`` (explicit (B, N) returns), backward, optimizer step.
    """
    from skipnet.losses import hybrid_returns, reinforce_loss

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if kind == "plain":
            loss = F.cross_entropy(model(x, "all_on").logits, y)
        elif kind == "sp":
            loss = F.cross_entropy(model(x, "hard", execution="masked").logits, y)
        else:
            out = model(x, "sample", decisions=decisions, execution=execution)
            ce = F.cross_entropy(out.logits, y, reduction="none")
            returns = hybrid_returns(ce, out.trace.decisions, alpha)
            loss = ce.mean() + reinforce_loss(out.trace.log_probs, returns)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def bench_train(
    arch: str | GatedResNet,
    *,
    batch_size: int = 128,
    keeps: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    image_size: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time training steps, interleaved: plain ResNet, SP (hard gates, masked), and HRL at each keep ratio
    with routed and with masked execution. Every variant has its own copy of the model and its own optimizer;
    inputs, labels and forced decisions are shared and fixed.

    Returns ``{"batch_size", "image_size", "threads", "latency_ms": {variant: median ms}, "ratios": {...}}``.
    """
    base = create_model(arch) if isinstance(arch, str) else arch
    if base.gates is None:
        raise SkipnetError(f"{base.config.name} has no gates: the SP and HRL steps need a gated architecture")
    size = image_size or base.config.image_size
    base.to(memory_format=CHANNELS_LAST)
    x = random_images(batch_size, base, size, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    y = torch.randint(0, base.config.num_classes, (batch_size,), generator=gen)

    fns: dict[str, Callable[[], float]] = {
        "plain": _train_step_fn(copy.deepcopy(base), x, y, "plain"),
        "sp_masked": _train_step_fn(copy.deepcopy(base), x, y, "sp"),
    }
    for j, keep in enumerate(keeps):
        d = random_decisions(batch_size, base.num_gates, keep, seed + 1 + j)
        for execution in ("routed", "masked"):
            fns[f"hrl_{execution}@{keep:g}"] = _train_step_fn(copy.deepcopy(base), x, y, "hrl", d, execution)
    cpu: dict[str, list[float]] = {}
    times = time_interleaved(fns, repeats, warmup, cpu)
    ms = {k: _ms(v) for k, v in times.items()}
    ratios = _train_ratios(ms, keeps)
    out = {
        "arch": base.config.name,
        "batch_size": batch_size,
        "image_size": size,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "keeps": list(keeps),
        "latency_ms": ms,
        "latency_ms_min": {k: 1e3 * min(v) for k, v in times.items()},
        "ratios": ratios,
    }
    if torch.get_num_threads() == 1:
        cms = {k: _ms(v) for k, v in cpu.items()}
        out["cpu_ms"] = cms
        out["ratios_cpu"] = _train_ratios(cms, keeps)
    return out


def _train_ratios(ms: dict[str, float], keeps: Sequence[float]) -> dict[str, float]:
    ratios: dict[str, float] = {"sp_over_plain": ms["sp_masked"] / ms["plain"]}
    for keep in keeps:
        ratios[f"hrl_masked_over_routed@{keep:g}"] = ms[f"hrl_masked@{keep:g}"] / ms[f"hrl_routed@{keep:g}"]
        ratios[f"hrl_routed_over_plain@{keep:g}"] = ms[f"hrl_routed@{keep:g}"] / ms["plain"]
    return ratios


__all__ = [
    "bench_inference",
    "bench_train",
    "bias_set_model",
    "bisect_gate_bias",
    "calibrate_batchnorm",
    "calibrate_bn",
    "environment",
    "is_checkpoint",
    "load_bench_data",
    "load_subject",
    "random_decisions",
    "random_images",
    "set_threads",
    "split_pixels",
    "time_interleaved",
]
