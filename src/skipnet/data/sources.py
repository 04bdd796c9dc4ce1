"""Built-in data sets: CIFAR-10/100 and SVHN through torchvision, scikit-learn's 8x8 digits; and the cache directory
that downloads, extracted archives and decoded tensors share."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from skipnet.errors import SkipnetError

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Builtin:
    """What skipnet knows of a built-in data set: its number of classes, its image side (never resized), its
    normalisation (``None``: computed from the training images) and its training augmentation (random crops
    from ``pad`` pixels of padding, horizontal flips or not)."""

    classes: int
    size: int
    stats: Stats | None
    pad: int
    flip: bool


BUILTINS: dict[str, Builtin] = {
    "cifar10": Builtin(10, 32, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), pad=4, flip=True),
    "cifar100": Builtin(100, 32, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), pad=4, flip=True),
    "svhn": Builtin(
        10, 32, ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)), pad=0, flip=False
    ),  # digits: no flips
    "digits": Builtin(10, 8, None, pad=1, flip=False),
}
BUILTIN = tuple(BUILTINS)
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # large-image folders, unless given

Arrays = dict[str, tuple[Tensor, Tensor, list[str]]]
"""``train`` / ``test``: (uint8 images (N, C, H, W), labels (N,), class names)."""


def cache_dir() -> Path:
    """Where decoded tensors and extracted archives live (``$SKIPNET_CACHE`` or ``~/.cache/skipnet``)."""
    return Path(os.environ.get("SKIPNET_CACHE", Path.home() / ".cache" / "skipnet"))


def builtin_arrays(name: str, data_dir: str | None, download: bool) -> Arrays:
    """The decoded splits of built-in data set ``name`` (torchvision's under ``data_dir``, or the shipped digits)."""
    if name == "digits":
        return _digits()
    root = Path(data_dir) if data_dir else cache_dir() / "datasets"
    return _torchvision_arrays(name, root, download)


def _torchvision_arrays(name: str, root: Path, download: bool) -> Arrays:
    import torchvision.datasets as tvd

    def missing(exc: Exception) -> SkipnetError:
        if download:  # the fetch itself failed (no network, a server down): another hint
            return SkipnetError(f"{name} could not be downloaded to {root} ({exc}); or use --data-dir to point at it")
        return SkipnetError(
            f"{name} not found under {root} ({exc}); pass --download to fetch it, or --data-dir to point at it"
        )

    out = {}
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            for split in ("train", "test"):
                ds = cls(str(root), train=split == "train", download=download)
                x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
                out[split] = (x, torch.tensor(ds.targets), list(ds.classes))
        else:  # svhn: train + extra for training, as in the paper
            parts = []
            for split in ("train", "extra", "test"):
                ds = tvd.SVHN(str(root), split=split, download=download)
                parts.append((torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()))
            classes = [str(i) for i in range(10)]
            out["train"] = (torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]]), classes)
            out["test"] = (parts[2][0], parts[2][1], classes)
    except (RuntimeError, OSError) as exc:
        raise missing(exc) from None
    return out


def digits_table() -> tuple[Any, Any]:
    """scikit-learn's digits as ``(images (1797, 8, 8) in 0..16, labels)``, NumPy arrays: read from the CSV file its
    package ships, as ``sklearn.datasets.load_digits`` reads it, without importing scikit-learn (over a second at
    every start of a command); ``load_digits`` itself where that file is not found."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(csv, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _digits() -> Arrays:
    """scikit-learn's 8x8 digits (1,797 real images, shipped inside the package): a fixed 80/20 split."""
    images, target = digits_table()
    x = torch.from_numpy((images * (255.0 / 16.0)).round().astype("uint8")).unsqueeze(1)
    y = torch.from_numpy(target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    k = len(y) // 5
    classes = [str(i) for i in range(10)]
    return {"train": (x[perm[k:]], y[perm[k:]], classes), "test": (x[perm[:k]], y[perm[:k]], classes)}
