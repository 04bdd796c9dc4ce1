"""What a gated network returns: :class:`SkipOutput` (logits and the gate :class:`GateTrace`).

Both are registered as pytrees here, where they are defined, so that every consumer that walks a forward's
outputs sees their tensors whatever was imported first: DistributedDataParallel passes a forward's outputs through
its ``_DDPSink`` only when they are pytree nodes, and registered, an output that the loss does not use (the logits
of stage ``rl``) leaves its parameters "unused" instead of stalling the gradient reduction.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch.utils._pytree as pytree
from torch import Tensor


@dataclass
class GateTrace:
    """Per-sample record of the gating decisions of one forward pass; every field has shape (B, N).

    Attributes:
        probs: execution probabilities ``p_i`` (ones where no gate was computed).
        decisions: the hard decisions actually taken, 0.0 (skip) or 1.0 (execute).
        log_probs: ``log pi(g_i | x)`` of the decisions under the gate's Bernoulli policy (Eq. 3); carries
            gradient to the gate parameters. Zeros where no gate was computed.
        logits: the gate logits (zeros where no gate was computed).
    """

    probs: Tensor
    decisions: Tensor
    log_probs: Tensor
    logits: Tensor

    @property
    def num_gates(self) -> int:
        return self.decisions.shape[1]


@dataclass
class SkipOutput:
    """What the gated network returns: ``logits`` (B, classes) and the gate ``trace``.

    A loss that expects logits takes ``out.logits``; :class:`skipnet.LogitsOnly` wraps a model so that it
    returns the logits alone (for code that calls ``F.cross_entropy(model(x), y)``).
    """

    logits: Tensor
    trace: GateTrace


for _cls in (GateTrace, SkipOutput):
    with contextlib.suppress(ValueError):  # already registered (module reloaded)
        pytree.register_dataclass(_cls)

__all__ = ["GateTrace", "SkipOutput"]
