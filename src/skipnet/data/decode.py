"""Decoding small images: every image of a split into one uint8 tensor, whatever its mode (L, P, RGBA, CMYK,
16-bit), unreadable files and decompression bombs skipped with one warning, cached on disk under a key of the
split's files (``<cache>/tensors/<root>-<split>-<key>.pt``).

The steps are public, and the one home of a small image's preparation (``skipnet predict`` calls them too):
:func:`image_decoder` (torchvision's decoder, its deprecation warnings silenced), :func:`decode_bytes` /
:func:`decode_file` (uint8 RGB, ``None`` if unreadable) and :func:`resize_small` (to S x S, 8 bits)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from skipnet.data.sources import cache_dir
from skipnet.errors import SkipnetError

log = logging.getLogger(__name__)


def _tv_decoder():
    """torchvision's fast decoder (deprecated since torchvision 0.29), or ``None`` where it is gone."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None
    return lambda buf: decode_image(buf, mode=ImageReadMode.RGB)


@contextlib.contextmanager
def image_decoder() -> Iterator[Callable | None]:
    """The decoder :func:`decode_bytes` and :func:`decode_file` take (torchvision's, ``None`` where it is gone: PIL
    decodes alone), with torchvision's warning of its decoders' deprecation (raised on every call) silenced while
    the block runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        yield _tv_decoder()


def _bomb(data: bytes) -> bool:
    """Whether an encoded image declares more pixels than PIL's decompression-bomb limit (a few hundred bytes can
    declare gigabytes; torchvision's decoder has no limit): read from its header, nothing decoded."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return too_many_pixels(im.width, im.height) is not None
    except Image.DecompressionBombError:
        return True
    except Exception:  # noqa: BLE001 - not for PIL to judge: the decoders below report unreadable files
        return False


def decode_file(path: Path, decode=None) -> Tensor | None:
    """The image file at ``path`` as :func:`decode_bytes` decodes it; ``None`` if unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return decode_bytes(data, decode)


def decode_bytes(data: bytes, decode=None) -> Tensor | None:
    """One encoded image as uint8 RGB (3, H, W), whatever its mode (L, P, RGBA, CMYK, 16-bit); ``None`` if it is
    unreadable or declares more pixels than PIL's decompression-bomb limit. ``decode``: :func:`image_decoder`'s."""
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
            rgb = pil_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def resize_small(img: Tensor, size: int) -> Tensor:
    """A uint8 image (C, H, W) as a small-image split holds it at ``size``: resized to S x S (bilinear,
    antialiased) and rounded back to 8 bits; returned as is when it is S x S already."""
    if tuple(img.shape[1:]) == (size, size):
        return img
    out = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def pil_rgb(im):
    """A PIL image as 8-bit RGB, whatever its mode: 16/32-bit integer gray is scaled from 16 bits down to 8
    (``convert("RGB")`` alone clips it, and a 16-bit photo comes out white)."""
    from PIL import Image

    if im.mode.startswith("I"):
        import numpy as np

        im = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) // 257).astype(np.uint8))
    return im.convert("RGB")


# The large-image transforms resize the short side to about S px: an image far longer than wide would become
# millions of pixels long (a 1-px-high, 300,000-px-wide PNG of a few hundred bytes: gigabytes), so it is unreadable.
MAX_ASPECT = 64


def too_elongated(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` px is refused by the large-image path, or ``None``."""
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        return f"{width}x{height} px, its long side over {MAX_ASPECT} times its short side (resized: out of memory)"
    return None


def too_many_pixels(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` px is refused as a decompression bomb (more pixels than PIL's limit,
    ``Image.MAX_IMAGE_PIXELS``; PIL itself only warns up to twice that), or ``None``: one rule for every path."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        return f"{width}x{height} px, more than the decompression-bomb limit of {limit} pixels"
    return None


def pil_loader(path: str):
    """torchvision ImageFolder's loader, reading every mode as :func:`pil_rgb` does; an image longer than
    :data:`MAX_ASPECT` times its width or over the decompression-bomb limit (:func:`too_many_pixels`) raises
    ``ValueError`` (skipped as unreadable, with a warning)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, as on the other paths
        with open(path, "rb") as f, Image.open(f) as im:
            why = too_many_pixels(im.width, im.height) or too_elongated(im.width, im.height)
            if why is not None:
                raise ValueError(why)
            return pil_rgb(im)


def _warn_skipped(split_dir: Path, skipped: list[str], total: int) -> None:
    if skipped:
        head = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        log.warning(
            "skipped %d of %d images under %s that could not be decoded (corrupt, truncated, or over the "
            "decompression-bomb limit of PIL.Image.MAX_IMAGE_PIXELS): %s",
            len(skipped),
            total,
            split_dir,
            head,
        )


def _longer_side(path: Path) -> int | None:
    """The longer side of the image at ``path`` from its header; ``None`` if it is not a readable image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return max(im.size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def mostly_larger_than(files: list[Path], side: int, sample: int = 31) -> bool:
    """Whether most of ``files`` have a side over ``side`` px, judged from the headers of up to ``sample`` of them
    spread evenly over the list (not the first alone: one odd image must not decide how a folder is read)."""
    n = len(files)
    picks = [files[i * n // sample] for i in range(sample)] if n > sample else files
    sizes = [s for s in map(_longer_side, picks) if s is not None]
    if not sizes:  # none of the sample is readable: any image of the folder decides
        first = next((s for s in map(_longer_side, files) if s is not None), None)
        if first is None:
            raise SkipnetError(
                f"none of the {n} images under {files[0].parent.parent} could be decoded (e.g. {files[0]}); "
                "they are corrupt, truncated or not images: replace them"
            )
        sizes = [first]
    return 2 * sum(s > side for s in sizes) > len(sizes)


def _folder_key(split_dir: Path, files: list[Path], size: int | None, classes: list[str]) -> str:
    """Cache key over the split's path, the class list its labels index (the training split's, for a test
    split: a class added to or removed from train/ relabels test/), every file's name, size and mtime, and the
    resize target."""

    def text(s: str) -> bytes:  # a file name that is not UTF-8 is held as surrogates: its own bytes back
        return s.encode("utf-8", "surrogateescape")

    h = hashlib.sha1(text(f"{split_dir.resolve()}:{size}:{json.dumps(list(classes))}"))
    for f in files:
        name = f.relative_to(split_dir).as_posix()  # CLASS/IMAGE, or CLASS/SUB/.../IMAGE
        try:
            st = f.stat()
            h.update(text(f"{name}:{st.st_size}:{st.st_mtime_ns}\n"))
        except OSError:
            h.update(text(f"{name}:gone\n"))
    return h.hexdigest()[:16]


def decode_folder(
    split_dir: Path, size: int | None, listing: tuple[list[Path], list[int], list[str]]
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode every image of a small-image split into one uint8 tensor, cached on disk.

    Unreadable files are skipped with one warning (count and first paths); a split with no readable image fails.
    ``listing``: the split's :func:`~skipnet.data.folders.list_folder` (files, labels, classes).
    """
    files, labels, classes = listing
    key = _folder_key(split_dir, files, size, classes)
    cache = cache_dir() / "tensors" / f"{split_dir.parent.name}-{split_dir.name}-{key}.pt"
    cached = _read_cache(cache, split_dir, classes, len(files))
    if cached is not None:
        return cached
    log.info("decoding %d images from %s (once; cached at %s)", len(files), split_dir, cache)
    x, y, skipped = _decode_all(split_dir, files, labels, size)
    _write_cache(cache, {"images": x, "labels": y, "classes": classes, "skipped": skipped})
    return x, y, classes


def _read_cache(
    cache: Path, split_dir: Path, classes: list[str], total: int
) -> tuple[Tensor, Tensor, list[str]] | None:
    """The cached split, or ``None`` when there is none, or it is damaged or stale (it is then decoded again)."""
    if not cache.exists():
        return None
    try:
        data = torch.load(cache, weights_only=True)
        if list(data["classes"]) != list(classes):  # labels index another class list: decode again
            raise ValueError("stale class list")
        _warn_skipped(split_dir, list(data.get("skipped", [])), total)
        return data["images"], data["labels"], list(classes)
    except Exception:  # noqa: BLE001 - a damaged or stale cache is rebuilt
        log.warning("ignoring unreadable cache %s; decoding again", cache)
        return None


def _decode_all(
    split_dir: Path, files: list[Path], labels: list[int], size: int | None
) -> tuple[Tensor, Tensor, list[str]]:
    """Images (resized to ``size``) and labels of the readable ``files``, and the paths of those skipped."""
    images, kept, skipped = [], [], []
    with image_decoder() as decode:
        for f, label in zip(files, labels):
            img = decode_file(f, decode)
            if img is None:
                skipped.append(str(f))
                continue
            images.append(img if size is None else resize_small(img, size))
            kept.append(label)
    if not images:
        raise SkipnetError(
            f"none of the {len(files)} images under {split_dir} could be decoded (e.g. {skipped[0]}); "
            "they are corrupt, truncated, not images or over the decompression-bomb limit: replace them"
        )
    _warn_skipped(split_dir, skipped, len(files))
    try:
        x = torch.stack(images)
    except RuntimeError:
        raise SkipnetError(f"images under {split_dir} differ in size; pass --image-size to resize them") from None
    return x, torch.tensor(kept), skipped


def _write_cache(cache: Path, data: dict) -> None:
    """Save the decoded split (``images``, ``labels``, ``classes``, ``skipped``); a failure only warns."""
    from skipnet.fileio import atomic_save

    try:
        atomic_save(data, cache)
    except (OSError, SkipnetError) as exc:  # the cache is an optimisation: a full disk must not stop the run
        log.warning("could not write the decoded-image cache %s (%s); continuing without it", cache, exc)
