"""The files of a run directory that are not checkpoints: its lock and its ``metrics.jsonl``.

- **Lock.** :func:`run_lock` holds a POSIX lock on ``DIR/.lock`` (which names the holder's pid and host) while a
  run writes into ``DIR``: a second writer is refused with one line naming the holder. The lock must be skipnet's
  own plain file (a symbolic link or hard link is refused, never followed or truncated), and a directory holding a
  file of a run's names that skipnet did not write (a user's ``config.json``, ``steps.csv``) is refused too. The
  kernel releases the lock when its process ends in any way (``kill -9`` included), so a lock file left behind is
  never stale.
  Locks nest within one process; DataLoader workers (forked) do not inherit it.
- **Metrics rows.** :func:`append_row` appends one JSON line and fsyncs; a failed write (a full disk) is cut back
  to the previous end of the file and reported naming the file. :func:`read_rows` drops a torn line (a writer
  killed mid-row) instead of failing on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_write, fault_point, json_text

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# The files of a run directory, named once: the latest round's checkpoint, the one --select chose, the options the
# run was started with, one JSON row per evaluation, and the final summary.
LAST, BEST, CONFIG = "last.pt", "best.pt", "config.json"
METRICS, SUMMARY = "metrics.jsonl", "summary.json"
_held: dict[Path, int] = {}  # lock path -> nesting depth, for this process


@contextmanager
def run_lock(directory: str | Path) -> Iterator[None]:
    """Hold the run directory ``directory`` (created if missing) for this process; refuse if another holds it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SkipnetError(f"--out {directory} is a file, not a run directory; choose another --out")
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SkipnetError(
            f"--out {directory}: a parent of it is a file, not a directory; choose another --out"
        ) from None
    path = directory.resolve() / LOCK_NAME  # the directory resolved, never the lock file: a link is not followed
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    if not created:  # before anything is written there, the lock file included
        _refuse_foreign(directory)
    fd = _open_lock(path)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. ENOLCK: a file system without locks
                log.warning("cannot lock %s (%s); make sure that no other run writes there", directory, exc.strerror)
                yield
                return
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise SkipnetError(
                f"{directory} is in use by another skipnet run ({who}); wait for it to end or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
            if created and {p.name for p in directory.iterdir()} == {LOCK_NAME}:
                path.unlink(missing_ok=True)  # nothing was written: leave no empty run directory behind
                directory.rmdir()
    finally:
        os.close(fd)  # releases the lock


def _open_lock(path: Path) -> int:
    """Open (or create) the lock file ``path`` for writing its holder, refusing anything but skipnet's own plain
    file: a symbolic link (its target would be truncated), a file with other hard links, a directory or a device."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise SkipnetError(
                f"{path} is a symbolic link; skipnet's run lock must be a plain file (remove the link)"
            ) from None
        if exc.errno in (errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
            raise SkipnetError(f"{path} cannot be skipnet's run lock ({exc.strerror}); remove it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a plain file"
        raise SkipnetError(f"{path} {what}; skipnet's run lock must be its own plain file (remove it)")
    return fd


def _looks_like(path: Path, test) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        return bool(test(head))
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _json_object_with(keys: tuple[str, ...]):
    def test(head: bytes) -> bool:
        obj = json.loads(head.decode())
        return isinstance(obj, dict) and all(k in obj for k in keys)

    return test


def _first_row_has_step(head: bytes) -> bool:
    line = next((ln for ln in head.decode(errors="replace").splitlines() if ln.strip()), None)
    if line is None:
        return True  # empty: nothing to lose
    row = json.loads(line)
    return isinstance(row, dict) and "step" in row


# What skipnet writes in a run directory, and how to tell that an existing file of that name is skipnet's (a file
# of these names that is not would be overwritten or appended to by a new run).
RUN_FILES = {
    CONFIG: lambda p: _looks_like(p, _json_object_with(("arch", "stage", "out"))),
    SUMMARY: lambda p: _looks_like(p, _json_object_with(("stage", "arch"))),
    METRICS: lambda p: _looks_like(p, _first_row_has_step),
    "steps.csv": lambda p: p.stat().st_size == 0 or _looks_like(p, lambda h: h.startswith(b"step,")),
    LAST: lambda p: _looks_like(p, lambda h: h.startswith(b"PK")),  # torch.save's zip archive
    BEST: lambda p: _looks_like(p, lambda h: h.startswith(b"PK")),
    "tensorboard": lambda p: p.is_dir() and not p.is_symlink(),
}


def foreign_run_files(directory: str | Path) -> list[str]:
    """Names of files in ``directory`` that a run would write but that are not skipnet's: a user's own
    ``config.json``, ``steps.csv``, ``best.pt`` ... (a symbolic link under one of these names counts too: writing
    through it would change its target)."""
    directory = Path(directory)
    found = []
    for name, ours in RUN_FILES.items():
        path = directory / name
        if path.is_symlink() or (path.exists() and not ((path.is_file() or name == "tensorboard") and ours(path))):
            found.append(name)
    return found


def _refuse_foreign(directory: Path) -> None:
    foreign = foreign_run_files(directory)
    if foreign:
        raise SkipnetError(
            f"--out {directory} holds {', '.join(foreign[:3])} that skipnet did not write, and a run there would "
            "overwrite it; choose another --out (or move the file away)"
        )


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line and fsync; on failure the file is cut back to its previous end."""
    path = Path(path)
    data = (json_text(row) + "\n").encode()  # a non-finite number as null: every line stays valid JSON
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        end = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
            fault_point(f"append to {path.name}")
            os.fsync(fd)
            fault_point(f"fsync {path.name}")
        except OSError as exc:
            with contextlib.suppress(OSError):  # else read_rows drops the torn line on resume
                os.ftruncate(fd, end)
            if exc.errno in _NO_SPACE:
                raise SkipnetError(
                    f"no space left on device writing {path}; the row of this evaluation was not kept "
                    "(free some space and continue with --resume)"
                ) from None
            raise OSError(exc.errno, f"{exc.strerror} writing {path}") from None
    finally:
        os.close(fd)


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of a ``metrics.jsonl`` and the number of lines that were not JSON objects (torn rows)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    rows, bad = [], 0
    for line in path.read_bytes().decode(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``rows`` atomically."""
    text = "".join(json_text(r) + "\n" for r in rows)
    atomic_write(path, lambda f: f.write(text.encode()))


# ------------------------------------------------------------------------------------------ the run's data
def data_fingerprint(data: Any) -> dict[str, Any]:
    """What a run records of its data (a :class:`~skipnet.data.DataBundle`) to recognise it on ``--resume``, where
    ``--data`` may name another path of the same data set but never another data set, and wherever its validation
    split is used again (:func:`val_split_difference`): the image count of each split and, for the splits held in
    memory, a SHA-256 of their labels in order (``labels_sha256``: every split; ``train_val_labels_sha256``: the
    training and validation splits alone, which another test set leaves as they are)."""
    record: dict[str, Any] = {}
    digest, train_val = hashlib.sha256(), hashlib.sha256()
    for split in ("train", "val", "test"):
        loader = getattr(data, split, None)
        labels = getattr(loader, "labels", None)
        if labels is not None:
            record[f"{split}_images"] = int(len(labels))
            chunk = split.encode() + labels.detach().cpu().long().numpy().tobytes()
            digest.update(chunk)
            if split != "test":
                train_val.update(chunk)
        elif getattr(loader, "dataset", None) is not None:
            record[f"{split}_images"] = len(loader.dataset)
    if any(getattr(getattr(data, s, None), "labels", None) is not None for s in ("train", "val", "test")):
        record["labels_sha256"] = digest.hexdigest()
        record["train_val_labels_sha256"] = train_val.hexdigest()
    return record


def val_split_difference(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """``(what, recorded, now)`` where the data of ``current`` (:func:`data_fingerprint`, under the subsets the
    run used) would carve another validation split than the run whose ``recorded`` fingerprint it is, else
    ``None``. The validation split is carved from the training images by their count, so another count of the
    training or validation split, or other labels of theirs, can put training images into it. The test split is
    free to differ (another test set is legitimate): only a fingerprint older than ``train_val_labels_sha256``
    compares ``labels_sha256``, which covers every split, and only where the test split has its recorded size."""
    keys = ["train_images", "val_images"]
    if "train_val_labels_sha256" in recorded:
        keys.append("train_val_labels_sha256")
    elif recorded.get("test_images") == current.get("test_images"):
        keys.append("labels_sha256")
    for key in keys:
        before, now = recorded.get(key), current.get(key)
        if before is not None and now is not None and before != now:
            return key, before, now
    return None


def describe_difference(key: str, before: Any, now: Any) -> str:
    """A fingerprint entry that differs, in words: ``train images 171, recorded 162``."""
    words = {
        "labels_sha256": "labels of its splits (SHA-256)",
        "train_val_labels_sha256": "labels of its training and validation splits (SHA-256)",
    }
    return f"{words.get(key, key.replace('_', ' '))} {_short(now)}, recorded {_short(before)}"


def check_same_data(ckpt: dict[str, Any], meta: dict[str, Any], fingerprint: dict[str, Any], spec: str, out) -> None:
    """``--resume`` with data (``meta``: its record, ``fingerprint``: :func:`data_fingerprint`) that is not what
    the checkpoint ``ckpt`` trained on is refused in one line: its classes, image size and channels as recorded
    (every checkpoint), its split sizes and labels (checkpoints that record a fingerprint)."""
    recorded = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    pairs = [(k, recorded.get(k), meta.get(k)) for k in ("classes", "num_classes", "in_channels", "image_size")]
    if isinstance(ckpt.get("data_fingerprint"), dict):
        pairs += [(k, v, fingerprint.get(k)) for k, v in ckpt["data_fingerprint"].items()]
    for key, before, now in pairs:
        if before is not None and before != now:
            what = key.replace("_", " ").replace("sha256", "(SHA-256)")
            raise SkipnetError(
                f"--resume: --data {spec} is not the data the run in {out} trained on ({what} {_short(now)}, "
                f"recorded {_short(before)}); give that data set's path, or start a new run with another --out"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
