"""SkipNet: learning dynamic routing in convolutional networks (Wang et al., ECCV 2018).

Public entry points::

    from skipnet import create_model, list_models, GateMode
    model = create_model("cifar10_rnn_gate_110")
    out = model(images, mode="greedy")      # SkipOutput(logits, trace)
"""

from skipnet.config import ArchConfig
from skipnet.errors import SkipnetError
from skipnet.gated import GatedResNet, GateMode, GateTrace, SkipOutput
from skipnet.registry import create_model, get_config, list_models

__version__ = "0.1.0"

__all__ = [
    "ArchConfig",
    "GateMode",
    "GateTrace",
    "GatedResNet",
    "SkipOutput",
    "SkipnetError",
    "create_model",
    "get_config",
    "list_models",
]
