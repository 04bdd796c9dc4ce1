"""BatchNorm in HRL, measured: running statistics updated from sampled, routed executions (the paper's and the
authors' behaviour, ``--bn update``) against frozen (``--bn frozen``, the new default from ``--init``), at the
paper's HRL learning rate (1e-4) and at the CPU recipe's (3e-3); plus the REINFORCE baseline (none vs ema).

Each HRL run starts from the same SP checkpoint, trains with ``skipnet train`` and is evaluated by the run's own
``summary.json`` (test split, ``best.pt`` chosen on validation) and, for the BatchNorm effect alone, its
``last.pt`` with ``skipnet eval``. One command per data set:

    python benchmarks/hrl_batchnorm.py digits                   # builds base -> SP on scikit-learn's digits first
    python benchmarks/hrl_batchnorm.py cifar10 --sp runs/h30/sp/best.pt --epochs 0.5

Results: ``benchmarks/results/hrl_batchnorm_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CIFAR = "../shared/data/cifar10-jpeg.tar.gz"


def run(cmd: list[str]) -> None:
    print("[run]", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")


def evaluate(ckpt: Path, data: str) -> dict:
    cmd = ["skipnet", "eval", str(ckpt), "--data", data, "--json"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: out[k] for k in ("accuracy", "macs_reduction", "computation_percentage")}


def digits_sp(root: Path) -> Path:
    """The quick start's recipe: a plain tiny ResNet, SP from it (digits, a few seconds each)."""
    common = ["--data", "digits", "--batch-size", "64", "--val-split", "0.15", "--threads", "1", "--nesterov"]
    common += ["--weight-decay", "5e-4", "--resume"]
    base, sp = root / "base", root / "sp"
    run(["skipnet", "train", "tiny_resnet_14", "--stage", "base", *common, "--epochs", "30", "--lr", "0.1",
         "--schedule", "onecycle", "--out", str(base)])  # fmt: skip
    run(["skipnet", "train", "tiny_rnn_gate_14", "--stage", "sp", *common, "--epochs", "15", "--lr", "0.05",
         "--schedule", "onecycle", "--init", str(base / "best.pt"), "--out", str(sp)])  # fmt: skip
    return sp / "best.pt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["digits", "cifar10"])
    ap.add_argument("--sp", help="SP checkpoint to start every HRL run from (cifar10)")
    ap.add_argument("--epochs", type=float, default=None, help="HRL epochs (digits 15, cifar10 0.5)")
    ap.add_argument("--alpha", type=float, default=None, help="HRL alpha (digits 2, cifar10 1.5)")
    ap.add_argument("--out", default=None, help="parent of the run directories (default runs/hrl_bn_<dataset>)")
    ap.add_argument("--tag", default=None, help="results file suffix (default: the data set)")
    args = ap.parse_args(argv)
    digits = args.dataset == "digits"
    data = "digits" if digits else CIFAR
    root = Path(args.out or f"runs/hrl_bn_{args.dataset}")
    tag = args.tag or args.dataset
    if digits:
        sp = digits_sp(root)
    elif args.sp:
        sp = Path(args.sp)
    else:
        ap.error("cifar10 needs --sp CHECKPOINT")
    epochs = args.epochs or (15.0 if digits else 0.5)
    alpha = args.alpha if args.alpha is not None else (2.0 if digits else 1.5)
    common = ["--data", data, "--threads", "1", "--val-split", "0.15" if digits else "0.1", "--resume"]
    common += ["--batch-size", "64" if digits else "128", "--epochs", str(epochs), "--schedule", "constant"]
    common += ["--alpha", str(alpha), "--init", str(sp)]
    variants = [(lr, bn, "ema") for lr in ("1e-4", "3e-3") for bn in ("update", "frozen")]
    if digits:
        variants += [("3e-3", "frozen", "none")]
    rows = [{"name": "sp", "command": "", "last": evaluate(sp, data), "best": None}]
    for lr, bn, baseline in variants:
        name = f"hrl_lr{lr}_{bn}_{baseline}"
        out = root / name
        cmd = ["skipnet", "train", "tiny_rnn_gate_14" if digits else "cifar10_rnn_gate_38", "--stage", "hrl"]
        cmd += [*common, "--lr", lr, "--bn", bn, "--baseline", baseline, "--out", str(out)]
        t = time.time()
        run(cmd)
        summary = json.loads((out / "summary.json").read_text())
        test = summary["test"]
        rows.append(
            {
                "name": name,
                "lr": float(lr),
                "bn": bn,
                "baseline": baseline,
                "command": " ".join(cmd),
                "best": {k: test[k] for k in ("accuracy", "macs_reduction", "computation_percentage")},
                "last": evaluate(out / "last.pt", data),
                "wall_s": round(time.time() - t, 1),
            }
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    payload = {"date": stamp, "dataset": args.dataset, "sp": str(sp), "alpha": alpha, "epochs": epochs, "rows": rows}
    (RESULTS / f"hrl_batchnorm_{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = [f"{stamp}, `python benchmarks/hrl_batchnorm.py {' '.join(argv or sys.argv[1:])}` (test split)", ""]
    md += ["| run | lr | BN | baseline | best.pt acc | best.pt MACs saved | last.pt acc | last.pt MACs saved |"]
    md += ["|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["best"] or r["last"]
        md.append(
            f"| {r['name']} | {r.get('lr', '')} | {r.get('bn', '')} | {r.get('baseline', '')} | {b['accuracy']:.2f}% "
            f"| {b['macs_reduction']:.1f}% | {r['last']['accuracy']:.2f}% | {r['last']['macs_reduction']:.1f}% |"
        )
    (RESULTS / f"hrl_batchnorm_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
