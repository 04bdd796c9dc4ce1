"""Data: torchvision data sets, ImageFolder trees (and the bundled CIFAR-10 JPEG tarball), sklearn digits.

Small images (<= 64 px) are decoded once into a uint8 tensor cache (kept on disk under the cache directory)
and augmented batch-wise on tensors -- padded random crop and horizontal flip drawn per sample -- so that
two CPU cores are not spent in PIL. Large images (ImageNet) go through DataLoader workers with the standard
transforms (RandomResizedCrop 224 + flip; resize 256 + centre crop 224).

A validation split is carved from the training set with a fixed seed (``--val-split``) so that model
selection never touches the test set. Every loader can be sharded across distributed ranks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from skipnet.errors import SkipnetError

log = logging.getLogger(__name__)

SPLIT_SEED = 20180908  # the validation split never depends on the training seed

STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
BUILTIN = ("cifar10", "cifar100", "svhn", "digits")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}
SMALL_MAX = 64


def cache_dir() -> Path:
    """Where decoded tensors and extracted archives live (``$SKIPNET_CACHE`` or ``~/.cache/skipnet``)."""
    return Path(os.environ.get("SKIPNET_CACHE", Path.home() / ".cache" / "skipnet"))


# --------------------------------------------------------------------------------------------- loaders
class TensorLoader:
    """Batches from an in-memory uint8 image tensor (N, C, H, W), augmented on tensors.

    Yields ``(images, labels)`` with images float32, normalised, channels_last. Iteration order and
    augmentation are a function of ``(seed, epoch)`` only, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        train: bool = False,
        pad: int = 4,
        flip: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.pad, self.flip = batch_size, train, pad, flip
        self.seed, self.epoch, self.rank, self.world = seed, 0, rank, world
        self.drop_last = train if drop_last is None else drop_last
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n = len(self.labels)
        return n // self.world if self.train or self.world > 1 else n

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> Tensor:
        n = len(self.labels)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world > 1:  # equal shards: every rank runs the same number of steps
            per = n // self.world
            order = order[self.rank * per : (self.rank + 1) * per] if self.train else order[self.rank :: self.world]
        return order

    def normalize(self, x: Tensor) -> Tensor:
        return ((x.float() / 255.0) - self.mean) / self.std

    def augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Padded random crop and horizontal flip, drawn per sample, on a uint8 batch."""
        b, _, h, w = x.shape
        if self.pad:
            p = self.pad
            xp = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
            rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, h, 1)
            cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, w)
            # (b, h, w, C) by advanced indexing, back to (b, C, h, w)
            x = xp.permute(0, 2, 3, 1)[torch.arange(b).view(b, 1, 1), rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            flip = torch.rand(b, generator=g) < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        return x

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._order()
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank)
        n = len(order)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if self.train:
                x = self.augment(x, g)
            x = self.normalize(x).contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


class FolderLoader:
    """DataLoader over an ImageFolder of large images with the standard ImageNet transforms."""

    def __init__(self, dataset, batch_size: int, *, train: bool, workers: int, seed: int, rank: int, world: int):
        from torch.utils.data import DataLoader, DistributedSampler

        self.dataset, self.train, self.seed, self.epoch = dataset, train, seed, 0
        self.sampler = None
        if world > 1:
            self.sampler = DistributedSampler(dataset, world, rank, shuffle=train, seed=seed, drop_last=train)
        gen = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and self.sampler is None,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=train,
            persistent_workers=workers > 0,
            generator=gen,
        )

    @property
    def num_samples(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        else:
            self.loader.generator.manual_seed(self.seed * 100003 + epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield x.contiguous(memory_format=torch.channels_last), y


# ------------------------------------------------------------------------------------------ the bundle
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
            raise SkipnetError(f"split {name!r} is not available (use --val-split to carve a validation split)")
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


def _compute_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images[: min(len(images), 20000)].float() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# ------------------------------------------------------------------------------------------ sources
def _torchvision_arrays(name: str, root: Path, download: bool) -> dict[str, tuple[Tensor, Tensor, list[str]]]:
    import torchvision.datasets as tvd

    def missing(exc: Exception) -> SkipnetError:
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


def _digits() -> dict[str, tuple[Tensor, Tensor, list[str]]]:
    """scikit-learn's 8x8 digits (1,797 real images, shipped inside the package): a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype("uint8")).unsqueeze(1)
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    k = len(y) // 5
    classes = [str(i) for i in range(10)]
    return {"train": (x[perm[k:]], y[perm[k:]], classes), "test": (x[perm[:k]], y[perm[:k]], classes)}


def resolve_folder(path: Path) -> Path:
    """An ImageFolder root for ``path``: a directory with ``train/`` and ``test/`` or ``val/``, or a
    ``.tar.gz`` archive holding one (extracted once into the cache directory)."""
    if path.is_file() and (path.name.endswith((".tar.gz", ".tgz", ".tar"))):
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime}".encode()).hexdigest()[:12]
        dest = cache_dir() / "extracted" / f"{path.name.split('.')[0]}-{key}"
        if not (dest / ".complete").exists():
            log.info("extracting %s to %s", path, dest)
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(path) as tar:
                tar.extractall(dest, filter="data")
            (dest / ".complete").touch()
        path = dest
    if not path.is_dir():
        raise SkipnetError(f"data {str(path)!r} is neither a known data set ({', '.join(BUILTIN)}) nor a directory")
    for candidate in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() and any((candidate / s).is_dir() for s in ("test", "val")):
            return candidate
    raise SkipnetError(f"{path} is not an ImageFolder root: expected train/ and test/ (or val/) class folders")


def _list_folder(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise SkipnetError(f"{split_dir} holds no class folders")
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((split_dir / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                files.append(f)
                labels.append(i)
    if not files:
        raise SkipnetError(f"{split_dir} holds no images")
    return files, labels, classes


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _decode_folder(split_dir: Path, size: int | None) -> tuple[Tensor, Tensor, list[str]]:
    """Decode every image of a small-image split into one uint8 tensor, cached on disk."""
    files, labels, classes = _list_folder(split_dir)
    stat = split_dir.stat()
    key = hashlib.sha1(f"{split_dir.resolve()}:{len(files)}:{stat.st_mtime}:{size}".encode()).hexdigest()[:16]
    cache = cache_dir() / "tensors" / f"{split_dir.parent.name}-{split_dir.name}-{key}.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        return data["images"], data["labels"], data["classes"]
    from torchvision.io import ImageReadMode, decode_image

    log.info("decoding %d images from %s (once; cached at %s)", len(files), split_dir, cache)
    images = []
    for f in files:
        img = decode_image(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if size is not None and tuple(img.shape[1:]) != (size, size):
            img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
            img = img.round().clamp(0, 255).to(torch.uint8)
        images.append(img)
    try:
        x = torch.stack(images)
    except RuntimeError:
        raise SkipnetError(f"images under {split_dir} differ in size; pass --image-size to resize them") from None
    y = torch.tensor(labels)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"images": x, "labels": y, "classes": classes}, tmp)
    os.replace(tmp, cache)
    return x, y, classes


def _folder_transforms(size: int, train: bool, mean, std):
    from torchvision import transforms as T

    norm = T.Normalize(mean, std)
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(), norm])


# ------------------------------------------------------------------------------------------ entry point
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
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    augment: bool | None = None,
) -> DataBundle:
    """Load data set ``spec``: ``cifar10``, ``cifar100``, ``svhn``, ``digits`` or an ImageFolder path/archive.

    Args:
        val_split: fraction of the training set held out (fixed seed) for model selection.
        limit_train, limit_test: keep a seeded random subset of that many images (quick experiments).
        image_size: resize images of an ImageFolder to this size (small images) or crop size (large).
        stats: normalisation (mean, std) to use instead of the data set's own (checkpoints carry theirs).
        augment: override the default augmentation (on for CIFAR/ImageFolder, off for SVHN and digits).
    """
    eval_batch_size = eval_batch_size or max(batch_size, 256)
    if spec in BUILTIN:
        if spec == "digits":
            arrays = _digits()
            pad, flip = 1, False
        else:
            root = Path(data_dir) if data_dir else cache_dir() / "datasets"
            arrays = _torchvision_arrays(spec, root, download)
            pad, flip = (0, False) if spec == "svhn" else (4, True)
        name = spec
    else:
        root = resolve_folder(Path(spec).expanduser())
        name = root.name
        test_dir = root / "test" if (root / "test").is_dir() else root / "val"
        files, _, _ = _list_folder(root / "train")
        w, h = _image_size(files[0])
        if max(w, h) > SMALL_MAX and (image_size is None or image_size > SMALL_MAX):
            return _folder_bundle(
                root,
                test_dir,
                batch_size,
                eval_batch_size,
                val_split,
                seed,
                workers,
                rank,
                world,
                limit_train,
                limit_test,
                image_size or 224,
                stats,
            )
        arrays = {"train": _decode_folder(root / "train", image_size), "test": _decode_folder(test_dir, image_size)}
        pad, flip = 4, True
    if augment is False:
        pad, flip = 0, False
    x_tr, y_tr, classes = arrays["train"]
    x_te, y_te, _ = arrays["test"]
    if stats is None:
        stats = STATS.get(spec) or _compute_stats(x_tr)
    mean, std = stats
    tr_idx, va_idx = _carve_val(len(y_tr), val_split)
    tr_idx = tr_idx[_limit(len(tr_idx), limit_train, 0)]
    if len(va_idx) and limit_test:
        va_idx = va_idx[_limit(len(va_idx), limit_test, 1)]
    te_idx = _limit(len(y_te), limit_test, 2)
    common = {"mean": mean, "std": std, "rank": rank, "world": world, "seed": seed}
    train = TensorLoader(x_tr[tr_idx], y_tr[tr_idx], batch_size, train=True, pad=pad, flip=flip, **common)
    val = TensorLoader(x_tr[va_idx], y_tr[va_idx], eval_batch_size, **common) if len(va_idx) else None
    test = TensorLoader(x_te[te_idx], y_te[te_idx], eval_batch_size, **common)
    if len(train) == 0:
        raise SkipnetError(f"training split has {len(tr_idx)} images, fewer than one batch of {batch_size}")
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
        {"train_images": len(tr_idx), "val_images": len(va_idx), "test_images": len(te_idx)},
    )


def _folder_bundle(
    root,
    test_dir,
    batch_size,
    eval_batch_size,
    val_split,
    seed,
    workers,
    rank,
    world,
    limit_train,
    limit_test,
    size,
    stats,
) -> DataBundle:
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    mean, std = stats or STATS["imagenet"]
    train_full = ImageFolder(str(root / "train"), _folder_transforms(size, True, mean, std))
    val_full = ImageFolder(str(root / "train"), _folder_transforms(size, False, mean, std))
    test_ds = ImageFolder(str(test_dir), _folder_transforms(size, False, mean, std))
    tr_idx, va_idx = _carve_val(len(train_full), val_split)
    tr_idx = tr_idx[_limit(len(tr_idx), limit_train, 0)]
    te_idx = _limit(len(test_ds), limit_test, 2)
    common = {"workers": workers, "seed": seed, "rank": rank, "world": world}
    train = FolderLoader(Subset(train_full, tr_idx.tolist()), batch_size, train=True, **common)
    val = (
        FolderLoader(Subset(val_full, va_idx.tolist()), eval_batch_size, train=False, **common) if len(va_idx) else None
    )
    test = FolderLoader(Subset(test_ds, te_idx.tolist()), eval_batch_size, train=False, **common)
    return DataBundle(
        root.name,
        len(train_full.classes),
        size,
        3,
        list(train_full.classes),
        mean,
        std,
        train,
        val,
        test,
        {"train_images": len(tr_idx), "val_images": len(va_idx), "test_images": len(te_idx)},
    )
