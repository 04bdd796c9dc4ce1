"""ImageFolder trees: a directory (or a ``.tar.gz`` of one, extracted atomically once into the cache directory)
with ``train/`` and ``test/`` (or ``val/``) class folders, checked and listed."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
from pathlib import Path

from skipnet.data.sources import BUILTIN, cache_dir
from skipnet.errors import SkipnetError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


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
        raise SkipnetError(
            f"data {str(path)!r} is neither a known data set ({', '.join(BUILTIN)}) nor a directory; the archives "
            "read are .tar, .tar.gz and .tgz"
        )
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs and not any(path.iterdir()):
        raise SkipnetError(f"data directory {path} is empty; put train/ and test/ (or val/) class folders in it")
    roots = [c for c in [path, *subdirs] if (c / "train").is_dir() and any((c / s).is_dir() for s in ("test", "val"))]
    if roots and roots[0] == path or len(roots) == 1:
        return roots[0]
    if roots:  # an archive or folder of several data sets: which one is meant is the user's to say
        raise SkipnetError(
            f"{path} holds {len(roots)} ImageFolder roots ({', '.join(r.name for r in roots[:4])}); pass the one to use"
        )
    raise SkipnetError(f"{path} is not an ImageFolder root: expected train/ and test/ (or val/) class folders")


def list_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Image files, labels and class names of one split. With ``classes`` (the training split's), labels index
    that list, so a test split may lack a class but must not bring a new one."""
    # hidden folders (.ipynb_checkpoints, .git) are no classes, nor hidden files (macOS ._x.jpg) images
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
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
            if f.suffix.lower() in IMAGE_EXTS and f.is_file() and not f.name.startswith("."):
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
