"""Checkpoints as plain data: written atomically, read with ``torch.load(weights_only=True)``.

Layout (``FORMAT_VERSION`` 1)::

    {format_version, kind: "skipnet", arch: ArchConfig dict, state_dict, threshold, keep_ratio, mode,
     optimizer, scheduler, step, epoch, rng: {torch, cuda, python}, metrics, train_config, data}

Weights are saved from the unwrapped, uncompiled module (no ``module.`` / ``_orig_mod.`` prefixes).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from skipnet.config import ArchConfig
from skipnet.errors import SkipnetError
from skipnet.gated import GatedResNet

FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_checkpoint(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    epoch: int = 0,
    metrics: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    net = unwrap(model)
    assert isinstance(net, GatedResNet)
    ckpt = {
        "format_version": FORMAT_VERSION,
        "kind": "skipnet",
        "arch": net.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "threshold": float(net.threshold),
        "keep_ratio": float(net.keep_ratio),
        "mode": str(net.mode.value),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "rng": rng_state(),
        "metrics": metrics or {},
        "train_config": train_config or {},
        "data": data or {},
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def save_checkpoint(path: str | Path, model: nn.Module, **kwargs: Any) -> None:
    """Build a checkpoint of ``model`` (see :func:`make_checkpoint`) and write it atomically."""
    atomic_save(make_checkpoint(model, **kwargs), path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a skipnet checkpoint safely (``weights_only=True``) with clear errors for user mistakes."""
    path = Path(path)
    if not path.is_file():
        raise SkipnetError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a user-facing "not a checkpoint"
        raise SkipnetError(f"{path} is not a readable skipnet checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "skipnet":
        raise SkipnetError(f"{path} is not a skipnet checkpoint")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise SkipnetError(
            f"{path} has format version {ckpt['format_version']}; this skipnet reads <= {FORMAT_VERSION}"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> GatedResNet:
    """Rebuild the network of a loaded checkpoint, weights and inference settings included (eval mode)."""
    model = GatedResNet(ArchConfig.from_dict(ckpt["arch"]))
    model.load_state_dict(ckpt["state_dict"])
    model.threshold = float(ckpt.get("threshold", 0.5))
    model.keep_ratio = float(ckpt.get("keep_ratio", 1.0))
    model.mode = type(model.mode)(ckpt.get("mode", model.mode.value))
    return model.eval()


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GatedResNet, dict[str, Any]]:
    """Load ``path`` and return ``(model, checkpoint)``; the model is in eval mode with its threshold set."""
    ckpt = load_checkpoint(path, map_location)
    return model_from_checkpoint(ckpt), ckpt


def load_weights_into(model: GatedResNet, ckpt: dict[str, Any], source: str = "checkpoint") -> list[str]:
    """Initialise ``model`` from another stage's weights (``--init``).

    Backbone weights must match exactly (same depth, widths, classes); gate weights are copied where both
    sides have them, so SP can start from a base ResNet. Returns the names left at their initial values.
    """
    src = ckpt["state_dict"]
    own = model.state_dict()
    problems = [k for k in own if k.startswith("backbone.") and (k not in src or src[k].shape != own[k].shape)]
    if problems:
        raise SkipnetError(
            f"{source} does not match this architecture's backbone ({len(problems)} tensors differ, e.g. "
            f"{problems[0]}); --init needs the same depth, width and number of classes"
        )
    loadable = {k: v for k, v in src.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return sorted(set(own) - set(loadable))
