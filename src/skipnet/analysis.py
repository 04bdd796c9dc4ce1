"""The numbers behind the skipping analyses (paper §4.2, Figs. 7-10, appendix Fig. 12) and the budget knob.

Pure functions turn the per-image decisions of an :class:`~skipnet.evaluate.EvalRecord` into the numbers of
each figure (skip ratio per block and per stage, per-class accuracy and median skipped blocks, the easiest
and hardest images, multi-scale deltas); a few helpers run a model (threshold sweep, multi-scale inputs,
threshold calibration).

Every threshold gets its own forward pass. With any gate a changed decision changes the input of every later
gate (and the recurrent gate's state as well), so gate probabilities recorded at one threshold do not tell
the decisions at another. For the same reason mean MACs need not be monotone in the threshold, for
feed-forward gates as much as for the recurrent gate; what *is* guaranteed is that, per image, the first
gate whose decision differs between two thresholds executes at the lower one (everything before it saw the
same input). Sweeps therefore report whether their MACs were monotone on the grid, and calibration picks
among the thresholds it has actually evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from skipnet.cost import CostModel, cost_model
from skipnet.data import DataBundle
from skipnet.errors import SkipnetError
from skipnet.evaluate import (  # noqa: F401 - the data helpers are re-exported for the commands
    EvalRecord,
    data_for_checkpoint,
    eval_loader,
    gates_spent,
    require_learned_gates,
    run_eval,
    summarize,
)
from skipnet.gated import GatedResNet, GateMode
from skipnet.policy import ALL_SKIP_THRESHOLD
from skipnet.routes import (  # noqa: F401 (re-exported)
    executed_blocks,
    route_stats,
    skip_ratio_per_block,
    skipped_blocks,
)
from skipnet.rundir import BEST, LAST
from skipnet.trainconfig import RL_STAGES

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95
CALIBRATION_GRID: tuple[float, ...] = (0.0, *DEFAULT_THRESHOLDS, 1.0)
DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.75, 1.25, 1.5)
FORCED_MODE = GateMode.RANDOM  # static_lesion's forced decisions: the mode that takes them, no gate computed


# ----------------------------------------------------------------------------------------- pure numbers
def skip_ratio_per_stage(decisions: Tensor, block_stage: Sequence[int]) -> list[float]:
    """Mean skip ratio (:func:`~skipnet.routes.skip_ratio_per_block`) over the gated blocks of each stage (stage
    order); NaN for a stage with no gated block."""
    ratios = skip_ratio_per_block(decisions)
    out = []
    for s in range(max(block_stage, default=-1) + 1):
        r = [ratios[i] for i, st in enumerate(block_stage) if st == s]
        out.append(sum(r) / len(r) if r else float("nan"))
    return out


def _median(values: Tensor) -> float:
    """The median of a 1-D tensor (the mean of the two middle values for an even count)."""
    return float(values.to(torch.float64).quantile(0.5)) if values.numel() else float("nan")


def per_class_stats(labels: Tensor, preds: Tensor, decisions: Tensor, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Per class: images, top-1 accuracy (%), median skipped blocks, mean executed blocks (Fig. 9a).

    Args:
        labels, preds: (M,) class indices.
        decisions: (M, N) 0/1 decisions.
        classes: class names; one entry per class index.
    """
    skipped = skipped_blocks(decisions)
    executed = executed_blocks(decisions)
    out = []
    for c, name in enumerate(classes):
        mask = labels == c
        n = int(mask.sum())
        out.append(
            {
                "class": c,
                "name": str(name),
                "images": n,
                "accuracy": 100.0 * (preds[mask] == c).double().mean().item() if n else float("nan"),
                "median_skipped": _median(skipped[mask]),
                "mean_executed": executed[mask].double().mean().item() if n else float("nan"),
            }
        )
    return out


def easiest_hardest_class(stats: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Indices (into ``stats``) of the classes with the highest and the lowest accuracy.

    Ties go to the class listed first, never to the one that skips more or less: the pair is compared by how much
    each skips (Fig. 9a), which a tie-break on skipping would decide. Classes without images are ignored.
    """
    seen = [i for i, s in enumerate(stats) if s["images"]]
    if not seen:
        raise ValueError("no class has any image")
    easy = max(seen, key=lambda i: (stats[i]["accuracy"], -i))
    hard = min(seen, key=lambda i: (stats[i]["accuracy"], i))
    return easy, hard


def easy_hard_indices(decisions: Tensor, k: int, probs: Tensor | None = None) -> tuple[list[int], list[int]]:
    """The ``k`` images executing the fewest blocks (easy) and the ``k`` executing the most (hard) (Fig. 7).

    Ties in the executed count are broken by the summed gate probabilities (lower = easier), then by index.
    Easy is ordered easiest first, hard hardest first.
    """
    m = decisions.shape[0]
    k = min(k, m)
    count = executed_blocks(decisions).tolist()
    tie = probs.to(torch.float64).sum(1).tolist() if probs is not None else [0.0] * m
    order = sorted(range(m), key=lambda i: (count[i], tie[i], i))
    return order[:k], order[::-1][:k]


def value_counts(values: Tensor, lo: int, hi: int) -> list[int]:
    """Counts of each integer ``lo..hi`` (inclusive) in ``values``."""
    v = values.long().flatten()
    return [int((v == i).sum()) for i in range(lo, hi + 1)]


def multiscale_deltas(reference: Tensor, scaled: Tensor) -> Tensor:
    """Per image: blocks executed at scale s minus blocks executed at scale 1, (M,) int64 (Fig. 8)."""
    if reference.shape != scaled.shape:
        raise ValueError(f"decision shapes differ: {tuple(reference.shape)} vs {tuple(scaled.shape)}")
    return executed_blocks(scaled) - executed_blocks(reference)


def is_non_increasing(values: Sequence[float], tol: float = 0.0) -> bool:
    """Whether ``values`` never rises by more than ``tol`` from one entry to the next."""
    return all(b <= a + tol for a, b in zip(values, values[1:]))


def eval_point(record: EvalRecord, cost: CostModel, num_classes: int) -> dict[str, Any]:
    """The headline numbers of one evaluation (accuracy, MACs, reduction, CP, executed blocks)."""
    s = summarize(record, cost, num_classes)
    keys = ("images", "accuracy", "macs_mean", "macs_all_on", "macs_reduction", "computation_percentage")
    return {k: s[k] for k in keys} | {"executed_blocks_mean": s["executed_blocks_mean"]}


# ------------------------------------------------------------------------------------ running a model
class ScaledLoader:
    """Wrap a loader of normalised images so that each batch is resized by ``scale`` (bilinear; antialiased
    when shrinking), keeping the memory format. Labels pass through unchanged."""

    def __init__(self, loader, scale: float) -> None:
        self.loader, self.scale = loader, scale

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            h, w = x.shape[-2:]
            size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
            z = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=self.scale < 1)
            yield z.contiguous(memory_format=torch.channels_last), y


def threshold_sweep(
    model: GatedResNet, loader, cost: CostModel, thresholds: Sequence[float]
) -> tuple[list[dict[str, Any]], dict[float, EvalRecord]]:
    """Greedy evaluation at each threshold, one forward pass each (ascending thresholds).

    Returns the points (threshold, accuracy, MACs, reduction, CP, executed blocks) and the records by threshold.
    """
    points, records = [], {}
    for t in sorted(set(float(t) for t in thresholds)):
        rec = run_eval(model, loader, cost, mode=GateMode.GREEDY, threshold=t)
        records[t] = rec
        points.append({"threshold": t} | eval_point(rec, cost, model.config.num_classes))
    return points, records


def multiscale(
    model: GatedResNet, loader, reference: EvalRecord, scales: Sequence[float], threshold: float | None = None
) -> tuple[list[dict[str, Any]], dict[float, Tensor]]:
    """Greedy evaluation of the split resized by each scale; per image delta of executed blocks vs scale 1.

    Returns per-scale numbers (image size, accuracy, MACs at that size, mean delta, counts of each delta from
    -N to N) and the per-image deltas by scale.
    """
    n = reference.decisions.shape[1]
    size = model.config.image_size
    rows, deltas = [], {}
    for s in scales:
        side = max(1, round(size * s))
        try:
            cost = cost_model(model, side)
            rec = run_eval(model, ScaledLoader(loader, s), cost, mode=GateMode.GREEDY, threshold=threshold)
        except RuntimeError as exc:  # an input too small for the network
            rows.append({"scale": s, "image_size": side, "error": str(exc).splitlines()[0]})
            continue
        d = multiscale_deltas(reference.decisions, rec.decisions)
        deltas[s] = d
        pt = eval_point(rec, cost, model.config.num_classes)
        rows.append(
            {
                "scale": s,
                "image_size": side,
                "accuracy": pt["accuracy"],
                "macs_mean": pt["macs_mean"],
                "executed_blocks_mean": pt["executed_blocks_mean"],
                "delta_mean": d.double().mean().item() if d.numel() else float("nan"),
                "delta_more": int((d > 0).sum()),
                "delta_fewer": int((d < 0).sum()),
                "delta_counts": dict(zip(range(-n, n + 1), value_counts(d, -n, n))),
            }
        )
    return rows, deltas


def gather_images(data: DataBundle, loader, indices: Sequence[int]) -> Tensor:
    """Display images (k, C, H, W) in [0, 1] for positions ``indices`` of an unshuffled evaluation loader."""
    if not indices:
        return torch.zeros(0, data.in_channels, data.image_size, data.image_size)
    if hasattr(loader, "images"):  # TensorLoader: uint8, not yet normalised
        idx = torch.as_tensor(list(indices))
        return data.denormalize(loader.normalize(loader.images[idx]))
    dataset = loader.dataset  # FolderLoader: normalised tensors, its pass without the images it could not read
    return data.denormalize(torch.stack([dataset[(0, _in_split(i, loader.dropped))][0] for i in indices]))


def _in_split(row: int, dropped: Sequence[int]) -> int:
    """The position in the split of an evaluation pass's ``row``, the pass having left out the images at the
    (ascending) positions ``dropped``."""
    for d in dropped:
        if d > row:
            break
        row += 1
    return row


# ------------------------------------------------------------------------------------------ the analysis
@dataclass
class Analysis:
    """Everything ``skipnet analyze`` draws and reports: JSON-able ``numbers`` plus the per-image tensors."""

    numbers: dict[str, Any]
    record: EvalRecord
    deltas: dict[float, Tensor] = field(default_factory=dict)
    easy_images: Tensor | None = None
    hard_images: Tensor | None = None


def analyze(
    model: GatedResNet,
    data: DataBundle,
    split: str,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    scales: Sequence[float] = DEFAULT_SCALES,
    k: int = 16,
) -> Analysis:
    """Evaluate a gated ``model`` greedily at its own threshold on ``split`` and compute every analysis."""
    require_learned_gates(model, model.config.name, "analyze")
    loader = eval_loader(data, split)
    cost = cost_model(model)
    record = run_eval(model, loader, cost, mode=GateMode.GREEDY)
    if len(record.labels) == 0:
        raise SkipnetError(f"the {split} split is empty")
    main = eval_point(record, cost, model.config.num_classes)
    n = model.num_gates
    classes = list(data.classes) if data.classes else [str(i) for i in range(model.config.num_classes)]
    stats = per_class_stats(record.labels, record.preds, record.decisions, classes)
    easy_c, hard_c = easiest_hardest_class(stats)
    easy, hard = easy_hard_indices(record.decisions, k, record.probs)
    executed = executed_blocks(record.decisions)
    sweep, _ = threshold_sweep(model, loader, cost, thresholds)
    ms_rows, deltas = multiscale(model, loader, record, scales)
    block_stage = list(model.block_stage)
    numbers: dict[str, Any] = {
        "arch": model.config.name,
        "split": split,
        "threshold": float(model.threshold),
        "num_gates": n,
        "block_stage": block_stage,
        "cost": _cost_numbers(cost),
        "main": main,
        "skip_ratio_per_block": skip_ratio_per_block(record.decisions),
        "skip_ratio_per_stage": skip_ratio_per_stage(record.decisions, block_stage),
        "routes": route_stats(record.decisions),
        "executed_blocks_counts": dict(zip(range(1, n + 2), value_counts(executed, 1, n + 1))),
        "per_class": stats,
        "easiest_class": stats[easy_c]["name"],
        "hardest_class": stats[hard_c]["name"],
        "easiest_class_executed_counts": value_counts(executed[record.labels == easy_c], 1, n + 1),
        "hardest_class_executed_counts": value_counts(executed[record.labels == hard_c], 1, n + 1),
        "easy_images": _image_rows(easy, executed, record.labels, classes),
        "hard_images": _image_rows(hard, executed, record.labels, classes),
        "threshold_sweep": sweep,
        "threshold_sweep_monotone": is_non_increasing([p["macs_mean"] for p in sweep]),
        "multiscale": ms_rows,
    }
    return Analysis(
        numbers=numbers,
        record=record,
        deltas=deltas,
        easy_images=gather_images(data, loader, easy),
        hard_images=gather_images(data, loader, hard),
    )


def _cost_numbers(cost: CostModel) -> dict[str, Any]:
    return {
        "macs_all_on": cost.total_macs_all_on,
        "fixed_macs": cost.fixed_macs,
        "gate_macs": cost.gate_macs_total,
        "min_macs": cost.min_macs,
        "image_size": cost.image_size,
    }


def _image_rows(indices: Sequence[int], executed: Tensor, labels: Tensor, classes: list[str]) -> list[dict]:
    """The shown images: index in the split, executed blocks, class name."""
    return [{"index": i, "executed": int(executed[i]), "label": classes[int(labels[i])]} for i in indices]


def checkpoint_label(path: str | Path, ckpt: dict[str, Any]) -> str:
    """A short label for a checkpoint: its run directory (or file stem), stage and, for RL stages, alpha."""
    p = Path(path)
    run = p.parent.name if p.name in (BEST, LAST) and p.parent.name else p.stem
    cfg = ckpt.get("train_config") or {}
    stage = ckpt.get("stage") or cfg.get("stage")
    parts = [run]
    if stage:
        parts.append(str(stage))
    if stage in RL_STAGES and cfg.get("alpha") is not None:
        parts.append(f"α={float(cfg['alpha']):g}")
    t = float(ckpt.get("threshold", 0.5))
    if ckpt.get("calibration") or abs(t - 0.5) > 1e-9:
        parts.append(f"t={t:.3g}")
    return " · ".join(parts)


# ------------------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    """The outcome of :func:`calibrate_threshold`; ``points`` holds every evaluated threshold (ascending)."""

    threshold: float
    accuracy: float
    macs_mean: float
    macs_reduction: float
    computation_percentage: float
    target_macs: float
    points: list[dict[str, Any]]
    monotone_on_grid: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def static_lesion(
    model: GatedResNet,
    select: Sequence[tuple[Tensor, Tensor]],
    cost: CostModel,
    *,
    max_drop: int,
    evaluate_on=None,
) -> list[dict[str, Any]]:
    """How much of a trained backbone can go without it, for every image alike (beyond the paper).

    A lesion study in the manner of Veit et al. (2016): greedily remove, one at a time, the gated block whose
    removal raises the mean cross-entropy on ``select`` (a list of ``(images, labels)`` batches, e.g. part of the
    validation split) the least, up to ``max_drop`` blocks. The same blocks are skipped for every image (forced
    decisions, routed execution, no gate computed), so this is the best *static* choice; a SkipNet, which chooses
    per image, has to beat it to save the same compute. Works for plain and gated networks alike.

    Returns one point per step, starting with nothing removed: ``dropped`` (the removed block indices),
    ``select_loss`` / ``select_accuracy`` (on ``select``), ``macs_reduction`` (%, the backbone's MACs without
    the gates) and, with ``evaluate_on`` (a loader), its ``accuracy``.
    """
    if model.num_gates == 0:
        raise SkipnetError(f"{model.config.name} has no gated block to remove")
    if not 0 <= max_drop <= model.num_gates:
        raise SkipnetError(f"max_drop must be in [0, {model.num_gates}], got {max_drop}")
    was_training = model.training
    model.eval()
    keep = torch.ones(1, model.num_gates)
    points: list[dict[str, Any]] = []
    try:
        for step in range(max_drop + 1):
            if step:  # remove the block that costs the least on ``select``
                trials = []
                for i in torch.nonzero(keep[0]).flatten().tolist():
                    trial = keep.clone()
                    trial[0, i] = 0.0
                    trials.append((*forced_run(model, select, trial), i))
                loss, acc, i = min(trials)
                keep[0, i] = 0.0
            else:
                loss, acc = forced_run(model, select, keep)
            macs = cost.macs_per_image(keep, include_gates=gates_spent(model, FORCED_MODE)).item()
            point = {
                "dropped": torch.nonzero(keep[0] == 0).flatten().tolist(),
                "select_loss": loss,
                "select_accuracy": acc,
                "macs_mean": macs,
                "macs_reduction": cost.reduction(macs),
            }
            if evaluate_on is not None:
                point["accuracy"] = forced_run(model, evaluate_on, keep)[1]
            points.append(point)
    finally:
        model.train(was_training)
    return points


@torch.no_grad()
def forced_run(model: GatedResNet, batches: Any, keep: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) over ``batches`` (``(images, labels)`` pairs: a list or a loader) with
    the blocks of ``keep`` (1, N) executed for every image: one static route (forced decisions, no gate computed).
    ``model`` in eval mode."""
    device = next(model.parameters()).device
    loss = correct = seen = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        decisions = keep.to(device).expand(x.shape[0], model.num_gates)
        logits = model(x, FORCED_MODE, decisions=decisions).logits.float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.shape[0]
    return loss / max(seen, 1), 100.0 * correct / max(seen, 1)


def _best_feasible(points: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    feasible = [p for p in points if p["macs_mean"] <= target]
    if not feasible:
        return None
    # The most accurate; among equals the cheapest, then the lowest threshold.
    return max(feasible, key=lambda p: (round(p["accuracy"], 9), -p["macs_mean"], -p["threshold"]))


def _midpoint(lo: float, hi: float) -> float:
    """The midpoint of two thresholds in logit space, the ends held 1e-6 inside [0, 1]: gate probabilities bunch up
    near 0 and 1, where an arithmetic bisection from the grid never comes closer than 1/2^refine of a grid step."""
    a, b = (min(max(t, 1e-6), 1.0 - 1e-6) for t in (lo, hi))
    z = 0.5 * (math.log(a / (1.0 - a)) + math.log(b / (1.0 - b)))
    return 1.0 / (1.0 + math.exp(-z))


ONE_SIDED_SPAN = 4.0  # logits kept between a one-ended gap's end and the threshold (gap_threshold)


def _logit(p: float) -> float | None:
    """``log(p / (1 - p))``, or ``None`` at 0 and 1 (no finite end)."""
    return math.log(p) - math.log1p(-p) if 0.0 < p < 1.0 else None


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def gap_threshold(probs: Tensor, t: float) -> float:
    """A threshold that takes the same greedy decisions ``1[p >= t]`` on the gate probabilities ``probs`` (any
    shape; every gate of every image) as ``t``, as far from each of them as it can be: the midpoint, in logit space,
    of the gap between the largest probability below ``t`` and the smallest at or above it, rounded to ``probs``'
    dtype (in which the gates compare). A gap with one end only (every probability on one side of ``t``, or an end
    at exactly 0 or 1) has no middle: ``t`` moves away from that end to :data:`ONE_SIDED_SPAN` logits from it where
    it was nearer, never toward it (so no block runs that ran at ``t`` above every probability, and none is
    skipped that ran at ``t`` below every one). Where rounding leaves nothing inside a gap (ends one float apart)
    ``t`` is kept; so is an all-skip ``t`` above 1."""
    p = probs.detach().flatten()
    if t > 1.0 or p.numel() == 0:
        return t
    at = torch.tensor(t, dtype=p.dtype)
    below, above = p[p < at], p[p >= at]
    lo = float(below.max()) if below.numel() else None
    hi = float(above.min()) if above.numel() else None
    z_lo, z_hi = (_logit(v) if v is not None else None for v in (lo, hi))
    if z_lo is not None and z_hi is not None:
        candidate = _sigmoid(0.5 * (z_lo + z_hi))
    elif z_hi is not None:  # nothing (or only exact zeros) below t: keep below hi
        candidate = min(t, _sigmoid(z_hi - ONE_SIDED_SPAN))
    elif z_lo is not None:  # nothing (or only exact ones) at or above t: keep above lo
        candidate = max(t, _sigmoid(z_lo + ONE_SIDED_SPAN))
    else:  # only exact zeros and ones
        candidate = 0.5
    arithmetic = 0.5 * ((lo or 0.0) + (1.0 if hi is None else hi))
    for value in (candidate, arithmetic):
        c = float(torch.tensor(value, dtype=p.dtype))
        if (lo is None or c > lo) and (hi is None or c <= hi) and 0.0 <= c <= 1.0:
            return c
    return t


def _snap(model: GatedResNet, loader, cost: CostModel, t: float, snapped: float, decisions: Tensor) -> dict[str, Any]:
    """The point at ``snapped``, the threshold ``t`` moved into the middle of its gap (:func:`gap_threshold` of the
    run at ``t``, which took ``decisions``). The run there must take the very same decisions (so the same MACs and
    classes), else :class:`AssertionError`."""
    again = run_eval(model, loader, cost, mode=GateMode.GREEDY, threshold=snapped)
    if not torch.equal(again.decisions.bool(), decisions):
        raise AssertionError(f"threshold {snapped!r}, inside the gap around {t!r}, changed decisions")
    return {"threshold": snapped} | eval_point(again, cost, model.config.num_classes)


def _bisect_edges(points: dict[float, Any], grid_pts: list[dict], target: float, refine: int, evaluate_at) -> None:
    """Bisect ``refine`` times (in logit space) between every pair of neighbouring grid points where the lower
    threshold misses the budget ``target`` and the higher one meets it, adding each evaluated point to ``points``."""
    for lo_p, hi_p in zip(grid_pts, grid_pts[1:]):
        if not (lo_p["macs_mean"] > target >= hi_p["macs_mean"]):
            continue
        lo, hi = lo_p["threshold"], hi_p["threshold"]
        for _ in range(refine):
            mid = _midpoint(lo, hi)
            points[mid] = p = evaluate_at(mid)
            if p["macs_mean"] <= target:
                hi = mid
            else:
                lo = mid


def _search(grid: Sequence[float], target: float, refine: int, evaluate_at) -> tuple[dict[float, Any], bool]:
    """Every point :func:`calibrate_threshold` evaluates, by threshold, and whether the grid's MACs were monotone:
    the grid, the bisections at its budget edges, above the grid towards 1 when no grid point meets the budget,
    and the all-skip point when nothing below it does."""
    points = {float(t): evaluate_at(float(t)) for t in sorted(set(grid))}
    grid_pts = [points[t] for t in sorted(points)]
    monotone = is_non_increasing([p["macs_mean"] for p in grid_pts])
    _bisect_edges(points, grid_pts, target, refine, evaluate_at)
    if _best_feasible(list(points.values()), target) is None and 1.0 not in points:
        points[1.0] = evaluate_at(1.0)  # the budget may lie above the grid: bisect towards 1 before all-skip
        _bisect_edges(points, [grid_pts[-1], points[1.0]], target, refine, evaluate_at)
    if _best_feasible(list(points.values()), target) is None:
        points[ALL_SKIP_THRESHOLD] = evaluate_at(ALL_SKIP_THRESHOLD)
    return points, monotone


def calibrate_threshold(
    model: GatedResNet,
    loader,
    cost: CostModel,
    target_macs: float,
    *,
    grid: Sequence[float] = CALIBRATION_GRID,
    refine: int = 4,
) -> Calibration:
    """The greedy threshold with mean MACs (gates included) ``<= target_macs`` and the best accuracy on ``loader``.

    Evaluates ``grid``; then, between every pair of neighbouring grid thresholds where the lower one misses
    the budget and the higher one meets it, bisects ``refine`` times (the budget is usually met most
    accurately right at its edge). MACs are not assumed monotone in the threshold (see the module docstring):
    the choice is among all evaluated thresholds that meet the budget, and ``monotone_on_grid`` says whether
    the grid was monotone. If no grid threshold meets the budget, 1 is tried and, if it does, bisected towards from
    the grid's highest threshold; if it does not either, ``ALL_SKIP_THRESHOLD`` (no gated block
    runs) is tried; a budget below that cost raises :class:`SkipnetError`.

    The chosen threshold is then moved into the middle of its gap (:func:`gap_threshold`, :func:`_snap`):
    bisection lands it within about 1e-7 of a gate probability, where another batch size or runtime, whose
    probabilities differ in the last bits, would decide otherwise. Every threshold in the open gap between the
    largest probability below it and the smallest at or above it (every gate and image of the run at it; greedy
    executes where ``p >= t``) takes the same decisions, also for the recurrent gate: the same decisions up to a
    gate give it the same input and state, hence the same probability (induction over the gates). The run there
    must take exactly the same decisions (else :class:`AssertionError`), hence MACs and classes; it joins ``points``."""
    floor = cost.min_macs
    if target_macs < floor:
        raise SkipnetError(
            f"target of {target_macs:.4g} MACs/image is below the least this network can spend "
            f"({floor:.4g}: stem, first block, shortcuts, head and gates)"
        )
    nc = model.config.num_classes
    gaps: dict[float, tuple[float, Tensor]] = {}  # threshold -> (the middle of its gap, the decisions taken there)

    def evaluate_at(t: float) -> dict[str, Any]:
        rec = run_eval(model, loader, cost, mode=GateMode.GREEDY, threshold=t)
        gaps[t] = (gap_threshold(rec.probs, t), rec.decisions.bool())  # bool: 1 byte a decision
        return {"threshold": t} | eval_point(rec, cost, nc)

    points, monotone = _search(grid, target_macs, refine, evaluate_at)
    best = _best_feasible(list(points.values()), target_macs)
    if best is None:  # not reachable: all-skip costs exactly the floor checked above
        raise SkipnetError(f"no threshold meets {target_macs:.4g} MACs/image")
    snapped, decisions = gaps[best["threshold"]]
    if snapped != best["threshold"]:
        best = points[snapped] = _snap(model, loader, cost, best["threshold"], snapped, decisions)
    return Calibration(
        threshold=best["threshold"],
        accuracy=best["accuracy"],
        macs_mean=best["macs_mean"],
        macs_reduction=best["macs_reduction"],
        computation_percentage=best["computation_percentage"],
        target_macs=float(target_macs),
        points=[points[t] for t in sorted(points)],
        monotone_on_grid=monotone,
    )


# ------------------------------------------------------------------------------------------ the report
def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def report_markdown(numbers: dict[str, Any], figures: dict[str, str], title: str) -> str:
    """``report.md`` of ``skipnet analyze``: the key numbers and the figures (``figures``: file -> caption)."""
    lines = [f"# {title}", ""]
    meta, m = numbers.get("checkpoint", {}), numbers["main"]
    if meta:
        lines += [
            f"Checkpoint `{meta.get('path')}` ({numbers['arch']}, stage {meta.get('stage') or '?'}"
            + (f", α = {meta['alpha']:g}" if meta.get("alpha") is not None else "")
            + f"), data `{meta.get('data')}` {numbers['split']} split, {m['images']} images, "
            f"greedy gates at threshold {numbers['threshold']:.3g}.",
            "",
        ]
    lines += _key_numbers(numbers)
    others = numbers.get("others", [])
    if others:
        lines += ["## Other checkpoints on the same split", "", "| checkpoint | accuracy | MACs/image | reduction |"]
        lines += ["|---|---|---|---|"]
        for o in others:
            lines.append(f"| {o['label']} | {o['accuracy']:.2f}% | {o['macs_mean']:.4g} | {o['macs_reduction']:.1f}% |")
        lines.append("")
    lines += _sweep_and_scales(numbers)
    lines += ["", "## Figures", ""]
    for name, caption in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(lines)


def _key_numbers(numbers: dict[str, Any]) -> list[str]:
    """The report's first table: accuracy, cost, routes and the easiest and hardest class."""
    m, c, r = numbers["main"], numbers["cost"], numbers["routes"]
    stages = ", ".join(f"stage {i + 1}: {100 * q:.1f}%" for i, q in enumerate(numbers["skip_ratio_per_stage"]))
    per_class = {s["name"]: s for s in numbers["per_class"]}
    easy, hard = per_class[numbers["easiest_class"]], per_class[numbers["hardest_class"]]
    base = numbers.get("base")
    return [
        "| quantity | value |",
        "|---|---|",
        f"| top-1 accuracy | {m['accuracy']:.2f}% |",
        f"| MACs per image (gates included) | {m['macs_mean']:,.0f} |",
        f"| plain ResNet MACs per image | {c['macs_all_on']:,.0f} |",
        f"| MACs reduction vs plain ResNet | {m['macs_reduction']:.1f}% |",
        *([f"| accuracy vs --base ({base['label']}) | {m['accuracy_vs_base']:+.2f} points |"] if base else []),
        f"| computation percentage (authors' CP) | {m['computation_percentage']:.1f}% |",
        f"| gate MACs per image | {c['gate_macs']:,.0f} |",
        f"| executed blocks per image (mean, of {numbers['num_gates'] + 1}) | {m['executed_blocks_mean']:.2f} |",
        f"| skip ratio per stage (its gated blocks) | {stages} |",
        f"| distinct routes (images on the most common) | {r['distinct_routes']} ({100 * r['top_route_share']:.1f}%) |",
        f"| std of executed blocks per image | {r['executed_std']:.2f} |",
        f"| easiest class (highest accuracy) | {easy['name']}: {easy['accuracy']:.1f}%, "
        f"median {_fmt(easy['median_skipped'], '.1f')} blocks skipped |",
        f"| hardest class (lowest accuracy) | {hard['name']}: {hard['accuracy']:.1f}%, "
        f"median {_fmt(hard['median_skipped'], '.1f')} blocks skipped |",
        "",
    ]


def _sweep_and_scales(numbers: dict[str, Any]) -> list[str]:
    """The threshold sweep's and the multi-scale inputs' tables."""
    mono = "monotone" if numbers["threshold_sweep_monotone"] else "**not** monotone"
    lines = [
        "## Threshold sweep",
        "",
        f"One greedy forward pass per threshold; MACs were {mono} non-increasing in the threshold on this grid.",
        "",
        "| threshold | accuracy | MACs/image | reduction | CP |",
        "|---|---|---|---|---|",
    ]
    for p in numbers["threshold_sweep"]:
        lines.append(
            f"| {p['threshold']:.3g} | {p['accuracy']:.2f}% | {p['macs_mean']:.4g} | {p['macs_reduction']:.1f}% "
            f"| {p['computation_percentage']:.1f}% |"
        )
    lines += ["", "## Multi-scale inputs", "", "| scale | size | accuracy | executed blocks | Δ blocks vs scale 1 |"]
    lines += ["|---|---|---|---|---|"]
    for r in numbers["multiscale"]:
        if "error" in r:
            lines.append(f"| {r['scale']:g} | {r['image_size']} | – | – | failed: {r['error']} |")
        else:
            lines.append(
                f"| {r['scale']:g} | {r['image_size']} | {r['accuracy']:.2f}% | {r['executed_blocks_mean']:.2f} "
                f"| {r['delta_mean']:+.2f} (more: {r['delta_more']}, fewer: {r['delta_fewer']}) |"
            )
    return lines
