"""``skipnet quickstart``: base -> SP -> HRL on scikit-learn's 8x8 digits, in a few minutes on a CPU.

The three stages of Algorithm 1 on a small real data set that ships inside a package, so that the whole
pipeline runs on a fresh machine with no download. Prints accuracy, MACs and computation percentage per
stage and leaves the run directories behind (``--out``, default ``runs/quickstart``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from skipnet.errors import SkipnetError
from skipnet.train import TrainConfig, train

# Feed-forward gates (FFGate-I, one per block) learn a graded policy within a few hundred HRL steps here.
GATED = "tiny_feedforward_14"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="base -> SP -> HRL on the built-in digits data (a few minutes on CPU)")
    p.add_argument("--out", default="runs/quickstart", help="parent directory of the three run directories")
    p.add_argument("--epochs", type=float, default=1.0, help="multiply every stage's epoch count by this factor")
    p.add_argument("--alpha", type=float, default=2.0, help="HRL cost weight alpha")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own, one per core)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=run)


def stage_configs(out: Path, scale: float, alpha: float, seed: int, threads: int | None) -> list[TrainConfig]:
    common = {
        "data": "digits",
        "batch_size": 64,
        "val_split": 0.15,
        "seed": seed,
        "threads": threads,
        "resume": True,
        "nesterov": True,
        "weight_decay": 5e-4,
        "log_every": 100,
    }
    return [
        TrainConfig(
            "tiny_resnet_14", "base", out=str(out / "base"), epochs=30 * scale, lr=0.1, schedule="onecycle", **common
        ),
        TrainConfig(
            GATED,
            "sp",
            out=str(out / "sp"),
            init=str(out / "base" / "best.pt"),
            epochs=15 * scale,
            lr=0.05,
            schedule="onecycle",
            **common,
        ),
        TrainConfig(
            GATED,
            "hrl",
            out=str(out / "hrl"),
            init=str(out / "sp" / "best.pt"),
            epochs=15 * scale,
            lr=0.01,
            schedule="constant",
            alpha=alpha,
            baseline="ema",
            **common,
        ),
    ]


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not args.epochs > 0:
        raise SkipnetError(f"--epochs must be positive, got {args.epochs:g}")
    if not args.alpha >= 0:
        raise SkipnetError(f"--alpha must be >= 0, got {args.alpha:g}")
    if args.threads is not None and args.threads < 1:
        raise SkipnetError(f"--threads must be positive, got {args.threads}")
    out = Path(args.out)
    rows = []
    for cfg in stage_configs(out, args.epochs, args.alpha, args.seed, args.threads):
        summary = train(cfg, progress_bar=True)
        t = summary["test"]
        rows.append(
            {
                "stage": cfg.stage,
                "arch": cfg.arch,
                "run": cfg.out,
                "accuracy": round(t["accuracy"], 2),
                "macs": round(t["macs_mean"]),
                "macs_reduction": round(t["macs_reduction"], 1),
                "computation_percentage": round(t["computation_percentage"], 1),
                "train_time_s": summary.get("train_time_s"),
            }
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    print("\nSkipNet quickstart on scikit-learn digits (8x8, 1,797 real images; test split of 359)")
    print(f"{'stage':<6} {'test acc %':>10} {'MACs/image':>12} {'MACs vs plain':>14} {'comp. %':>8}  run dir")
    for r in rows:
        print(
            f"{r['stage']:<6} {r['accuracy']:>10.2f} {r['macs']:>12,} {0.0 - r['macs_reduction']:>+13.1f}% "
            f"{r['computation_percentage']:>8.1f}  {r['run']}"
        )
    best = out / "hrl" / "best.pt"
    print(f"\nNext: skipnet eval {best} --data digits ; skipnet bench {best} --data digits")
    return 0
