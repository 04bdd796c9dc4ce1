"""``skipnet flops ARCH``: exact multiply-adds per image, per region, gates included."""

from __future__ import annotations

import argparse
import json

from skipnet.commands._common import check_count
from skipnet.cost import cost_model
from skipnet.errors import SkipnetError
from skipnet.registry import check_image_size, create_model, get_config

MAX_IMAGE_SIZE = 1024  # px; cifar10_rnn_gate_110 at 4096 px took 5 minutes and 6 GB


DOCS = "docs/getting-started.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="multiply-adds per image of an architecture (gates included)")
    p.add_argument("arch", help="registered architecture name (see 'skipnet models')")
    p.add_argument("--image-size", type=int, default=None, help="square input size (default: the arch's own)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: the architecture's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = get_config(args.arch)
    check_image_size(config, args.image_size)
    check_count("--image-size", args.image_size, 1, MAX_IMAGE_SIZE, " (flops runs the network once at that size)")
    if args.num_classes is not None and args.num_classes < 1:
        raise SkipnetError(f"--num-classes must be positive, got {args.num_classes}")
    model = create_model(config, num_classes=args.num_classes)
    cm = cost_model(model, args.image_size)
    d = cm.to_dict()
    if args.json:
        print(json.dumps(d))
        return 0
    print(f"{cm.arch} at {cm.image_size}x{cm.image_size}: {cm.params:,} parameters, {cm.num_gates} gated blocks")
    print(f"{'region':<22} {'MACs':>16}")
    print(f"{'fixed (stem, block 0,':<22}")
    print(f"{' shortcuts, head)':<22} {cm.fixed_macs:>16,}")
    for i, (b, g) in enumerate(zip(cm.block_macs, cm.gate_macs)):
        gate = f"   gate {g:,}" if g else ""
        print(f"{'block ' + str(i + 1) + ' (stage ' + str(cm.block_stage[i] + 1) + ')':<22} {b:>16,}{gate}")
    total, gates = cm.total_macs_all_on, sum(cm.gate_macs)
    print(f"{'all blocks, no gate':<22} {total:>16,}  ({total / 1e9:.3f} GMACs: the plain ResNet, 0% fewer)")
    print(f"{'gates, summed':<22} {gates:>16,}  ({100 * cm.gate_overhead:.3f}% of gated blocks)")
    print(f"{'all blocks and gates':<22} {total + gates:>16,}  ({(total + gates) / 1e9:.3f} GMACs)")
    return 0
