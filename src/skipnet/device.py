"""Device selection for the commands (``--device``), without the model or the process group."""

from __future__ import annotations

import torch

from skipnet.errors import SkipnetError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` if CUDA is available, else ``cpu``; a bare ``cuda`` gets the local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SkipnetError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cpu" and device.index not in (None, 0):
        raise SkipnetError(f"--device {name}: the CPU takes no index (use cpu; --threads sets its cores)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SkipnetError(f"--device {name}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SkipnetError(f"--device {name}: skipnet runs on cpu, cuda or (where available) mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SkipnetError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise SkipnetError(f"device {device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


__all__ = ["pick_device"]
