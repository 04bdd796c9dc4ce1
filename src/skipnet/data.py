"""Data: torchvision data sets, ImageFolder trees (and the bundled CIFAR-10 JPEG tarball), sklearn digits.

Small images (<= 64 px) are decoded once into a uint8 tensor cache (kept on disk under the cache directory)
and augmented batch-wise on tensors -- padded random crop and horizontal flip drawn per sample -- so that
two CPU cores are not spent in PIL. Large images (ImageNet) go through DataLoader workers with the standard
transforms (RandomResizedCrop 224 + flip; resize 256 + centre crop 224).

A validation split is carved from the training set with a fixed seed (``--val-split``) so that model
selection never touches the test set. Every loader can be sharded across distributed ranks.

ImageFolder input is checked, not trusted: a missing or empty directory, a split without class folders or
images, or test classes that the training split lacks are one-line ``SkipnetError`` messages. Grayscale,
palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB. Corrupt or truncated files are skipped:
small-image splits log one warning with their count and the first few paths (and fail if *every* image of a
split is unreadable); large-image splits replace an unreadable file by the next image of the folder when they
meet it, with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        self._drop_last = drop_last
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n = len(self.labels)
        return n // self.world if self.train or self.world > 1 else n

    @property
    def drop_last(self) -> bool:
        """Training drops the last partial batch; evaluation (also of the train split) keeps it."""
        return self.train if self._drop_last is None else self._drop_last

    def __len__(self) -> int:
        n = self.num_samples
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        if batches == 0 and self.train:
            raise SkipnetError(
                f"training split has {n} images, fewer than one batch of {self.batch_size}; "
                "lower --batch-size or add images"
            )
        return batches

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


def _check_rest(tar: tarfile.TarFile) -> None:
    """After extraction, read the archive to its end: a damaged header makes tarfile stop early without a word (its
    members after it would be lost), and gzip checks its CRC only at the end of the stream."""
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):  # past the last member there is only zero padding
            raise tarfile.ReadError(f"members after {tar.members[-1].name if tar.members else 'the start'} are damaged")


def _extract(archive: Path, dest: Path) -> None:
    """Extract ``archive`` to ``dest`` atomically: into a directory of this process's own, renamed into place when
    complete, so that two processes extracting at once never read (or delete) each other's half-written files."""
    log.info("extracting %s to %s", archive, dest)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
            _check_rest(tar)
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SkipnetError(
            f"cannot extract {archive} ({type(exc).__name__}: {exc}); is it a complete .tar.gz? download or copy "
            "it again"
        ) from None
    (tmp / ".complete").touch()
    if dest.exists() and not (dest / ".complete").exists():  # left by an extraction that was killed
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process put its complete copy there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / ".complete").exists():
            raise SkipnetError(f"cannot extract {archive} to {dest}: the directory is in use or not writable") from None


def resolve_folder(path: Path) -> Path:
    """An ImageFolder root for ``path``: a directory with ``train/`` and ``test/`` or ``val/``, or a
    ``.tar.gz`` archive holding one (extracted once into the cache directory)."""
    if path.is_file() and (path.name.endswith((".tar.gz", ".tgz", ".tar"))):
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime}".encode()).hexdigest()[:12]
        dest = cache_dir() / "extracted" / f"{path.name.split('.')[0]}-{key}"
        if not (dest / ".complete").exists():
            _extract(path, dest)
        path = dest
    if not path.exists():
        raise SkipnetError(
            f"data {str(path)!r} does not exist; pass one of {', '.join(BUILTIN)}, or an ImageFolder directory "
            "(train/ and test/ class folders) or .tar.gz of one"
        )
    if not path.is_dir():
        raise SkipnetError(f"data {str(path)!r} is neither a known data set ({', '.join(BUILTIN)}) nor a directory")
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if not subdirs and not any(path.iterdir()):
        raise SkipnetError(f"data directory {path} is empty; put train/ and test/ (or val/) class folders in it")
    for candidate in [path, *subdirs]:
        if (candidate / "train").is_dir() and any((candidate / s).is_dir() for s in ("test", "val")):
            return candidate
    raise SkipnetError(f"{path} is not an ImageFolder root: expected train/ and test/ (or val/) class folders")


def _list_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Image files, labels and class names of one split. With ``classes`` (the training split's), labels index
    that list, so a test split may lack a class but must not bring a new one."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        raise SkipnetError(
            f"{split_dir} holds no class folders; put each class's images in its own sub-folder "
            f"({split_dir}/CLASS/IMAGE.jpg)"
        )
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise SkipnetError(
                f"{split_dir} has class folders that the training split lacks ({', '.join(extra[:5])}); "
                "both splits need the same classes"
            )
    files, labels, empty, others = [], [], [], 0
    for i, c in enumerate(classes):
        if not (split_dir / c).is_dir():
            continue
        n = len(files)
        for f in sorted((split_dir / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                files.append(f)
                labels.append(i)
            else:
                others += 1
        if len(files) == n:
            empty.append(c)
    if not files:
        what = f" ({others} other files)" if others else ""
        raise SkipnetError(
            f"{split_dir} holds no images{what}: its class folders need files ending in {', '.join(sorted(IMAGE_EXTS))}"
        )
    if empty:
        log.warning("%s: %d class folder(s) hold no images: %s", split_dir, len(empty), ", ".join(empty[:5]))
    return files, labels, classes


def _tv_decoder():
    """torchvision's fast decoder (deprecated since torchvision 0.29), or ``None`` where it is gone."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None
    return lambda buf: decode_image(buf, mode=ImageReadMode.RGB)


def _bomb(data: bytes) -> bool:
    """Whether an encoded image declares more pixels than PIL's decompression-bomb limit (a few hundred bytes can
    declare gigabytes; torchvision's decoder has no limit): read from its header, nothing decoded."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.width * im.height > (Image.MAX_IMAGE_PIXELS or float("inf"))
    except Image.DecompressionBombError:
        return True
    except Exception:  # noqa: BLE001 - not for PIL to judge: the decoders below report unreadable files
        return False


def _decode_file(path: Path, decode=None) -> Tensor | None:
    """One image as uint8 RGB (3, H, W), whatever its mode (L, P, RGBA, CMYK, 16-bit); ``None`` if unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data or _bomb(data):
        return None
    try:
        if decode is None:
            raise ValueError("no torchvision decoder")
        img = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if img.dtype == torch.uint16:
            img = (img.to(torch.int32) // 257).to(torch.uint8)
        if img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3:
            return img
    except (RuntimeError, ValueError):
        pass
    from PIL import Image  # formats torchvision does not decode (BMP, TIFF, PPM), and its failures

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode.startswith("I"):  # 16/32-bit integer gray: scale 16 bits down to 8 (convert() would clip)
                import numpy as np

                im = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) // 257).astype(np.uint8))
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def _warn_skipped(split_dir: Path, skipped: list[str], total: int) -> None:
    if skipped:
        head = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        log.warning(
            "skipped %d of %d images under %s that could not be decoded (corrupt or truncated): %s",
            len(skipped),
            total,
            split_dir,
            head,
        )


def _image_size(files: list[Path]) -> tuple[int, int]:
    """Size of the first readable image of ``files``."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                return im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    raise SkipnetError(
        f"none of the {len(files)} images under {files[0].parent.parent} could be decoded (e.g. {files[0]}); "
        "they are corrupt, truncated or not images: replace them"
    )


def _folder_key(split_dir: Path, files: list[Path], size: int | None, classes: list[str]) -> str:
    """Cache key over the split's path, the class list its labels index (the training split's, for a test
    split: a class added to or removed from train/ relabels test/), every file's name, size and mtime, and the
    resize target."""
    h = hashlib.sha1(f"{split_dir.resolve()}:{size}:{json.dumps(list(classes))}".encode())
    for f in files:
        try:
            st = f.stat()
            h.update(f"{f.parent.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f.parent.name}/{f.name}:gone\n".encode())
    return h.hexdigest()[:16]


def _decode_folder(
    split_dir: Path, size: int | None, classes: list[str] | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode every image of a small-image split into one uint8 tensor, cached on disk.

    Unreadable files are skipped with one warning (count and first paths); a split with no readable image fails.
    """
    files, labels, classes = _list_folder(split_dir, classes)
    key = _folder_key(split_dir, files, size, classes)
    cache = cache_dir() / "tensors" / f"{split_dir.parent.name}-{split_dir.name}-{key}.pt"
    if cache.exists():
        try:
            data = torch.load(cache, weights_only=True)
            if list(data["classes"]) != list(classes):  # labels index another class list: decode again
                raise ValueError("stale class list")
            _warn_skipped(split_dir, list(data.get("skipped", [])), len(files))
            return data["images"], data["labels"], list(classes)
        except Exception:  # noqa: BLE001 - a damaged or stale cache is rebuilt
            log.warning("ignoring unreadable cache %s; decoding again", cache)

    log.info("decoding %d images from %s (once; cached at %s)", len(files), split_dir, cache)
    images, kept, skipped = [], [], []
    decode = _tv_decoder()
    with warnings.catch_warnings():  # torchvision warns of its decoders' deprecation on every call
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        for f, label in zip(files, labels):
            img = _decode_file(f, decode)
            if img is None:
                skipped.append(str(f))
                continue
            if size is not None and tuple(img.shape[1:]) != (size, size):
                img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
                img = img.round().clamp(0, 255).to(torch.uint8)
            images.append(img)
            kept.append(label)
    if not images:
        raise SkipnetError(
            f"none of the {len(files)} images under {split_dir} could be decoded (e.g. {skipped[0]}); "
            "they are corrupt, truncated or not images: replace them"
        )
    _warn_skipped(split_dir, skipped, len(files))
    try:
        x = torch.stack(images)
    except RuntimeError:
        raise SkipnetError(f"images under {split_dir} differ in size; pass --image-size to resize them") from None
    y = torch.tensor(kept)
    from skipnet.fileio import atomic_save

    try:
        atomic_save({"images": x, "labels": y, "classes": classes, "skipped": skipped}, cache)
    except (OSError, SkipnetError) as exc:  # the cache is an optimisation: a full disk must not stop the run
        log.warning("could not write the decoded-image cache %s (%s); continuing without it", cache, exc)
    return x, y, classes


class SafeFolder(torch.utils.data.Dataset):
    """An ImageFolder that replaces an unreadable image by the next readable one, with a warning."""

    MAX_TRIES = 50

    def __init__(self, folder) -> None:
        self.folder = folder
        self.classes = folder.classes
        self.bad: set[str] = set()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        from PIL import Image

        n = len(self.folder)
        path = ""
        for k in range(min(n, self.MAX_TRIES)):
            i = (index + k) % n
            try:
                return self.folder[i]
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                path = self.folder.samples[i][0]
                if path not in self.bad:
                    self.bad.add(path)
                    log.warning("skipping unreadable image %s (%s); using the next one", path, type(exc).__name__)
        raise SkipnetError(
            f"{min(n, self.MAX_TRIES)} consecutive images under {self.folder.root} could not be decoded "
            f"(e.g. {path}); they are corrupt or truncated: replace them"
        )


def _image_folder(split_dir: Path, transform, classes: list[str]) -> SafeFolder:
    """torchvision's ImageFolder over ``split_dir``, its labels indexing the training split's ``classes``."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(split_dir), transform, allow_empty=True)
    index = {c: i for i, c in enumerate(classes)}
    folder.samples = [(path, index[folder.classes[t]]) for path, t in folder.samples]
    folder.imgs = folder.samples
    folder.targets = [t for _, t in folder.samples]
    folder.classes, folder.class_to_idx = list(classes), index
    return SafeFolder(folder)


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
        files, _, train_classes = _list_folder(root / "train")
        _list_folder(test_dir, train_classes)  # same classes, some images: checked before any decoding
        w, h = _image_size(files)
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
        arrays = {
            "train": _decode_folder(root / "train", image_size),
            "test": _decode_folder(test_dir, image_size, train_classes),
        }
        pad, flip = 4, True
    if augment is False:
        pad, flip = 0, False
    if stats is None:
        stats = STATS.get(spec) or _compute_stats(arrays["train"][0])
    loaders = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, "rank": rank, "world": world}
    return _tensor_bundle(name, arrays, pad, flip, stats, val_split, seed, limit_train, limit_test, **loaders)


def _tensor_bundle(
    name: str,
    arrays: dict[str, tuple],
    pad: int,
    flip: bool,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    val_split: float,
    seed: int,
    limit_train: int | None,
    limit_test: int | None,
    **loaders: Any,
) -> DataBundle:
    """The bundle of decoded ``arrays`` (``train`` / ``test``: images, labels, classes) held in memory:
    the validation split carved from the training images, the seeded subsets, one :class:`TensorLoader` each.
    ``loaders``: ``batch_size``, ``eval_batch_size``, ``rank``, ``world``."""
    batch_size, eval_batch_size = loaders["batch_size"], loaders["eval_batch_size"]
    x_tr, y_tr, classes = arrays["train"]
    x_te, y_te, _ = arrays["test"]
    mean, std = stats
    tr_idx, va_idx = _carve_val(len(y_tr), val_split)
    tr_idx = tr_idx[_limit(len(tr_idx), limit_train, 0)]
    if len(va_idx) and limit_test:
        va_idx = va_idx[_limit(len(va_idx), limit_test, 1)]
    te_idx = _limit(len(y_te), limit_test, 2)
    common = {"mean": mean, "std": std, "rank": loaders["rank"], "world": loaders["world"], "seed": seed}
    train = TensorLoader(x_tr[tr_idx], y_tr[tr_idx], batch_size, train=True, pad=pad, flip=flip, **common)
    val = TensorLoader(x_tr[va_idx], y_tr[va_idx], eval_batch_size, **common) if len(va_idx) else None
    test = TensorLoader(x_te[te_idx], y_te[te_idx], eval_batch_size, **common)
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

    mean, std = stats or STATS["imagenet"]
    _, _, classes = _list_folder(root / "train")
    train_full = _image_folder(root / "train", _folder_transforms(size, True, mean, std), classes)
    val_full = _image_folder(root / "train", _folder_transforms(size, False, mean, std), classes)
    test_ds = _image_folder(test_dir, _folder_transforms(size, False, mean, std), classes)
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
