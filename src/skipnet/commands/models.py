"""``skipnet models``: list the registered architectures, or (``--pretrained``) the shipped pretrained models."""

from __future__ import annotations

import argparse
import json

from skipnet.registry import get_config, list_models

DOCS = "docs/pretrained.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered architectures or the pretrained models")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="list the pretrained models shipped with skipnet (their test accuracy and cost); load one with "
        "create_model(NAME, pretrained=True) or pass pretrained:NAME as a checkpoint",
    )
    p.add_argument("--json", action="store_true", help="print JSON (a list of configs, or the pretrained index)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        return run_pretrained(args)
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


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _signed(reduction) -> str:
    """A MACs reduction as the signed change against the plain ResNet: 30 -> "-30.0%"."""
    return "-" if reduction is None else f"{0.0 - reduction:+.1f}%"


def run_pretrained(args: argparse.Namespace) -> int:
    from skipnet.pretrained import read_index, zoo_dir

    index = read_index()
    if args.json:
        print(json.dumps(index, indent=2))
        return 0
    if not index:
        print(f"no pretrained models are installed ({zoo_dir()} has none)")
        return 0
    width = max(len("name"), *(len(n) for n in index))
    print(
        f"{'name':<{width}} {'architecture':<22} {'data':<9} {'top-1 %':>7} {'MACs':>9} {'vs plain':>8} "
        f"{'CP %':>6} {'latency':>7}"
    )
    for name, e in index.items():
        print(
            f"{name:<{width}} {str(e.get('arch')):<22} {str(e.get('dataset')):<9} "
            f"{_num(e.get('accuracy'), '.2f'):>7} {_num(e.get('macs_mean'), '.4g'):>9} "
            f"{_signed(e.get('macs_reduction')):>8} {_num(e.get('computation_percentage'), '.1f'):>6} "
            f"{_num(e.get('latency_ratio'), '.2f') + ('x' if e.get('latency_ratio') else ''):>7}"
        )
    print(
        "\nNumbers: 'skipnet eval pretrained:NAME' on the test split (MACs per image, gates included, and their change "
        "against the plain ResNet; latency: plain / routed time).\nLoad with create_model(NAME, pretrained=True) "
        "or pass pretrained:NAME wherever a checkpoint is taken. Training commands: skipnet models --pretrained --json"
    )
    return 0
