"""The files of a run directory that are not checkpoints: its lock and its ``metrics.jsonl``.

- **Lock.** :func:`run_lock` holds a POSIX lock on ``DIR/.lock`` (which names the holder's pid and host) while a
  run writes into ``DIR``: a second writer is refused with one line naming the holder. The kernel releases the
  lock when its process ends in any way (``kill -9`` included), so a lock file left behind is never stale.
  Locks nest within one process; DataLoader workers (forked) do not inherit it.
- **Metrics rows.** :func:`append_row` appends one JSON line and fsyncs; a failed write (a full disk) is cut back
  to the previous end of the file and reported naming the file. :func:`read_rows` drops a torn line (a writer
  killed mid-row) instead of failing on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_write, fault_point

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
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
    path = (directory / LOCK_NAME).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
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


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line and fsync; on failure the file is cut back to its previous end."""
    path = Path(path)
    data = (json.dumps(row) + "\n").encode()
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
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, lambda f: f.write(text.encode()))
