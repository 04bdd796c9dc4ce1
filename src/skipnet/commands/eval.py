"""``skipnet eval CKPT --data SPEC``: accuracy and the computation actually spent."""

from __future__ import annotations

import argparse

from skipnet.commands._common import add_eval_args, add_source_args, check_value, open_for_eval
from skipnet.cost import cost_model
from skipnet.errors import SkipnetError
from skipnet.evaluate import describe_mode, eval_loader, eval_mode_for, evaluate
from skipnet.fileio import json_text
from skipnet.gated import GateMode

DOCS = "docs/training.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: accuracy, MACs, computation percentage")
    p.add_argument(
        "checkpoint",
        help="a .pt file written by 'skipnet train' or 'skipnet calibrate', a .safetensors export, or "
        "pretrained:NAME (see 'skipnet models --pretrained')",
    )
    add_source_args(p)
    p.add_argument("--split", choices=["test", "val", "train"], default="test", help="which split to evaluate")
    p.add_argument("--threshold", type=float, default=None, help="gate threshold (default: the checkpoint's)")
    p.add_argument(
        "--mode",
        choices=[m.value for m in GateMode],
        default=None,
        help="gate mode (default: the one the checkpoint was trained and validated in: greedy for SkipNets, all_on "
        "for plain ResNets and for gated networks trained in stage base, random for SDV)",
    )
    add_eval_args(p, "evaluate")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_value("threshold", args.threshold, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    check_value("batch_size", args.batch_size, lambda v: v > 0, "positive")
    check_value("limit", args.limit, lambda v: v > 0, "positive")

    def check(model, ckpt) -> None:
        mode = GateMode(args.mode or eval_mode_for(model))
        if args.threshold is not None and not mode.computes_gates:
            why = "" if args.mode else f" (the mode {args.checkpoint} was trained and validated in)"
            raise SkipnetError(
                f"--threshold sets the gates' threshold, but this evaluation runs in mode {mode.value}{why}, which "
                "computes no gate; drop --threshold, or pass --mode greedy to run the gates"
            )

    split_limit = {"limit_train": args.limit} if args.split == "train" else {"limit": args.limit}
    _, model, _, data = open_for_eval(args, check=check, **split_limit)
    loader = eval_loader(data, args.split, source=args.checkpoint)
    cost = cost_model(model)
    mode = GateMode(args.mode or eval_mode_for(model))  # what the checkpoint was validated in, unless asked
    result = evaluate(model, loader, cost, mode=mode, threshold=args.threshold)
    result = {
        "checkpoint": args.checkpoint,
        "arch": model.config.name,
        "split": args.split,
        "threshold": args.threshold if args.threshold is not None else model.threshold,
        "mode": mode.value,
    } | result
    if args.json:
        print(json_text(result))  # a non-finite number (e.g. the loss of overflowing logits) as null
        return 0
    print(f"{args.checkpoint} on {data.name} {args.split} ({result['images']} images), mode {describe_mode(mode)}")
    print(f"  top-1 accuracy          {result['accuracy']:.2f}%")
    if "top5" in result:
        print(f"  top-5 accuracy          {result['top5']:.2f}%")
    print(f"  MACs per image          {result['macs_mean']:,.0f} (plain ResNet {result['macs_all_on']:,.0f})")
    print(f"  MACs reduction          {result['macs_reduction']:.1f}%")
    print(f"  computation percentage  {result['computation_percentage']:.1f}%")
    print(f"  gate MACs per image     {result['gate_macs_mean']:,.0f}")
    r = result["routes"]
    if r["distinct_routes"]:
        print(
            f"  routes                  {r['distinct_routes']} distinct, {100 * r['top_route_share']:.1f}% of images "
            f"on the most common; executed blocks std {r['executed_std']:.2f}"
        )
    return 0
