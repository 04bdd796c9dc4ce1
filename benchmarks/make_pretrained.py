"""Ship a trained checkpoint as a pretrained model: ``src/skipnet/pretrained/NAME.safetensors`` plus its entry in
``index.json`` and ``RESULTS.md`` (see :mod:`skipnet.pretrained`).

    python benchmarks/make_pretrained.py runs/h30/hrl/best.pt cifar10_rnn_gate_38 \\
        --data ../shared/data/cifar10-jpeg.tar.gz \\
        --command "skipnet train cifar10_rnn_gate_38 --stage sp ... --out runs/h30/sp" \\
        --command "skipnet train cifar10_rnn_gate_38 --stage hrl --init runs/h30/sp/best.pt ... --out runs/h30/hrl"
    python benchmarks/make_pretrained.py runs/h30/hrl/best.pt cifar10_rnn_gate_38 --data ... \\
        --from-run runs/h30/sp --from-run runs/h30/hrl          # the commands from the runs' config.json

The checkpoint is exported with the library's safetensors export, the exported file is evaluated with
``skipnet eval FILE --data DATA --json`` on the whole test split (``--device``, CPU by default, so that the
recorded numbers are what a user's ``skipnet eval pretrained:NAME --data DATA --json`` prints on a CPU), and only
then copied into the zoo and recorded, with the training command(s) given by ``--command`` (in the order they ran)
and today's date. ``--bench B`` also times the plain and the routed network on B test images (``skipnet bench``)
and records the ratio. A NAME already shipped is refused unless ``--force``. ``--zoo DIR`` writes another zoo
folder (default: the package's, or ``$SKIPNET_PRETRAINED_DIR``).
"""

from __future__ import annotations

import argparse
import sys

from skipnet.cost import fewer_macs
from skipnet.errors import SkipnetError
from skipnet.pretrained import add_model, command_of_run, zoo_dir


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make_pretrained.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .pt or .safetensors checkpoint written by skipnet train / calibrate")
    p.add_argument("name", help="the pretrained name (pretrained:NAME); an architecture name makes it the default")
    p.add_argument("--data", required=True, help="the data set it was trained on (as for skipnet eval --data)")
    p.add_argument("--data-dir", default=None, help="where torchvision data sets live")
    p.add_argument(
        "--command",
        action="append",
        default=[],
        dest="commands",
        help="a command that trained the checkpoint; repeat it for every stage, in order",
    )
    p.add_argument(
        "--from-run",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="take a stage's command from a run directory's config.json (recorded, or rebuilt from its options for "
        "older runs); repeat it for every stage, in order; comes before the --command ones",
    )
    p.add_argument("--device", default="cpu", help="device of the evaluation (default: cpu)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: 256)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate a seeded subset of N test images (for tests; the shipped numbers use all)",
    )
    p.add_argument("--bench", type=int, default=None, metavar="B", help="also time plain vs routed on B images")
    p.add_argument("--notes", default=None, help="a sentence shown under the model in RESULTS.md")
    p.add_argument("--zoo", default=None, help="the zoo folder (default: the package's src/skipnet/pretrained)")
    p.add_argument("--force", action="store_true", help="replace NAME if it is already shipped")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        commands = [command_of_run(run) for run in args.from_run] + args.commands
        entry = add_model(
            args.checkpoint,
            args.name,
            data=args.data,
            data_dir=args.data_dir,
            commands=commands,
            root=args.zoo,
            device=args.device,
            batch_size=args.batch_size,
            limit=args.limit,
            bench_batch=args.bench,
            notes=args.notes,
            force=args.force,
        )
    except SkipnetError as exc:
        print(f"make_pretrained.py: error: {exc}", file=sys.stderr)
        return 2
    root = zoo_dir(args.zoo)
    print(
        f"{args.name}: {entry['arch']} {entry['accuracy']:.2f}% on {entry['images']} test images, "
        f"{entry['macs_mean']:.4g} MACs/image ({fewer_macs(entry['macs_reduction'])} than the plain ResNet), "
        f"CP {entry['computation_percentage']:.1f}% -> {root / entry['file']} ({entry['bytes'] / 1e6:.1f} MB)"
    )
    print(f"check: skipnet eval pretrained:{args.name} --data {args.data} --json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
