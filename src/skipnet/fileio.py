"""Atomic file I/O without any model: every file skipnet writes goes through :func:`atomic_write`.

Each file goes to a temporary sibling, is fsynced, renamed over the target and the directory fsynced, so a crash,
a kill or a full disk leaves the previous file intact. A full disk is reported as a :class:`SkipnetError`;
temporary files of writers that died (same host, dead pid) are removed by the next write of the same file.

Fault injection: every file operation of a write calls :func:`fault_point`; with the environment variable
``SKIPNET_FAULT_AFTER=k`` the process kills itself (SIGKILL) right after its k-th operation, so tests can stop a
checkpoint round at every step and check that ``--resume`` recovers exactly.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from skipnet.errors import SkipnetError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


# ------------------------------------------------------------------------------------------ fault injection
_file_ops = 0


def fault_point(what: str) -> None:
    """Count one file operation (``what``: e.g. ``"rename last.pt"``); die with SIGKILL right after the k-th one
    when ``SKIPNET_FAULT_AFTER=k`` is set, as a power cut or ``kill -9`` would at that point."""
    global _file_ops
    _file_ops += 1
    fault_hook(_file_ops, what)


def _kill_after_env(count: int, what: str) -> None:
    k = os.environ.get("SKIPNET_FAULT_AFTER")
    if k and k.isdigit() and count == int(k):
        os.kill(os.getpid(), signal.SIGKILL)


fault_hook: Callable[[int, str], None] = _kill_after_env  # tests may swap in another fault (e.g. a full disk)


def _default_mode(path: Path) -> int:
    """The permissions a plain ``open(path, "w")`` would give (0666 less the umask), or the existing file's."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def _tmp_prefix(path: Path) -> str:
    """Temporary files of ``path`` are ``.NAME.HOST.PID.*.tmp``: a later writer can tell a dead writer's leftovers."""
    return f".{path.name}.{_host()}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | Path, *, every_file: bool = False) -> list[Path]:
    """Delete temporary files of ``path`` left by writers on this host that no longer run (e.g. SIGKILLed); with
    ``every_file``, ``path`` is a directory and the leftovers of every file in it go."""
    path = Path(path)
    directory, name = (path, r".+?") if every_file else (path.parent, re.escape(path.name))
    pattern = re.compile(rf"^\.{name}\.{re.escape(_host())}\.(\d+)\.[^.]*\.tmp$")
    removed = []
    if not directory.is_dir():
        return removed
    for f in directory.iterdir():
        m = pattern.match(f.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _TrackedFile:
    """A binary file that remembers the OSError of a failed write: ``torch.save`` reports a full disk as a
    RuntimeError of its zip writer ("unexpected pos ..."), which hides the ENOSPC underneath."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, replace: bool = True) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the directory.

    On any failure (exception, signal, full disk) ``path`` keeps its previous content and the temporary file is
    removed; a full disk raises :class:`SkipnetError` naming the file. ``replace=False`` never replaces a file:
    the temporary file is linked to ``path`` (which fails if ``path`` exists, even one made meanwhile by another
    process), then removed; :class:`FileExistsError` if it exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    tracked = None
    try:
        os.fchmod(fd, _default_mode(path))  # mkstemp's 0600 would otherwise replace the file's permissions
        fault_point(f"create temp of {path.name}")
        with os.fdopen(fd, "wb") as f:
            tracked = _TrackedFile(f)
            write(tracked)
            tracked.flush()
            fault_point(f"write {path.name}")
            os.fsync(f.fileno())
        fault_point(f"fsync {path.name}")
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        fault_point(f"rename {path.name}")
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else getattr(tracked, "error", None)
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            kept = "previous checkpoint kept" if path.exists() else f"{path.name} was not created"
            raise SkipnetError(f"no space left on device writing {path}; {kept} (free some space and retry)") from None
        raise
    _fsync_dir(path.parent)
    fault_point(f"fsync directory of {path.name}")


def _link_new(tmp: str, path: Path) -> None:
    """Give the finished temporary file the name ``path`` only if no file has it (:class:`FileExistsError`)."""
    try:
        os.link(tmp, path)  # atomic: fails if path exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename (a race window, as before)
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    Path(tmp).unlink()


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, infinity) replaced by ``None``: JSON has no such numbers, and
    ``json.dumps`` would write a bare ``NaN`` that strict parsers refuse. skipnet's JSON output (``metrics.jsonl``,
    ``summary.json``, ``--json``) writes ``null`` for a number that is not finite, its key kept."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``: valid JSON whatever the numbers."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def checkpoint_bytes(obj: Any) -> bytes:
    """``obj`` serialised by ``torch.save``, to write it to several files identically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------------------------------ whole directories
def foreign_files(path: Path, owned: Iterable[str]) -> list[str]:
    """Names in the directory ``path`` (if it exists) that are not in ``owned``: files a writer did not make."""
    if not path.is_dir():
        return []
    mine = set(owned)
    return sorted(p.name for p in path.iterdir() if p.name not in mine)


def _remove_stale_dirs(path: Path) -> None:
    """Delete staging directories of ``path`` left by writers on this host that no longer run."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(_host())}\.(\d+)\.[^.]*\.(tmpdir|old)$")
    if not path.parent.is_dir():
        return
    for d in path.parent.iterdir():
        m = pattern.match(d.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(directory: Path) -> None:
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


def atomic_directory(path: str | Path, fill: Callable[[Path], Any], owned: Iterable[str]) -> None:
    """Write the directory ``path`` whole or not at all: ``fill(staging)`` writes every file into a staging
    directory beside it, which then takes ``path``'s place in one rename (an existing ``path`` is swapped out
    atomically where the system can, and removed). On any failure, a signal or a full disk, ``path`` is left as it
    was and the staging directory removed; a full disk is a :class:`SkipnetError` naming the file. ``path`` may
    only hold names of ``owned`` (what an earlier write made): files of anyone else are refused, never removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise SkipnetError(f"{path} is a file, not a directory")
    foreign = foreign_files(path, owned)
    if foreign:
        raise SkipnetError(
            f"{path} holds files this command did not write ({', '.join(foreign[:3])}); give a new directory"[:300]
        )
    _remove_stale_dirs(path)
    prefix = _tmp_prefix(path)
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmpdir", dir=path.parent))
    old = None
    try:
        os.chmod(staging, 0o777 & ~_umask())
        fill(staging)
        _fsync_tree(staging)
        fault_point(f"fill {path.name}")
        if not path.exists():
            os.rename(staging, path)
        elif not _exchange(staging, path):  # two renames: between them, path is briefly missing
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=path.parent))
            os.rename(path, old / "d")
            os.rename(staging, path)
        fault_point(f"rename {path.name}")
        _fsync_dir(path.parent)
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            where = path / Path(exc.filename).name if exc.filename else path
            kept = "it was left as it was" if path.exists() else "nothing was written"
            raise SkipnetError(f"no space left on device writing {where}; {kept} (free some space and retry)") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the previous contents
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = [
    "atomic_directory",
    "atomic_save",
    "atomic_write",
    "checkpoint_bytes",
    "fault_point",
    "foreign_files",
    "json_safe",
    "json_text",
    "remove_stale_temps",
]
