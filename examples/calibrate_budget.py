"""Calibrate a compute budget: choose, on the validation split, the gate threshold that meets a MACs budget.

    python examples/calibrate_budget.py                                   # the shipped SkipNet-38, 30% fewer MACs
    python examples/calibrate_budget.py my_skipnet.pt --data digits --target-reduction 20

The threshold is chosen on the checkpoint's validation split, never on the test split; the test split then says
what the budget costs in accuracy. ``skipnet calibrate`` does the same from the command line.
"""

from __future__ import annotations

import argparse

import skipnet
from skipnet.analysis import calibrate_threshold
from skipnet.cost import cost_model, fewer_macs
from skipnet.evaluate import data_for_checkpoint, eval_loader, evaluate


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "checkpoint", nargs="?", default="pretrained:cifar10_rnn_gate_38", help=".pt, .safetensors or pretrained:NAME"
    )
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz", help="the data set it was trained on")
    ap.add_argument(
        "--target-reduction", type=float, default=30.0, help="%% fewer MACs than the plain ResNet (default: 30)"
    )
    ap.add_argument(
        "--limit", type=int, default=None, help="a seeded subset of N validation/test images (default: all)"
    )
    ap.add_argument("--out", default=None, help="write the calibrated checkpoint here (.pt)")
    args = ap.parse_args(argv)

    model, ckpt = skipnet.load_model(args.checkpoint)  # eval mode, at its stored threshold
    data = data_for_checkpoint(ckpt, model, args.data, limit=args.limit)  # its normalisation and validation split
    cost = cost_model(model)
    budget = cost.total_macs_all_on * (1.0 - args.target_reduction / 100.0)

    before = evaluate(model, eval_loader(data, "test"), cost)
    cal = calibrate_threshold(model, eval_loader(data, "val"), cost, budget)  # a grid of thresholds, then bisection
    model.threshold = cal.threshold
    after = evaluate(model, eval_loader(data, "test"), cost)

    print(f"validation: threshold {cal.threshold:.3g}, {cal.accuracy:.2f}% at {fewer_macs(cal.macs_reduction)} MACs")
    for name, r in (("before", before), ("after", after)):
        print(f"test {name:6}: {r['accuracy']:.2f}% at {r['macs_mean']:,.0f} MACs ({fewer_macs(r['macs_reduction'])})")
    if args.out:
        skipnet.save_checkpoint(args.out, model, data=ckpt["data"])  # skipnet eval/bench/export take it as it is
        print(f"wrote {args.out}")
    return {"threshold": cal.threshold, "before": before, "after": after}


if __name__ == "__main__":
    main()
