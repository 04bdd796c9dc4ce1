"""``skipnet models``: list the registered architectures."""

from __future__ import annotations

import argparse
import json

from skipnet.registry import get_config, list_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--json", action="store_true", help="print a JSON list of configs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = list_models()
    if args.json:
        print(json.dumps([get_config(n).to_dict() for n in names], indent=2))
        return 0
    print(f"{'name':<26} {'family':<9} {'depth':>5} {'classes':>7} {'gate':<8} {'input':>5}")
    for n in names:
        c = get_config(n)
        print(f"{n:<26} {c.family:<9} {c.depth:>5} {c.num_classes:>7} {c.gate:<8} {c.image_size:>5}")
    print("\nAny other 6n+2 CIFAR depth works by pattern, e.g. cifar10_rnn_gate_56.")
    return 0
