"""What several commands share: option groups, value checks and the "checkpoint + its data" preamble.

The leading underscore keeps it out of the command list (:func:`skipnet.cli.build_parser` registers every other
module of this package). Commands import from here, never from a sibling command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from skipnet.errors import SkipnetError

DATA_DIR_HELP = "where torchvision data sets live (default: ~/.cache/skipnet/datasets, or $SKIPNET_CACHE/datasets)"
DATA_HELP = "cifar10, cifar100, svhn, digits, or an ImageFolder root / .tar.gz"


def check_value(option: str, value, test, what: str) -> None:
    """Raise a one-line error when ``value`` of ``--option`` fails ``test`` (``None``: option left unset)."""
    if value is None:
        return
    if value != value or not test(value):  # NaN fails every range
        raise SkipnetError(f"--{option.replace('_', '-')} must be {what}, got {value:g}")
    if abs(value) == float("inf"):
        raise SkipnetError(f"--{option.replace('_', '-')} must be finite, got {value:g}")


def add_source_args(p: argparse.ArgumentParser, data_help: str = DATA_HELP) -> None:
    """``--data``, ``--data-dir`` and ``--download``: where a command reads its images."""
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--download", action="store_true", help="download cifar10/cifar100/svhn if missing")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data options of a training run."""
    add_source_args(
        p, "cifar10, cifar100, svhn, digits, or an ImageFolder root (train/ + test/ or val/) or .tar.gz of one"
    )
    p.add_argument(
        "--limit-train", type=int, default=None, help="use a seeded subset of N training images (default: all)"
    )
    p.add_argument(
        "--limit-test", type=int, default=None, help="use a seeded subset of N test/val images (default: all)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize (small) or crop (large) images to S (default: the data's own; 224 for ImageNet nets)",
    )
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for large images")


def open_for_eval(
    args: argparse.Namespace,
    *,
    check: Callable[[Any, dict[str, Any]], None] | None = None,
    limit: int | None = None,
    limit_train: int | None = None,
) -> tuple[Any, Any, dict[str, Any], Any]:
    """``(device, model, ckpt, data)`` for evaluating ``args.checkpoint`` on ``args.data``: the device of
    ``--device``, the model (``check(model, ckpt)`` runs before the data loads), the data as the checkpoint saw it
    (normalisation, validation split, image size), the class count checked; the model on the device in
    ``channels_last``."""
    import torch

    from skipnet.checkpoint import load_model, require_same_classes
    from skipnet.device import pick_device
    from skipnet.evaluate import data_for_checkpoint

    device = pick_device(args.device)
    model, ckpt = load_model(args.checkpoint, map_location="cpu")
    if check is not None:
        check(model, ckpt)
    data = data_for_checkpoint(
        ckpt,
        model,
        args.data,
        data_dir=args.data_dir,
        download=args.download,
        batch_size=args.batch_size,
        limit=limit,
        limit_train=limit_train,
    )
    require_same_classes(model, data, str(args.checkpoint))
    model.to(device).to(memory_format=torch.channels_last)
    return device, model, ckpt, data
