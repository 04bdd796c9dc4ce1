"""BatchNorm in HRL, measured: running statistics updated from sampled, routed executions (the paper's and the
authors' behaviour, ``--bn update``) against frozen (``--bn frozen``, the new default from ``--init``), at the
paper's HRL learning rate (1e-4) and at the CPU recipe's (3e-3); plus the REINFORCE baseline (none vs ema).

Each HRL run starts from the same SP checkpoint, trains with ``skipnet train`` and is evaluated by the run's own
``summary.json`` (test split, ``best.pt`` chosen on validation) and, for the BatchNorm effect alone, its
``last.pt`` with ``skipnet eval``. One command per data set:

    python benchmarks/hrl_batchnorm.py digits                   # builds base -> SP on scikit-learn's digits first
    python benchmarks/hrl_batchnorm.py cifar10 --sp runs/h30/sp/best.pt --epochs 0.5

The runs are declared :class:`skipnet.experiments.Run` s run by :class:`skipnet.experiments.Runner` (resumable);
``--no-train`` only collects: rows of runs not here are kept from the recorded results file.

Results: ``benchmarks/results/hrl_batchnorm_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from skipnet.experiments import Run, Runner
from skipnet.results import option, recorded

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CIFAR = "../shared/data/cifar10-jpeg.tar.gz"
KEYS = ("accuracy", "macs_reduction", "computation_percentage")
# the quick start's recipe on scikit-learn's digits: a plain tiny ResNet, SP from it (a few seconds each)
DIGITS = ("--batch-size", "64", "--val-split", "0.15", "--threads", "1", "--nesterov", "--weight-decay", "5e-4")
DIGITS_SP = [
    Run(
        "base",
        ("tiny_resnet_14", "--stage", "base", *DIGITS, "--epochs", "30", "--lr", "0.1", "--schedule", "onecycle"),
    ),
    Run(
        "sp",
        ("tiny_rnn_gate_14", "--stage", "sp", *DIGITS, "--epochs", "15", "--lr", "0.05", "--schedule", "onecycle")
        + ("--init", "{runs}/base/best.pt"),
        needs=("base",),
    ),
]


def declare(digits: bool, sp: str, epochs: float, alpha: float) -> list[Run]:
    """The HRL runs from ``sp``: BatchNorm updated or frozen at two learning rates (and, on digits, no baseline)."""
    arch = "tiny_rnn_gate_14" if digits else "cifar10_rnn_gate_38"
    common = ("--threads", "1", "--val-split", "0.15" if digits else "0.1", "--batch-size", "64" if digits else "128")
    common += ("--epochs", str(epochs), "--schedule", "constant", "--alpha", str(alpha), "--init", sp)
    variants = [(lr, bn, "ema") for lr in ("1e-4", "3e-3") for bn in ("update", "frozen")]
    variants += [("3e-3", "frozen", "none")] if digits else []
    needs = ("sp",) if digits else ()
    return [
        Run(f"hrl_lr{lr}_{bn}_{b}", (arch, "--stage", "hrl", *common, "--lr", lr, "--bn", bn, "--baseline", b), needs)
        for lr, bn, b in variants
    ]


def row(runner: Runner, run: Run) -> dict:
    """A run's row: its ``best.pt`` (the trainer's test evaluation) and its ``last.pt`` (``skipnet eval``)."""
    summary = json.loads((runner.dir(run.name) / "summary.json").read_text())
    last = runner.evaluate(runner.dir(run.name) / "last.pt")
    return {
        "name": run.name,
        "lr": float(option(run.args, "--lr")),
        "bn": option(run.args, "--bn"),
        "baseline": option(run.args, "--baseline"),
        "command": " ".join(runner.command(run)),
        "best": {k: summary["test"][k] for k in KEYS},
        "last": {k: last[k] for k in KEYS},
        "wall_s": summary.get("train_time_s"),
    }


def table(rows: list[dict], stamp: str, command: str) -> str:
    md = [f"{stamp}, `{command}` (test split)", ""]
    md += ["| run | lr | BN | baseline | best.pt acc | best.pt MACs saved | last.pt acc | last.pt MACs saved |"]
    md += ["|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["best"] or r["last"]
        md.append(
            f"| {r['name']} | {r.get('lr', '')} | {r.get('bn', '')} | {r.get('baseline', '')} | {b['accuracy']:.2f}% "
            f"| {b['macs_reduction']:.1f}% | {r['last']['accuracy']:.2f}% | {r['last']['macs_reduction']:.1f}% |"
        )
    return "\n".join(md) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["digits", "cifar10"])
    ap.add_argument("--sp", help="SP checkpoint to start every HRL run from (cifar10)")
    ap.add_argument("--epochs", type=float, default=None, help="HRL epochs (digits 15, cifar10 0.5)")
    ap.add_argument("--alpha", type=float, default=None, help="HRL alpha (digits 2, cifar10 1.5)")
    ap.add_argument("--out", default=None, help="parent of the run directories (default runs/hrl_bn_<dataset>)")
    ap.add_argument("--tag", default=None, help="results file suffix (default: the data set)")
    ap.add_argument("--no-train", action="store_true", help="only collect: rows of the runs here, else recorded")
    ap.add_argument("--results", default=str(RESULTS), help="where the results files are read and written")
    args = ap.parse_args(argv)
    if args.dataset == "cifar10" and not args.sp:
        ap.error("cifar10 needs --sp CHECKPOINT")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    digits = args.dataset == "digits"
    runner = Runner(Path(args.out or f"runs/hrl_bn_{args.dataset}"), "digits" if digits else CIFAR)
    sp = str(runner.dir("sp") / "best.pt") if digits else args.sp
    epochs = args.epochs or (15.0 if digits else 0.5)
    alpha = args.alpha if args.alpha is not None else (2.0 if digits else 1.5)
    runs = declare(digits, sp, epochs, alpha)
    if not args.no_train:
        runner.train([*DIGITS_SP, *runs] if digits else runs)
    path = Path(args.results) / f"hrl_batchnorm_{args.tag or args.dataset}.json"
    got = recorded(path, "rows")
    if Path(sp).exists():
        got["sp"] = {"name": "sp", "command": "", "last": {k: runner.evaluate(Path(sp))[k] for k in KEYS}, "best": None}
    got |= {r.name: row(runner, r) for r in runs if runner.finished(r)}
    rows = list(got.values())
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    payload = {"date": stamp, "dataset": args.dataset, "sp": sp, "alpha": alpha, "epochs": epochs, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    md = table(rows, stamp, "python benchmarks/hrl_batchnorm.py " + " ".join(sys.argv[1:] if argv is None else argv))
    path.with_suffix(".md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
