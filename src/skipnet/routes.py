"""How often the gates skip and how per-image a policy is, from the (M, N) 0/1 decisions of an evaluation.

The skip ratio, per gated block and overall, has its one home here (:func:`skip_ratio_per_block`,
:func:`skip_ratio`). The rest tells how per-image the routes are: distinct routes, the share of the most common one,
the spread of the blocks executed, whether wrong predictions execute more than right ones (the paper's Fig. 1/7:
hard images take more computation) and whether harder classes execute more (Fig. 9a: the Spearman correlation, over
classes, of the median blocks executed with the class accuracy).

Pure functions of tensors; ``skipnet eval --json`` reports :func:`route_summary` under ``"routes"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def executed_blocks(decisions: Tensor) -> Tensor:
    """Residual blocks executed per image, (M,) int64, from (M, N) decisions; the always-run first block counts."""
    return 1 + decisions.round().long().sum(1)


def skipped_blocks(decisions: Tensor) -> Tensor:
    """Gated blocks skipped per image, (M,) int64, from (M, N) decisions."""
    return decisions.shape[1] - decisions.round().long().sum(1)


def skip_ratio_per_block(decisions: Tensor) -> list[float]:
    """Fraction of the images that skip each gated block, ``1 - mean(decisions, 0)`` in float64, length N (Fig. 10a);
    NaN for every block when there is no image (nothing was decided). Unrounded: a report rounds it where it writes
    it."""
    if decisions.shape[0] == 0:
        return [math.nan] * decisions.shape[1]
    return (1.0 - decisions.to(torch.float64).mean(0)).tolist()


def skip_ratio(executed_mean: float, num_gates: int) -> float:
    """The overall skip ratio, the fraction of the N gated blocks skipped on average, from the mean blocks executed
    per image (:func:`executed_blocks`, the always-run first block counted; what a summary keeps):
    ``1 - (executed_mean - 1) / N``, the mean of :func:`skip_ratio_per_block` over the blocks. NaN for NaN (no
    image); 0.0 for a network without a gated block (nothing can be skipped)."""
    if num_gates == 0:
        return 0.0
    return 1.0 - (executed_mean - 1.0) / num_gates


def route_stats(decisions: Tensor) -> dict[str, Any]:
    """The number of distinct routes (0/1 decision patterns) over the (M, N) decisions, the share of images on
    the most common one (1.0: a static network), and the standard deviation of the blocks executed per image."""
    if decisions.shape[0] == 0:
        return {"distinct_routes": 0, "top_route_share": math.nan, "executed_std": math.nan}
    routes, counts = torch.unique(decisions.round().to(torch.uint8), dim=0, return_counts=True)
    executed = executed_blocks(decisions).to(torch.float64)
    return {
        "distinct_routes": int(routes.shape[0]),
        "top_route_share": float(counts.max()) / decisions.shape[0],
        "executed_std": float(executed.std(unbiased=False)),
    }


def _ranks(values: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank."""
    v = values.to(torch.float64)
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
    for value in torch.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (Pearson's of their average ranks); NaN when either is
    constant or has fewer than two values."""
    if a.numel() < 2 or a.numel() != b.numel():
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def _mean(values: Tensor) -> float:
    return float(values.to(torch.float64).mean()) if values.numel() else math.nan


def route_summary(decisions: Tensor, labels: Tensor, preds: Tensor) -> dict[str, Any]:
    """:func:`route_stats` plus the blocks executed by right and wrong predictions, and the per-class Spearman
    correlations of the median (and mean) blocks executed with the class accuracy (classes with images only).
    Undefined figures (no wrong prediction, a constant) are ``None``."""
    out = route_stats(decisions)
    executed = executed_blocks(decisions)
    right = preds == labels
    out["executed_mean_correct"] = _mean(executed[right])
    out["executed_mean_wrong"] = _mean(executed[~right])
    classes = [c for c in torch.unique(labels).tolist()]
    acc = torch.tensor([_mean(right[labels == c].double()) for c in classes], dtype=torch.float64)
    med = torch.tensor([float(executed[labels == c].double().quantile(0.5)) for c in classes], dtype=torch.float64)
    mean = torch.tensor([_mean(executed[labels == c]) for c in classes], dtype=torch.float64)
    out["class_spearman_median"] = spearman(med, acc)
    out["class_spearman_mean"] = spearman(mean, acc)
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}  # JSON-safe


__all__ = [
    "executed_blocks",
    "route_stats",
    "route_summary",
    "skip_ratio",
    "skip_ratio_per_block",
    "skipped_blocks",
    "spearman",
]
