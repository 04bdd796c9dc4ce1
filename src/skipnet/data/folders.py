"""ImageFolder trees: a directory (or a ``.tar.gz`` of one, extracted atomically once into the cache directory)
with ``train/`` and ``test/`` (or ``val/``) class folders, checked and listed."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
from collections.abc import Iterator
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


def _entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted by name; none (with a warning) when it cannot be listed."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        log.warning("cannot list %s (%s); skipped", folder, exc.strerror or type(exc).__name__)
        return []


def _is(path: Path, kind: str) -> bool:
    """``path.is_dir()`` or ``path.is_file()`` (following links), ``False`` where it cannot be looked at."""
    try:
        return path.is_dir() if kind == "dir" else path.is_file()
    except OSError:  # no permission to look (EACCES), a name too long
        return False


def walk_files(top: Path, seen: set[str] | None = None) -> Iterator[Path]:
    """Every entry under the folder ``top`` that is not a folder (files, broken links, FIFOs: the caller keeps the
    regular files it wants), recursively, in sorted order (by path), the one way skipnet walks a folder of images
    (a split's class folders, ``skipnet predict``'s folders). Hidden files and folders (``.ipynb_checkpoints``,
    macOS ``._x.jpg``) are skipped. Linked folders are followed, but no folder is entered twice: one whose real path
    is in ``seen`` (the real paths entered so far, ``top``'s included; shared by the caller across several tops) is
    skipped with a warning (a link back up the tree, a loop, or a second link to one folder)."""
    seen = set() if seen is None else seen
    seen.add(os.path.realpath(top))
    stack = [iter(_entries(top))]
    while stack:  # depth first, without recursion: a deep tree does not reach Python's recursion limit
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        if not _is(entry, "dir"):  # follows links
            yield entry
            continue
        real = os.path.realpath(entry)
        if real in seen:
            log.warning("skipping %s: it leads to %s, a folder already listed (a loop or a second link)", entry, real)
            continue
        seen.add(real)
        stack.append(iter(_entries(entry)))


def _class_folders(split_dir: Path, classes: list[str] | None) -> list[str]:
    """The class list of a split: its own folders, or ``classes`` (the training split's) once its folders are
    checked against it. Hidden folders are no classes; a name that is not valid UTF-8 is refused (labels, records,
    figures and CSV files could not hold it)."""
    found = sorted(p.name for p in _entries(split_dir) if _is(p, "dir") and not p.name.startswith("."))
    if not found:
        raise SkipnetError(
            f"{split_dir} holds no class folders; put each class's images in its own sub-folder "
            f"({split_dir}/CLASS/IMAGE.jpg)"
        )
    for name in found:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise SkipnetError(
                f"class folder {ascii(name)} under {split_dir} is not named in valid UTF-8 (the class names go into "
                "checkpoints, reports and CSV files); rename it"
            ) from None
    if classes is None:
        return found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise SkipnetError(
            f"{split_dir} has class folders that the training split lacks ({', '.join(extra[:5])}); "
            "both splits need the same classes"
        )
    return list(classes)


def list_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Image files, labels and class names of one split, the one listing of a split's images that every path reads
    (small images decoded, large ones through DataLoader workers). A class's images are the regular image files in
    its folder and, recursively, in its sub-folders (:func:`walk_files`: linked folders followed, none entered
    twice, hidden ones skipped), in sorted order. With ``classes`` (the training split's), labels index that list,
    so a test split may lack a class but must not bring a new one."""
    classes = _class_folders(split_dir, classes)
    files, labels, empty, others = [], [], [], 0
    seen = {os.path.realpath(split_dir)}
    # every class folder is its own class's: a link to it from inside another class is not followed
    seen |= {os.path.realpath(split_dir / c) for c in classes if (split_dir / c).is_dir()}
    walked: dict[str, str] = {}
    for i, c in enumerate(classes):
        folder = split_dir / c
        if not folder.is_dir():
            continue
        real = os.path.realpath(folder)
        if real in walked:  # a link to another class's folder: its images are that class's
            log.warning("%s: class folder %s is %s, listed as class %s; skipped", split_dir, c, real, walked[real])
            continue
        walked[real] = c
        n = len(files)
        for f in walk_files(folder, seen):
            if f.suffix.lower() in IMAGE_EXTS and _is(f, "file"):  # not a FIFO or a broken link: it would block or fail
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
