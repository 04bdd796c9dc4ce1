"""Figures of the skipping analyses (paper Figs. 7-10 and 12), drawn with matplotlib's Agg canvas.

Each function takes the numbers computed in :mod:`skipnet.analysis` and writes one PNG. Figures are built
with the object-oriented API (``matplotlib.figure.Figure``), which renders through Agg without touching
pyplot's global state or needing a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from skipnet.cost import macs_at_reduction, macs_reduction

STAGE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
# Labelled checkpoints: no red (this checkpoint's star) and no black (the plain ResNet).
OTHER_COLORS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
DPI = 130


def macs_unit(value: float) -> tuple[float, str]:
    """A divisor and unit name that keep ``value`` MACs readable (GMACs, MMACs or kMACs)."""
    for div, name in ((1e9, "GMACs"), (1e6, "MMACs"), (1e3, "kMACs")):
        if value >= div:
            return div, name
    return 1.0, "MACs"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _other_points(ax: Any, others: Sequence[tuple[str, dict[str, Any]]], div: float, connect: bool) -> None:
    """Labelled diamonds (``others``), joined by a line in their order when ``connect``."""
    if connect:
        ax.plot([p["macs_mean"] / div for _, p in others], [p["accuracy"] for _, p in others], "-", color="0.6")
    for i, (label, p) in enumerate(others):
        color = OTHER_COLORS[i % len(OTHER_COLORS)]
        x, y = p["macs_mean"] / div, p["accuracy"]
        ax.plot(x, y, "D", color=color, ms=7, label=label, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7, color=color)


def plot_tradeoff(
    path: str | Path,
    *,
    macs_all_on: float,
    sweep: Sequence[dict[str, Any]] = (),
    sweep_label: str = "threshold sweep",
    own: dict[str, Any] | None = None,
    own_label: str = "this checkpoint",
    base: dict[str, Any] | None = None,
    base_label: str = "plain ResNet",
    others: Sequence[tuple[str, dict[str, Any]]] = (),
    connect_others: bool = False,
    title: str = "Accuracy vs computation",
) -> Path:
    """Top-1 accuracy vs mean MACs per image (paper Fig. 12).

    Args:
        sweep: points with ``threshold``, ``macs_mean``, ``accuracy`` (a line, thresholds annotated).
        own: the checkpoint at its own threshold (a star).
        base: the plain ResNet (a square).
        others: labelled points (diamonds), e.g. other checkpoints or the alphas of a sweep.
        connect_others: draw a line through ``others`` in the given order.
    """
    pts = [*sweep, *([own] if own else []), *([base] if base else []), *(p for _, p in others)]
    div, unit = macs_unit(max([macs_all_on, *(p["macs_mean"] for p in pts)]))
    fig = Figure(figsize=(7.5, 5.2))
    ax = fig.add_subplot()
    if sweep:
        _sweep_line(ax, sweep, div, sweep_label)
    if others:
        _other_points(ax, others, div, connect_others)
    if own:
        ax.plot(own["macs_mean"] / div, own["accuracy"], "*", color="#d62728", ms=15, label=own_label, zorder=4)
    if base:
        ax.plot(base["macs_mean"] / div, base["accuracy"], "s", color="black", ms=8, label=base_label, zorder=4)
    ax.axvline(macs_all_on / div, color="0.5", ls=":", lw=1)
    ax.text(macs_all_on / div, 0.98, "all blocks ", transform=ax.get_xaxis_transform(), fontsize=8, color="0.4")
    ax.texts[-1].set(ha="right", va="top")
    ax.set_xlabel(f"mean computation per image ({unit}, gates included)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, 0.0), max(hi, macs_all_on / div * 1.05))
    secondary = ax.secondary_xaxis(
        "top",
        functions=(
            lambda m: macs_reduction(m * div, macs_all_on),
            lambda r: macs_at_reduction(r, macs_all_on) / div,
        ),
    )
    secondary.set_xlabel("MACs reduction vs plain ResNet (%)")
    return _save(fig, path)


def _sweep_line(ax: Any, sweep: Sequence[dict[str, Any]], div: float, label: str) -> None:
    """The threshold sweep as a line, each distinct point labelled with its threshold(s) where there is room."""
    xs = [p["macs_mean"] / div for p in sweep]
    ys = [p["accuracy"] for p in sweep]
    ax.plot(xs, ys, "o-", color="#1f77b4", ms=4, lw=1.5, label=label, zorder=2)
    # Neighbouring thresholds often give the same point: one label per distinct point, naming its range.
    groups: list[list[dict[str, Any]]] = []
    for p in sweep:
        if groups and (groups[-1][0]["macs_mean"], groups[-1][0]["accuracy"]) == (p["macs_mean"], p["accuracy"]):
            groups[-1].append(p)
        else:
            groups.append([p])
    # Label the ends, then any point far enough (in axis fractions) from the labelled ones.
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    labelled: list[tuple[float, float]] = []
    order = [0, len(groups) - 1, *range(1, len(groups) - 1)] if len(groups) > 1 else [0]
    for i in order:
        grp = groups[i]
        u, v = grp[0]["macs_mean"] / div / span_x, grp[0]["accuracy"] / span_y
        if any(math.hypot(u - a, v - b) < 0.09 for a, b in labelled):
            continue
        labelled.append((u, v))
        lo, hi = grp[0]["threshold"], grp[-1]["threshold"]
        text = f"t={lo:.2g}" if lo == hi else f"t={lo:.2g}–{hi:.2g}"
        ax.annotate(
            text,
            (grp[0]["macs_mean"] / div, grp[0]["accuracy"]),
            textcoords="offset points",
            xytext=(4, -11),
            fontsize=7,
            color="#1f77b4",
        )


def plot_skip_ratio_per_block(
    path: str | Path, ratios: Sequence[float], block_stage: Sequence[int], title: str = "Skip ratio per block"
) -> Path:
    """Bars of the fraction of images skipping each gated block, coloured by stage (paper Fig. 10a)."""
    n = len(ratios)
    fig = Figure(figsize=(max(6.0, min(16.0, 0.28 * n + 3)), 4.2))
    ax = fig.add_subplot()
    xs = list(range(1, n + 1))
    colors = [STAGE_COLORS[s % len(STAGE_COLORS)] for s in block_stage]
    bars = ax.bar(xs, [100 * r for r in ratios], color=colors, width=0.8, edgecolor="white", lw=0.5)
    if n <= 20:
        ax.bar_label(bars, labels=[f"{100 * r:.0f}" for r in ratios], fontsize=7, padding=1)
    for s in sorted(set(block_stage)):
        idx = [i for i, st in enumerate(block_stage) if st == s]
        mean = 100 * sum(ratios[i] for i in idx) / len(idx)
        ax.bar([0], [0], color=STAGE_COLORS[s % len(STAGE_COLORS)], label=f"stage {s + 1} (mean {mean:.0f}%)")
        ax.hlines(mean, idx[0] + 0.6, idx[-1] + 1.4, color=STAGE_COLORS[s % len(STAGE_COLORS)], ls="--", lw=1)
    ax.set_xlim(0.3, n + 0.7)
    ax.set_ylim(0, 105)
    ax.set_xlabel("gated residual block (block 0 always runs)")
    ax.set_ylabel("images that skip the block (%)")
    if n <= 40:
        ax.set_xticks(xs)
        ax.tick_params(axis="x", labelsize=7 if n > 20 else 9)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def _image_grid(fig: Figure, spec, images: Tensor, captions: Sequence[str], heading: str) -> None:
    k = images.shape[0]
    cols = max(1, math.ceil(math.sqrt(k)))
    rows = max(1, math.ceil(k / cols))
    sub = spec.subgridspec(rows, cols, wspace=0.08, hspace=0.45)
    gray = images.shape[1] == 1
    for i in range(rows * cols):
        ax = fig.add_subplot(sub[i // cols, i % cols])
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        img = images[i].permute(1, 2, 0).numpy()
        if gray:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_title(captions[i], fontsize=7, pad=2)
    # heading above the grid, centred on its subplot spec
    bbox = spec.get_position(fig)
    fig.text((bbox.x0 + bbox.x1) / 2, bbox.y1 + 0.035, heading, ha="center", va="bottom", fontsize=11)


def plot_easy_hard(
    path: str | Path,
    easy: Tensor,
    easy_items: Sequence[dict[str, Any]],
    hard: Tensor,
    hard_items: Sequence[dict[str, Any]],
    total_blocks: int,
    title: str = "Easy and hard images",
) -> Path:
    """Grids of the images executing the fewest and the most blocks (paper Fig. 7), images in [0, 1]."""
    fig = Figure(figsize=(11, 6.2))
    gs = fig.add_gridspec(1, 2, wspace=0.12, top=0.86)
    cap = [f"{it['executed']}/{total_blocks} · {it['label']}" for it in easy_items]
    _image_grid(fig, gs[0, 0], easy, cap, "easy: fewest blocks executed")
    cap = [f"{it['executed']}/{total_blocks} · {it['label']}" for it in hard_items]
    _image_grid(fig, gs[0, 1], hard, cap, "hard: most blocks executed")
    fig.suptitle(f"{title}\n(caption: executed blocks / {total_blocks} · true class)", fontsize=12, y=0.995)
    return _save(fig, path)


def plot_per_class(
    path: str | Path,
    stats: Sequence[dict[str, Any]],
    easy_name: str,
    easy_counts: Sequence[int],
    hard_name: str,
    hard_counts: Sequence[int],
    title: str = "Skipping and accuracy per class",
) -> Path:
    """(a) median skipped blocks vs accuracy per class; (b) executed-block distributions of the easiest and
    hardest class (paper Fig. 9). ``*_counts[j]`` is the number of images executing ``j + 1`` blocks."""
    fig = Figure(figsize=(13, 4.8))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    _class_scatter(ax, [s for s in stats if s["images"]], (easy_name, hard_name))
    _easy_hard_bars(bx, (easy_name, easy_counts), (hard_name, hard_counts))
    fig.suptitle(title, fontsize=12)
    fig.subplots_adjust(wspace=0.25, top=0.85)
    return _save(fig, path)


def _class_scatter(ax: Any, shown: Sequence[dict[str, Any]], named: tuple[str, str]) -> None:
    """Fig. 9a: each class's median skipped blocks against its accuracy (all labelled up to 20 classes, else
    the easiest and hardest only)."""
    xs = [s["median_skipped"] for s in shown]
    ys = [s["accuracy"] for s in shown]
    ax.scatter(xs, ys, s=28, color="#1f77b4", zorder=3)
    many = len(shown) > 20
    y_span = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for s in sorted(shown, key=lambda s: (s["median_skipped"], s["accuracy"])):
        if many and s["name"] not in named:
            continue
        x, y = s["median_skipped"], s["accuracy"]
        # A label close above another one at the same median goes to the left of its point.
        crowded = any(px == x and abs(py - y) < 0.04 * y_span for px, py in placed)
        placed.append((x, y))
        ax.annotate(
            s["name"],
            (x, y),
            textcoords="offset points",
            xytext=(-4, 3) if crowded else (4, 3),
            ha="right" if crowded else "left",
            fontsize=8,
        )
    ax.set_xlabel("median skipped blocks per image")
    ax.set_ylabel("class top-1 accuracy (%)")
    ax.set_title("(a) median skipped blocks vs class accuracy")
    ax.grid(alpha=0.3)
    if xs and max(xs) - min(xs) < 2:  # keep a readable x range when the medians hardly differ
        mid = (max(xs) + min(xs)) / 2
        ax.set_xlim(mid - 1.25, mid + 1.25)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, steps=[1, 2, 5, 10]))  # medians are multiples of 0.5


def _easy_hard_bars(bx: Any, easy: tuple[str, Sequence[int]], hard: tuple[str, Sequence[int]]) -> None:
    """Fig. 9b: the executed-block distributions of the easiest and the hardest class, side by side."""
    easy_counts, hard_counts = easy[1], hard[1]
    total = len(easy_counts)
    blocks = list(range(1, total + 1))

    def frac(c: Sequence[int]) -> list[float]:
        n = max(1, sum(c))
        return [100.0 * v / n for v in c]

    w = 0.4
    sides = ((-w / 2, easy, "#2ca02c", "easiest"), (w / 2, hard, "#d62728", "hardest"))
    for shift, (name, counts), color, kind in sides:
        label = f"{kind}: {name} ({sum(counts)} images)"
        bx.bar([b + shift for b in blocks], frac(counts), width=w, color=color, label=label)
    used = [b for b, e, h in zip(blocks, easy_counts, hard_counts) if e or h]
    if used:
        bx.set_xlim(min(used) - 1, max(used) + 1)
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    bx.set_xlabel(f"executed residual blocks per image (of {total})")
    bx.set_ylabel("images of the class (%)")
    bx.set_title("(b) executed blocks: easiest vs hardest class")
    bx.grid(axis="y", alpha=0.3)
    bx.legend(fontsize=8)


def plot_multiscale(path: str | Path, rows: Sequence[dict[str, Any]], title: str = "Multi-scale inputs") -> Path:
    """Per scale, the distribution of (executed blocks at scale s - at scale 1) over images (paper Fig. 8)."""
    ok = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    k = max(1, len(ok))
    fig = Figure(figsize=(3.4 * k + 0.5, 3.9))
    axes = fig.subplots(1, k, sharey=True, squeeze=False)[0]
    span = 1
    for r in ok:
        nz = [int(d) for d, c in r["delta_counts"].items() if c]
        span = max(span, *(abs(d) for d in nz)) if nz else span
    for ax, r in zip(axes, ok):
        counts = {int(d): c for d, c in r["delta_counts"].items()}
        n = max(1, sum(counts.values()))
        ds = list(range(-span, span + 1))
        colors = ["#1f77b4" if d < 0 else ("0.5" if d == 0 else "#d62728") for d in ds]
        ax.bar(ds, [100.0 * counts.get(d, 0) / n for d in ds], color=colors, width=0.85)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(
            f"scale {r['scale']:g} ({r['image_size']} px)\nmean Δ {r['delta_mean']:+.2f}, acc {r['accuracy']:.1f}%",
            fontsize=9,
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("images (%)")
    if not ok:
        axes[0].text(0.5, 0.5, "no scale could be evaluated", ha="center", va="center", transform=axes[0].transAxes)
    note = "; ".join(f"scale {r['scale']:g} failed" for r in failed)
    fig.supxlabel("executed blocks at scale s − executed blocks at scale 1 (per image)", fontsize=10)
    fig.suptitle(title + (f" ({note})" if note else ""), fontsize=12)
    fig.subplots_adjust(top=0.78, bottom=0.16, wspace=0.08)
    return _save(fig, path)


def plot_executed_hist(
    path: str | Path, counts: Sequence[int], title: str = "Executed blocks per image", mean: float | None = None
) -> Path:
    """Histogram of executed residual blocks per image; ``counts[j]`` images executed ``j + 1`` blocks."""
    total = len(counts)
    n = max(1, sum(counts))
    blocks = list(range(1, total + 1))
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    ax.bar(blocks, [100.0 * c / n for c in counts], color="#1f77b4", width=0.85)
    if mean is not None:
        ax.axvline(mean, color="#d62728", ls="--", lw=1.2, label=f"mean {mean:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlim(0.3, total + 0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"executed residual blocks per image (of {total}; block 0 always runs)")
    ax.set_ylabel(f"images (%, of {sum(counts)})")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
