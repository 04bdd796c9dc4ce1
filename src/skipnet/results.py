"""Result rows of experiments, shared by the benchmark scripts: the figures reported for one test evaluation,
the rows recorded in a results file (kept for runs whose directories are not on this machine), the headline
pick, the plain networks' frontier, the static lesion curve and the tables built from them.

A benchmark script declares its runs (:mod:`skipnet.experiments`), collects rows with these helpers and writes
its own tables; ``--no-train`` rebuilds its committed results from the recorded rows alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skipnet.experiments import Result, Run, Runner
from skipnet.rundir import BEST

Row = dict[str, Any]
# calibration thresholds: calibrate's own spacing plus low ones (the gates of longer HRL runs are confident, so a
# 30% budget is crossed between 0 and 0.1)
GRID = ("0", "0.005", "0.01", "0.02", "0.03", "0.04", "0.05", "0.06", "0.08", "0.1", "0.15")
GRID += ("0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9")
# the skip ratio per block in a results row: the precision of every committed row (summarize reports 6 digits)
RESULTS_SKIP_DIGITS = 4


def portable(cmd: Sequence[str] | str, root: Path) -> str:
    """A command line as recorded in results: paths inside ``root`` (the repository) relative to it, those beside
    it as ``../...`` (no absolute path of the machine that ran it)."""
    text = cmd if isinstance(cmd, str) else shlex.join(cmd)
    return text.replace(f"{root}/", "").replace(f"{root.parent}/", "../")


def option(args: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` in a run's arguments (the last one), or None."""
    found = None
    for i, a in enumerate(args[:-1]):
        if a == flag:
            found = args[i + 1]
    return found


def test_fields(t: dict[str, Any]) -> Row:
    """The reported figures of one test evaluation (``summary.json``'s or ``skipnet eval --json``'s ``test``)."""
    return {
        "accuracy": round(t["accuracy"], 2),
        "macs": t["macs_mean"],
        "macs_all_on": t["macs_all_on"],
        "macs_reduction": round(t["macs_reduction"], 2),
        "computation_percentage": round(t["computation_percentage"], 2),
    }


def recorded(path: Path, key: str = "runs", name: str = "name") -> dict[str, Row]:
    """The rows of a results file as last written (by ``name``, in their order); empty if there is none."""
    if not path.exists():
        return {}
    return {r[name]: r for r in json.loads(path.read_text()).get(key) or []}


def with_recorded(got: dict[str, Row], path: Path, key: str = "runs", name: str = "name") -> dict[str, Row]:
    """``got`` plus the rows of the results file ``path`` whose runs were not collected here: run directories are
    not kept, so collecting new runs must not drop the rows of earlier ones. Rows keep their recorded order; new
    ones follow."""
    merged = {n: got.get(n, r) for n, r in recorded(path, key, name).items()}
    return merged | {k: v for k, v in got.items() if k not in merged}


def pick_headline(pairs: Sequence[tuple[Row, Row]], budget: float = 30, tolerance: float = 0.5):
    """The headline's pick among ``(row, its plain network's row)`` pairs: the largest saving among those within
    ``tolerance`` points of their plain network at >= ``budget``% fewer MACs; failing that, the one closest to its
    plain network among those saving >= ``budget``%; failing that, the one saving the most. Returns ``(row, plain
    row, reproduced)`` or None without pairs."""
    if not pairs:
        return None

    def gap(rb: tuple[Row, Row]) -> float:
        return rb[1]["accuracy"] - rb[0]["accuracy"]

    ok = [rb for rb in pairs if rb[0]["macs_reduction"] >= budget and gap(rb) <= tolerance]
    cheap = [rb for rb in pairs if rb[0]["macs_reduction"] >= budget]
    if ok:
        return (*max(ok, key=lambda rb: rb[0]["macs_reduction"]), True)
    if cheap:
        return (*min(cheap, key=gap), False)
    return (*max(pairs, key=lambda rb: rb[0]["macs_reduction"]), False)


def frontier(points: Sequence[tuple[float, float]], reduction: float) -> float:
    """Accuracy on the straight lines between plain networks' ``(MACs reduction, accuracy)`` points at
    ``reduction``: the first point's accuracy below it, NaN beyond the last point."""
    pts = sorted(points)
    if reduction <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= reduction <= x1:
            return y0 + (y1 - y0) * (reduction - x0) / (x1 - x0)
    return float("nan")


def fmt(v: float | None, spec: str = ".2f", none: str = "–") -> str:
    return none if v is None else format(v, spec)


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def group_table(got: dict[str, dict]) -> str:
    """The table of :func:`run_row` rows."""
    lines = ["| run | stage | α | distill | threshold | test accuracy | MACs/img | MACs saved vs ResNet-38 | CP |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in got.values():
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(
            f"| `{r['name']}` | {r['stage']} | {alpha} | {'yes' if r['distill'] else ''} | {r.get('threshold', 0.5):g} "
            f"| {r['accuracy']:.2f}% | {r['macs'] / 1e6:.1f} M | {r['macs_reduction']:.1f}% "
            f"| {r['computation_percentage']:.1f}% |"
        )
    return "\n".join(lines)


def lesion_table(curves: Sequence[Row]) -> str:
    """Static lesion curves side by side: test accuracy (MACs reduction) after each removed block."""
    head = "| blocks removed | " + " | ".join(f"{c['run']}: test acc % (MACs red. %)" for c in curves) + " |"
    lines = [head, "|---|" + "---|" * len(curves)]
    for k in range(max(len(c["points"]) for c in curves)):
        cells = []
        for c in curves:
            p = c["points"][k] if k < len(c["points"]) else None
            cells.append(f"{p['accuracy']:.2f} ({p['macs_reduction']:.1f})" if p else "–")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread_batches(bundle: Any, split: str, images: int, batch_size: int = 500) -> list[tuple[Any, Any]]:
    """``images`` images of ``bundle``'s ``split`` (all if it has fewer), without augmentation, spread evenly over
    it: every k-th image, so that a split stored class by class gives every class its share (its first images may
    all be of one class). Reads the whole split once."""
    import torch

    from skipnet.analysis import eval_loader

    total = bundle.info.get(f"{split}_images") or images
    step = max(1, total // max(images, 1))
    xs, ys, seen = [], [], 0
    for x, y in eval_loader(bundle, split):
        keep = [j for j in range(len(y)) if (seen + j) % step == 0]
        xs.append(x[keep])
        ys.append(y[keep])
        seen += len(y)
    x, y = torch.cat(xs)[:images], torch.cat(ys)[:images]
    return [(x[k : k + batch_size], y[k : k + batch_size]) for k in range(0, len(y), batch_size)]


def lesion(run: Path, data: str, cache: Path, max_drop: int = 6, select_images: int = 1000) -> Row | None:
    """The static lesion curve of the trained run in ``run`` (``skipnet.analysis.static_lesion``), cached in
    ``cache``: the best blocks to remove for every image alike, chosen on ``select_images`` validation images spread
    over the split (:func:`spread_batches`), with the test accuracy after each removal. None without a ``best.pt``."""
    if cache.exists():
        return json.loads(cache.read_text())
    if not (run / BEST).exists():
        return None
    import torch

    from skipnet.analysis import data_for_checkpoint, eval_loader, static_lesion
    from skipnet.checkpoint import load_model
    from skipnet.cost import cost_model

    torch.set_num_threads(2)
    model, ckpt = load_model(run / BEST)
    bundle = data_for_checkpoint(ckpt, model, data, batch_size=500)
    select = spread_batches(bundle, "val", select_images)
    t0 = time.time()
    points = static_lesion(model, select, cost_model(model), max_drop=max_drop, evaluate_on=eval_loader(bundle, "test"))
    seen = sum(len(y) for _, y in select)
    res = {"run": run.name, "select_images": seen, "points": points, "seconds": round(time.time() - t0, 1)}
    cache.write_text(json.dumps(res, indent=1))
    return res


def write_json(path: Path, payload: Row, newline: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + ("\n" if newline else ""))


def group_parser(doc: str, out: str, data: str, results: Path) -> argparse.ArgumentParser:
    """The command line every benchmark script of declared runs shares (add its own options to it)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data", default=data, help="the data set (an ImageFolder root or its .tar.gz)")
    p.add_argument("--out", default=out, help="parent of the run directories")
    p.add_argument("--only", nargs="+", default=None, help="train only these runs (and the runs they need)")
    p.add_argument("--no-train", action="store_true", help="only collect: rows of the runs here, else recorded")
    p.add_argument("--results", default=str(results), help="where the results files are read and written")
    return p


def command_line(script: str, argv: Sequence[str] | None, root: Path) -> str:
    """How a benchmark script was invoked, as recorded in its results."""
    path = Path(script).resolve()
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    return portable(["python", str(shown), *(sys.argv[1:] if argv is None else argv)], root)


def run_row(runner: Runner, res: Result, root: Path) -> Row:
    """A results row of one evaluation: the run's stage, alpha and distillation (from its arguments), the
    commands that made it and its test figures."""
    args = res.run.args
    alpha = option(args, "--alpha")
    row: Row = {"name": res.name, "stage": option(args, "--stage"), "alpha": None if alpha is None else float(alpha)}
    row["distill"] = "--distill" in args
    if res.budget is None:
        row["command"] = portable(runner.command(res.run), root)
    else:
        cal = runner.calibrate_command(res.run, res.budget)
        ev = runner.eval_command(runner.calibrated_path(res.run, res.budget))
        row["threshold"] = res.test["threshold"]
        row["command"] = portable(cal, root) + " && " + portable(ev, root)
    skips = [round(v, RESULTS_SKIP_DIGITS) for v in res.test.get("skip_ratio_per_block", [])]
    return row | test_fields(res.test) | {"skip_ratio_per_block": skips}


def collect(runner: Runner, runs: Sequence[Run], path: Path, root: Path) -> dict[str, Row]:
    """The rows of every finished run here (and of its budgets), with the recorded rows of ``path`` for the
    runs that are not."""
    return with_recorded({r.name: run_row(runner, r, root) for r in runner.results(runs, finished_only=True)}, path)


__all__ = [
    "GRID",
    "group_table",
    "collect",
    "command_line",
    "group_parser",
    "run_row",
    "fmt",
    "frontier",
    "lesion",
    "lesion_table",
    "markdown",
    "option",
    "pick_headline",
    "portable",
    "recorded",
    "test_fields",
    "with_recorded",
    "write_json",
]
