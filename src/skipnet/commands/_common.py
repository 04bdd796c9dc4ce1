"""What several commands share: option groups, value checks and the "checkpoint + its data" preamble.

The leading underscore keeps it out of the command list (:func:`skipnet.cli.build_parser` registers every other
module of this package). Commands import from here, never from a sibling command.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skipnet.errors import SkipnetError, check_value  # noqa: F401 (the commands' value check)
from skipnet.trainconfig import MAX_THREADS  # noqa: F401 (the commands' --threads bound, train's own)

DATA_DIR_HELP = "where torchvision data sets live (default: ~/.cache/skipnet/datasets, or $SKIPNET_CACHE/datasets)"
DATA_HELP = "cifar10, cifar100, svhn, digits, or an ImageFolder root / .tar.gz"


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
        help="resize (small) or crop (large) images to S (default: the data's own up to 64 px; 224 for larger images "
        "and for ImageNet nets)",
    )
    from skipnet.trainconfig import TrainConfig

    workers = TrainConfig.defaults()["workers"]
    p.add_argument("--workers", type=int, default=workers, help="DataLoader workers for large images")


def add_optim_args(p: argparse.ArgumentParser) -> None:
    """The optimisation options of a training run (``skipnet train`` and ``skipnet sweep``); defaults from
    :class:`skipnet.trainconfig.TrainConfig`, ``None`` meaning the stage's paper setting."""
    from skipnet.trainconfig import BASELINES, SCHEDULES, TrainConfig

    d = TrainConfig.defaults()
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=None, help="train for E epochs (default: the paper's --iters)")
    g.add_argument("--iters", type=int, default=None, help="train for N iterations (paper: 64000 SP, 10000 HRL)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (paper: 128 CIFAR, 256 ImageNet)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="evaluation batch size (default: max(B, 256))")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (paper: 0.1; 1e-4 for HRL after SP)")
    p.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (recommended for short CPU schedules)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (paper: 1e-4)")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="lr schedule: paper (x0.1 at 50%% and 75%%; ImageNet every 30 epochs), step, cosine, onecycle "
        "(recommended for short CPU runs), constant (the paper's HRL)",
    )
    p.add_argument(
        "--warmup-iters", type=int, default=d["warmup_iters"], help="iterations at lr/10 first (authors: 400 for 110+)"
    )
    p.add_argument("--beta", type=float, default=None, help="HRL loss weight beta (paper: 1 CIFAR, alpha/N ImageNet)")
    p.add_argument(
        "--rl-weight", type=float, default=d["rl_weight"], help="scale of the REINFORCE term (authors: 0.01)"
    )
    p.add_argument(
        "--baseline",
        choices=list(BASELINES),
        default=d["baseline"],
        help="REINFORCE baseline (variance reduction): none (the paper), the batch mean per gate, its moving "
        "average (ema), or self-critical: each image's return under its greedy route (one more forward per step; "
        "beyond the paper, as BlockDrop)",
    )
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed")
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="validate, checkpoint every N steps (default: each epoch, <= 2000)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own, one per core)")
    p.add_argument(
        "--log-every", type=int, default=d["log_every"], help="a progress line (off a terminal) and a steps.csv row"
    )
    p.add_argument("--device", default=d["device"], help="auto, cpu, cuda, cuda:1, ...")


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

    from skipnet.checkpoint import data_record, load_model, require_same_classes
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
    require_same_classes(model, data, str(args.checkpoint), data_record(ckpt).get("classes"))
    model.to(device).to(memory_format=torch.channels_last)
    return device, model, ckpt, data


def add_eval_args(p: argparse.ArgumentParser, verb: str, json_help: str = "print one JSON object") -> None:
    """``--limit``, ``--batch-size``, ``--device`` and ``--json``: the options of every command that evaluates a
    checkpoint on a split (``verb``: what it does to the images, in ``--limit``'s help)."""
    p.add_argument("--limit", type=int, default=None, help=f"{verb} a seeded subset of N images (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--json", action="store_true", help=json_help)


def require_learned_gates(model: Any, ckpt: dict[str, Any], source: str, what: str) -> None:
    """:func:`skipnet.evaluate.require_learned_gates`, naming the checkpoint's training stage."""
    from skipnet.evaluate import require_learned_gates as require

    require(model, source, what, ckpt.get("stage") or (ckpt.get("train_config") or {}).get("stage"))


def check_out(value: str, option: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written: an empty one (``Path("")`` is the current
    directory, which would receive the files), one under a file, or one in a folder where no file can be made."""
    if not str(value).strip():
        raise SkipnetError(f"{option} is empty; give a path (the current directory is never written into)")
    folder = Path(value).expanduser().absolute().parent  # where the output (and its temporary file) will be made
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise SkipnetError(f"{option} {value}: a parent of it is a file ({existing})")
    if existing != folder:  # the missing folders will be made: the nearest existing one must take them
        if not os.access(existing, os.W_OK | os.X_OK):
            raise SkipnetError(f"{option} {value}: cannot make folders in {existing} (permission denied)")
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".skipnet-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise SkipnetError(f"{option} {value}: cannot write in {folder} ({why})") from None


def check_count(option: str, value: int | None, least: int, most: int, why: str = "") -> None:
    """A count option in [least, most] (``None``: unset), one line otherwise."""
    if value is not None and not least <= value <= most:
        raise SkipnetError(f"{option} must be in [{least}, {most}]{why}, got {value}")
