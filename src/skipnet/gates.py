"""Gating networks (paper §3.1, Fig. 11; reference notes §1).

Every gate bank maps the input ``x_i`` of gated block ``i`` to a logit ``z_i`` of shape (B,);
``p_i = sigmoid(z_i)`` is the probability of *executing* the block. Logits (not probabilities) are returned
so that log-probabilities are computed stably with ``logsigmoid``.

- :class:`FFGateI`: 2x2 max-pool -> 3x3 conv s1 + BN + ReLU -> 3x3 conv s2 + BN + ReLU -> GAP -> linear.
  ~15.6% of a residual block's multiply-adds (the paper rounds to 19%). Used for depth < 100.
- :class:`FFGateII`: 3x3 conv s2 + BN + ReLU -> GAP -> linear. 12.5% of a block. Used for depth >= 100.
- :class:`RNNGate`: per block GAP -> linear projection C -> 10; one LSTM cell (input 10, hidden 10) shared by
  all gates, stepped once per gated block, with its (h, c) state starting at zero for each input and carried
  across stage boundaries; a shared linear 10 -> 1. ~0.04% of a block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _hooks


class _SpatialMean(torch.autograd.Function):
    """``x.mean(dim=(2, 3))`` whose backward keeps ``x``'s memory format.

    Autograd's own backward of ``mean`` (and of adaptive average pooling) returns an NCHW-contiguous gradient;
    in a ``channels_last`` network that gradient is then summed with the block's own (channels_last) input
    gradient and every following backward kernel runs on mixed layouts, several times slower.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        ctx.memory_format = torch.channels_last if cl else torch.contiguous_format
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        b, c, h, w = ctx.shape
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.memory_format)
        return out.copy_((grad / (h * w)).view(b, c, 1, 1).expand(ctx.shape))


def spatial_mean(x: Tensor) -> Tensor:
    """Global average pooling (B, C, H, W) -> (B, C); same values as ``x.mean(dim=(2, 3))``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SpatialMean.apply(x)
    return x.mean(dim=(2, 3))


class FFGateI(nn.Module):
    """Feed-forward gate I (Fig. 11a)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # ceil_mode keeps a 1x1 map valid (tiny inputs); it changes nothing on even sizes.
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self.pool(x))))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(spatial_mean(x))[:, 0]


class FFGateII(nn.Module):
    """Feed-forward gate II (Fig. 11b)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.conv(x)))
        return self.fc(spatial_mean(x))[:, 0]


class GateBank(nn.Module):
    """Common interface: ``init_state(x)`` then ``step(i, x_i, state) -> (logit (B,), state)``."""

    num_gates: int

    def init_state(self, x: Tensor) -> Any:
        return None

    def step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        raise NotImplementedError


class FeedForwardGates(GateBank):
    """One independent feed-forward gate per gated block."""

    def __init__(self, channels: list[int], kind: str) -> None:
        super().__init__()
        cls = FFGateI if kind == "ffgate1" else FFGateII
        self.gates = nn.ModuleList(cls(c) for c in channels)
        self.num_gates = len(channels)

    def step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self.gates[i](x), state


class RNNGate(GateBank):
    """The recurrent gate (Fig. 11c): per-block projection, one shared LSTM cell and output layer."""

    def __init__(self, channels: list[int], embed: int = 10, hidden: int = 10) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(c, embed) for c in channels)
        self.lstm = nn.LSTMCell(embed, hidden)
        self.fc = nn.Linear(hidden, 1)
        self.hidden = hidden
        self.num_gates = len(channels)
        # Plain references for the hot path (a tuple is not registered as a submodule).
        self._hot = (list(self.proj), self.lstm, self.fc)

    def init_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        zeros = x.new_zeros(x.shape[0], self.hidden)
        return zeros, zeros

    def step(self, i: int, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Any]:
        projs, lstm, fc = self._hot
        proj = projs[i]
        if (
            _hooks._global_forward_hooks
            or _hooks._global_forward_pre_hooks
            or proj._forward_hooks
            or proj._forward_pre_hooks
            or lstm._forward_hooks
            or lstm._forward_pre_hooks
            or fc._forward_hooks
            or fc._forward_pre_hooks
        ):  # someone (e.g. the cost counter) is watching the module calls: make them
            h, c = lstm(proj(spatial_mean(x)), state)
            return fc(h)[:, 0], (h, c)
        # The same ops, bit for bit, without the Python overhead of three module calls and LSTMCell's input
        # checks: at batch size 1 on a CPU this cuts the gate's time by a third, and that time, not its
        # ~0.04% of a block's MACs, is what a gate costs there.
        h, c = torch.lstm_cell(
            F.linear(spatial_mean(x), proj.weight, proj.bias),
            state,
            lstm.weight_ih,
            lstm.weight_hh,
            lstm.bias_ih,
            lstm.bias_hh,
        )
        return F.linear(h, fc.weight, fc.bias)[:, 0], (h, c)


def build_gates(kind: str, channels: list[int], embed: int = 10, hidden: int = 10) -> GateBank | None:
    """A gate bank for blocks whose inputs have ``channels`` channels; ``None`` for a plain ResNet."""
    if kind == "none":
        return None
    if kind == "rnn":
        return RNNGate(channels, embed, hidden)
    return FeedForwardGates(channels, kind)
