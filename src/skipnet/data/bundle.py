"""The entry point: :func:`load_data` (or :func:`build` of a :class:`DataSpec`) picks the source, decodes or lists
it, carves the validation split with a fixed seed, keeps the seeded subsets and returns a :class:`DataBundle`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from skipnet.data.decode import decode_folder, mostly_larger_than
from skipnet.data.folders import list_folder, resolve_folder
from skipnet.data.loaders import (
    FolderLoader,
    KeyedSubset,
    TensorLoader,
    folder_transforms,
    image_folder,
    usable_workers,
)
from skipnet.data.sources import BUILTIN, BUILTINS, IMAGENET_STATS, Arrays, Stats, builtin_arrays
from skipnet.errors import SkipnetError

SPLIT_SEED = 20180908  # the validation split never depends on the training seed

SMALL_MAX = 64  # the largest side decoded into a tensor cache; larger images go through DataLoader workers


@dataclass
class DataBundle:
    """Loaders and metadata of one data set."""

    name: str
    num_classes: int
    image_size: int
    in_channels: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: TensorLoader | FolderLoader
    val: TensorLoader | FolderLoader | None
    test: TensorLoader | FolderLoader
    info: dict = field(default_factory=dict)

    def split(self, name: str) -> TensorLoader | FolderLoader:
        loader = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if loader is None:
            raise SkipnetError(
                f"split {name!r} is not available: this data has no validation split (a checkpoint trained with "
                "--val-split 0 has none; skipnet train --val-split F carves one)"
            )
        return loader

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised images back to [0, 1] for display."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() * std + mean).clamp(0, 1)

    def meta(self) -> dict:
        """Plain-data description stored in checkpoints."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            # how an image becomes S x S (skipnet predict prepares its images so): resized and centre-cropped as a
            # large-image folder's evaluation does, or resized to S x S as small images are
            "prepare": "crop" if isinstance(self.test, FolderLoader) else "resize",
        }


def _carve_val(n: int, fraction: float) -> tuple[Tensor, Tensor]:
    if not 0.0 <= fraction < 1.0:
        raise SkipnetError(f"--val-split must be in [0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    k = int(round(n * fraction))
    return perm[k:].sort().values, perm[:k].sort().values


def _limit(n: int, limit: int | None, seed: int) -> Tensor:
    if not limit or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED + seed + 1))[:limit].sort().values


def _split(spec: DataSpec, n_train: int, n_test: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of the training, validation and test images: the validation split carved from the training set with
    a fixed seed, then the seeded subsets (``limit_train`` of the training split, ``limit_test`` of the validation and
    the test splits). The same for decoded tensors and for large-image folders."""
    tr_idx, va_idx = _carve_val(n_train, spec.val_split)
    tr_idx = tr_idx[_limit(len(tr_idx), spec.limit_train, 0)]
    if len(va_idx) and spec.limit_test:
        va_idx = va_idx[_limit(len(va_idx), spec.limit_test, 1)]
    return tr_idx, va_idx, _limit(n_test, spec.limit_test, 2)


def _compute_stats(images: Tensor) -> Stats:
    x = images[: min(len(images), 20000)].float() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


@dataclass(frozen=True)
class DataSpec:
    """What to load and how: the arguments of :func:`load_data`, passed on once as one value.

    Attributes:
        source: ``cifar10``, ``cifar100``, ``svhn``, ``digits`` or an ImageFolder path/archive.
        val_split: fraction of the training set held out (fixed seed) for model selection.
        limit_train, limit_test: keep a seeded random subset of that many images (quick experiments);
            ``limit_test`` also limits the validation split.
        image_size: resize images of an ImageFolder to this size (small images) or crop size (large).
        stats: normalisation (mean, std) to use instead of the data set's own (checkpoints carry theirs).
        augment: ``False`` turns the default augmentation off (on for CIFAR/ImageFolder, off for SVHN and digits).
        prepare: how an ImageFolder's images become S x S, as a checkpoint records it (``"crop"``: read as large
            images, resized and centre-cropped; ``"resize"``: decoded and resized to S x S); ``None``: decided by
            the folder (most images over 64 px: crop).
    """

    source: str
    data_dir: str | None = None
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int | None = None
    val_split: float = 0.0
    seed: int = 0
    workers: int = 4
    rank: int = 0
    world: int = 1
    limit_train: int | None = None
    limit_test: int | None = None
    image_size: int | None = None
    stats: Stats | None = None
    augment: bool | None = None
    prepare: str | None = None

    @property
    def eval_batch(self) -> int:
        """The evaluation batch size: ``eval_batch_size``, else the training one but at least 256."""
        return self.eval_batch_size or max(self.batch_size, 256)


def load_data(
    spec: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    val_split: float = 0.0,
    seed: int = 0,
    workers: int = 4,
    rank: int = 0,
    world: int = 1,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int | None = None,
    stats: Stats | None = None,
    augment: bool | None = None,
    prepare: str | None = None,
) -> DataBundle:
    """Load data set ``spec``: ``cifar10``, ``cifar100``, ``svhn``, ``digits`` or an ImageFolder path/archive.

    The keyword arguments are the fields of :class:`DataSpec` (see there); this is ``build(DataSpec(spec, ...))``.
    """
    return build(
        DataSpec(
            spec,
            data_dir=data_dir,
            download=download,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            val_split=val_split,
            seed=seed,
            workers=workers,
            rank=rank,
            world=world,
            limit_train=limit_train,
            limit_test=limit_test,
            image_size=image_size,
            stats=stats,
            augment=augment,
            prepare=prepare,
        )
    )


def build(spec: DataSpec) -> DataBundle:
    """The :class:`DataBundle` of ``spec``: small images decoded into memory, large ones read by DataLoader workers."""
    if not str(spec.source).strip():  # Path("") is the working directory, which is not what an empty value asks
        raise SkipnetError(f"--data is empty; pass one of {', '.join(BUILTIN)}, or an ImageFolder directory or archive")
    if spec.source in BUILTIN:
        name, arrays = spec.source, builtin_arrays(spec.source, spec.data_dir, spec.download)
        pad, flip = BUILTINS[spec.source].pad, BUILTINS[spec.source].flip
    else:
        root, test_dir, listings, large = _folder_source(spec)
        if large:
            return _folder_bundle(spec, root, test_dir, listings)
        name, pad, flip = root.name, 4, True
        arrays = {
            "train": decode_folder(root / "train", spec.image_size, listings["train"]),
            "test": decode_folder(test_dir, spec.image_size, listings["test"]),
        }
        _check_sizes(root, test_dir, arrays)
    if spec.augment is False:
        pad, flip = 0, False
    stats = spec.stats
    if stats is None:
        stats = (BUILTINS[spec.source].stats if spec.source in BUILTINS else None) or _compute_stats(arrays["train"][0])
    return _tensor_bundle(spec, name, arrays, pad, flip, stats)


def _check_sizes(root: Path, test_dir: Path, arrays: Arrays) -> None:
    """The decoded splits of a folder are square images of one size: the network's input size and its cost (one
    ``image_size``) are read from them. Otherwise :class:`SkipnetError`, naming ``--image-size``."""
    (h, w), (th, tw) = arrays["train"][0].shape[-2:], arrays["test"][0].shape[-2:]
    if h != w:
        raise SkipnetError(
            f"the images under {root / 'train'} are {w} px wide and {h} high: the networks take square images; "
            "pass --image-size S to resize them to S x S"
        )
    if (th, tw) != (h, w):
        raise SkipnetError(
            f"the images under {test_dir} are {tw}x{th} px, those under {root / 'train'} {w}x{h}: a network is "
            "trained, tested and costed at one size; pass --image-size S to resize both splits to S x S"
        )


Listing = tuple[list[Path], list[int], list[str]]


def _folder_source(spec: DataSpec) -> tuple[Path, Path, dict[str, Listing], bool]:
    """The ImageFolder root of ``spec.source``, its test (or val) split, the listing of each split (``train``,
    ``test``: files, labels indexing the training classes, those classes), and whether its images are large (read
    through DataLoader workers rather than decoded into memory). Both splits are checked (same classes, some
    images) before anything is decoded; either path reads the images listed here."""
    root = resolve_folder(Path(spec.source).expanduser())
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    listings = {"train": list_folder(root / "train")}
    files, _, classes = listings["train"]
    listings["test"] = list_folder(test_dir, classes)
    if spec.prepare is not None:  # as the checkpoint's images were prepared, whatever the folder holds
        large = spec.prepare == "crop"
    else:
        large = (spec.image_size is None or spec.image_size > SMALL_MAX) and mostly_larger_than(files, SMALL_MAX)
    return root, test_dir, listings, large


def _tensor_bundle(spec: DataSpec, name: str, arrays: Arrays, pad: int, flip: bool, stats: Stats) -> DataBundle:
    """The bundle of decoded ``arrays`` held in memory: the validation split carved from the training images, the
    seeded subsets, one :class:`TensorLoader` each."""
    x_tr, y_tr, classes = arrays["train"]
    x_te, y_te, _ = arrays["test"]
    mean, std = stats
    tr_idx, va_idx, te_idx = _split(spec, len(y_tr), len(y_te))
    common = {"mean": mean, "std": std, "rank": spec.rank, "world": spec.world, "seed": spec.seed}
    train = TensorLoader(x_tr[tr_idx], y_tr[tr_idx], spec.batch_size, train=True, pad=pad, flip=flip, **common)
    val = TensorLoader(x_tr[va_idx], y_tr[va_idx], spec.eval_batch, **common) if len(va_idx) else None
    test = TensorLoader(x_te[te_idx], y_te[te_idx], spec.eval_batch, **common)
    return DataBundle(
        name,
        len(classes),
        x_tr.shape[-1],
        x_tr.shape[1],
        list(classes),
        mean,
        std,
        train,
        val,
        test,
        _counts(tr_idx, va_idx, te_idx),
    )


def _counts(tr_idx, va_idx, te_idx) -> dict[str, int]:
    """The images in each split, as a bundle records them."""
    return {"train_images": len(tr_idx), "val_images": len(va_idx), "test_images": len(te_idx)}


def _folder_bundle(spec: DataSpec, root: Path, test_dir: Path, listings: dict[str, Listing]) -> DataBundle:
    """The bundle of an ImageFolder of large images: one :class:`FolderLoader` per split, with the standard
    transforms at ``spec.image_size`` (224 by default), over the images ``listings`` lists."""
    size = spec.image_size or 224
    mean, std = spec.stats or IMAGENET_STATS
    classes = listings["train"][2]
    evaluation = folder_transforms(size, False, mean, std)
    training = folder_transforms(size, True, mean, std) if spec.augment is not False else evaluation
    train_full = image_folder(root / "train", training, classes, listings["train"])
    val_full = image_folder(root / "train", evaluation, classes, listings["train"])
    test_ds = image_folder(test_dir, evaluation, classes, listings["test"])
    tr_idx, va_idx, te_idx = _split(spec, len(train_full), len(test_ds))
    common = {"workers": usable_workers(spec.workers), "seed": spec.seed, "rank": spec.rank, "world": spec.world}
    train = FolderLoader(KeyedSubset(train_full, tr_idx.tolist(), spec.seed), spec.batch_size, train=True, **common)
    # ``skipnet eval --split train``: the training images with the evaluation transform, in order, every one
    train.evaluation = FolderLoader(
        KeyedSubset(val_full, tr_idx.tolist(), spec.seed), spec.eval_batch, train=False, **common
    )
    val = (
        FolderLoader(KeyedSubset(val_full, va_idx.tolist(), spec.seed), spec.eval_batch, train=False, **common)
        if len(va_idx)
        else None
    )
    test = FolderLoader(KeyedSubset(test_ds, te_idx.tolist(), spec.seed), spec.eval_batch, train=False, **common)
    return DataBundle(
        root.name,
        len(classes),
        size,
        3,
        list(classes),
        mean,
        std,
        train,
        val,
        test,
        _counts(tr_idx, va_idx, te_idx),
    )
