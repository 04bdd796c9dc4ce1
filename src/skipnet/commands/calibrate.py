"""``skipnet calibrate CKPT --data SPEC (--target-macs M | --target-reduction P) --out NEW.pt``: a compute budget.

Finds, on the checkpoint's validation split (never the test set), the greedy gate threshold whose mean MACs
per image (gates included) meet the budget at the best accuracy, and writes a copy of the checkpoint with
that ``threshold`` and a ``calibration`` record; ``skipnet eval`` and ``skipnet bench`` use it as they are.
``--margin`` asks for that many percentage points of extra reduction on validation, so that the test split,
whose images differ, also meets the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from skipnet.analysis import CALIBRATION_GRID, calibrate_threshold, eval_loader
from skipnet.checkpoint import export_safetensors, recorded_val_split
from skipnet.commands._common import (
    add_eval_args,
    add_source_args,
    check_count,
    check_out,
    check_value,
    open_for_eval,
    require_learned_gates,
)
from skipnet.cost import CostModel, cost_model, fewer_macs, macs_reduction
from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_write
from skipnet.policy import ALL_SKIP_THRESHOLD

MAX_REFINE = 20  # bisection steps (in logit space: analysis._midpoint): 2**-20 of a grid interval
MAX_GRID = 1000  # thresholds: one evaluation pass each
OUT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


# the end of the error for a validation split that is not the checkpoint's (evaluate.check_val_split)
VAL_ADVICE = "give the data it was trained on, or pass --split train to calibrate on training images knowingly"
DOCS = "docs/training.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose the gate threshold that meets a MACs budget on the validation split",
        description="Search the greedy gate threshold that meets a compute budget (mean MACs per image, gates "
        "included) at the best validation accuracy, and write a checkpoint that uses it.",
    )
    p.add_argument("checkpoint", help="a gated checkpoint: .pt, .safetensors export or pretrained:NAME")
    add_source_args(p, "the data set the checkpoint was trained on")
    # Exactly one of the two; checked in run() so that a mistake is a one-line error.
    p.add_argument("--target-macs", type=float, default=None, help="budget: mean MACs per image, e.g. 5e7")
    p.add_argument("--target-reduction", type=float, default=None, help="budget: %% fewer MACs than the plain ResNet")
    p.add_argument(
        "--out",
        required=True,
        help="the calibrated checkpoint to write: NEW.pt, or NEW.safetensors for an export (not the input itself)",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument(
        "--split",
        choices=["val", "train"],
        default="val",
        help="where to calibrate: the checkpoint's validation split, or (explicitly) its training images",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=1.0,
        help="extra MACs reduction to ask for on the calibration split, in percentage points of the plain ResNet",
    )
    p.add_argument("--grid", type=float, nargs="+", default=list(CALIBRATION_GRID), help="thresholds to evaluate")
    p.add_argument(
        "--refine",
        type=int,
        default=4,
        help="bisection steps (in logit space) between grid points at the budget's edge",
    )
    add_eval_args(p, "calibrate on")
    p.set_defaults(func=run)


def check_out_file(src: Path, dst: Path, force: bool) -> None:
    """``--out`` is a new file (or ``--force``), never the input or a directory (under a file: ``check_out``)."""
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise SkipnetError("--out must differ from the input checkpoint (it is kept as it is)")
    if dst.is_dir():
        raise SkipnetError(f"--out {dst} is a directory; give a file name such as {dst / 'calibrated.pt'}")
    if (dst.exists() or dst.is_symlink()) and not force:  # a dangling link too: the file could not be created
        raise SkipnetError(f"--out {dst} exists; pass --force to overwrite it or choose another name")
    if dst.suffix not in OUT_SUFFIXES:
        raise SkipnetError(
            f"--out {dst} must end in .pt (a checkpoint) or .safetensors (an export); calibrate writes no "
            f"{dst.suffix or 'extension-less'} file (for ONNX: skipnet export NEW.pt NEW.onnx)"
        )


def _check_options(args: argparse.Namespace) -> None:
    """One-line errors for option values, before anything is loaded."""
    if (args.target_macs is None) == (args.target_reduction is None):
        raise SkipnetError("give exactly one budget: --target-macs M or --target-reduction P")
    check_value("target_macs", args.target_macs, lambda v: v > 0, "positive")
    check_value("target_reduction", args.target_reduction, lambda v: 0.0 <= v < 100.0, "a percentage in [0, 100)")
    check_value("margin", args.margin, lambda v: 0.0 <= v < 100.0, "in [0, 100) percentage points")
    check_count("--refine", args.refine, 0, MAX_REFINE, " (each step halves the interval: 20 reach 1e-6)")
    check_value("limit", args.limit, lambda v: v > 0, "positive")
    check_value("batch_size", args.batch_size, lambda v: v > 0, "positive")
    check_count("--grid", len(args.grid), 1, MAX_GRID, " thresholds")
    for t in args.grid:
        check_value("grid", t, lambda v: 0.0 <= v <= 1.0, "thresholds in [0, 1]")
    check_out(args.out)


def _record(
    args: argparse.Namespace, result: Any, target: float, all_on: float, effective: float, src: Path, ckpt: dict
) -> dict[str, Any]:
    """The ``calibration`` entry written into the new checkpoint."""
    return {
        "target_macs": target,
        "target_reduction": macs_reduction(target, all_on),
        "margin": args.margin,
        "effective_target_macs": effective,
        "split": args.split,
        "images": result.points[0]["images"],
        "source": str(src),
        "source_threshold": float(ckpt.get("threshold", 0.5)),
        "threshold": result.threshold,
        "accuracy": result.accuracy,
        "macs_mean": result.macs_mean,
        "macs_reduction": result.macs_reduction,
        "computation_percentage": result.computation_percentage,
        "monotone_on_grid": result.monotone_on_grid,
        "points": result.points,
    }


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    src, dst = Path(args.checkpoint), Path(args.out)
    check_out_file(src, dst, args.force)

    def check(model, ckpt) -> None:
        require_learned_gates(model, ckpt, str(src), "calibrate")
        if args.split == "val" and not recorded_val_split(ckpt):
            raise SkipnetError(
                f"{src} was trained without a validation split, and the test set must not choose the threshold; "
                "pass --split train to calibrate on its training images instead"
            )

    split_limit = {"limit": args.limit} if args.split == "val" else {"limit_train": args.limit}
    _, model, ckpt, data = open_for_eval(args, check=check, **split_limit)
    cost = cost_model(model)
    target, effective = _budget(args, cost)
    loader = eval_loader(data, args.split, source=str(src), advice=VAL_ADVICE)
    result = calibrate_threshold(model, loader, cost, effective, grid=args.grid, refine=args.refine)
    record = _record(args, result, target, float(cost.total_macs_all_on), effective, src, ckpt)
    new = dict(ckpt)
    new["threshold"] = float(result.threshold)
    new["calibration"] = record
    try:  # without --force never over a file, even one another process wrote while this one calibrated
        if dst.suffix == ".safetensors":
            export_safetensors(new, dst, source=str(src), replace=args.force)
        else:
            atomic_write(dst, lambda f: torch.save(new, f), replace=args.force)
    except FileExistsError:
        raise SkipnetError(
            f"--out {dst} was written by another process meanwhile; kept it (--force replaces it)"
        ) from None
    _report(args, result, record, target, dst)
    return 0


def _budget(args: argparse.Namespace, cost: CostModel) -> tuple[float, float]:
    """``(target, effective target)`` MACs per image: the budget asked for, and less its margin; one line if that
    is below the least the network can spend."""
    all_on = float(cost.total_macs_all_on)
    if args.target_macs is not None:
        target = float(args.target_macs)
    else:
        target = cost.macs_for_reduction(args.target_reduction)
    effective = target - all_on * args.margin / 100.0
    floor = cost.min_macs
    if effective < floor:
        raise SkipnetError(
            f"budget {target:.4g} MACs/image ({cost.reduction(target):.1f}% fewer) less the {args.margin:g}-point "
            f"margin is below the least this network spends, {floor:.4g} ({cost.reduction(floor):.1f}% fewer: "
            "stem, first block, shortcuts, head, gates)"
        )
    return target, effective


def _share(reduction: float) -> str:
    """A budget as a share of the plain ResNet's MACs: "30.0% fewer", or "more than the plain ResNet"."""
    return f"{reduction:.1f}% fewer" if reduction >= 0 else "more than the plain ResNet"


def _report(args: argparse.Namespace, result: Any, record: dict, target: float, dst: Path) -> None:
    if args.json:
        extra = {"all_skip": result.threshold == ALL_SKIP_THRESHOLD}
        print(json.dumps({"checkpoint": str(dst)} | {k: v for k, v in record.items() if k != "points"} | extra))
        return
    print(
        f"threshold {result.threshold:.6g} (was {record['source_threshold']:.6g}): {args.split} accuracy "
        f"{result.accuracy:.2f}%, {result.macs_mean:.4g} MACs/image, {fewer_macs(result.macs_reduction)} than the "
        f"plain ResNet (budget {target:.4g} = {_share(record['target_reduction'])}, "
        f"margin {args.margin:g} percentage point{'' if args.margin == 1 else 's'})"
    )
    if record["target_reduction"] < 0:
        print("note: the budget is above what the plain ResNet spends: every block may run", file=sys.stderr)
    if result.threshold == ALL_SKIP_THRESHOLD:
        print(
            "note: no threshold of the grid met the budget, so every gated block is skipped (the all-skip point); a "
            "finer --grid may find a threshold that meets it with some blocks on",
            file=sys.stderr,
        )
    if not result.monotone_on_grid:
        print("note: MACs were not monotone in the threshold on the grid; the most accurate point within budget won")
    print(f"wrote {dst}")
