"""SkipNet: learning dynamic routing in convolutional networks (Wang et al., ECCV 2018).

Public entry points::

    from skipnet import create_model, list_models, GateMode
    model = create_model("cifar10_rnn_gate_110")
    out = model(images, mode="greedy")      # SkipOutput(logits, trace)
    save_checkpoint("net.pt", model); model, ckpt = load_model("net.pt")
    LogitsOnly(model)                       # a module that returns the logits alone
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from skipnet.errors import SkipnetError

if TYPE_CHECKING:
    from skipnet.checkpoint import load_model, save_checkpoint
    from skipnet.config import ArchConfig
    from skipnet.gated import GatedResNet, GateMode, GateTrace, LogitsOnly, SkipOutput
    from skipnet.pretrained import create_model
    from skipnet.registry import get_config, list_models

__version__ = "0.1.0"

# Imported on first use, so that ``skipnet --help`` and a Ctrl-C during start-up do not wait for torch inside
# ``import skipnet`` (where the CLI could not turn them into one line).
_LAZY = {
    "ArchConfig": "skipnet.config",
    "GatedResNet": "skipnet.gated",
    "GateMode": "skipnet.gated",
    "GateTrace": "skipnet.gated",
    "LogitsOnly": "skipnet.gated",
    "SkipOutput": "skipnet.gated",
    "load_model": "skipnet.checkpoint",
    "save_checkpoint": "skipnet.checkpoint",
    "create_model": "skipnet.pretrained",  # the registry's, or with pretrained=True the shipped weights
    "get_config": "skipnet.registry",
    "list_models": "skipnet.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skipnet' has no attribute {name!r}")


__all__ = [
    "ArchConfig",
    "GateMode",
    "GateTrace",
    "GatedResNet",
    "LogitsOnly",
    "SkipOutput",
    "SkipnetError",
    "create_model",
    "get_config",
    "list_models",
    "load_model",
    "save_checkpoint",
]
