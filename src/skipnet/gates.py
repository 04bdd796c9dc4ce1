"""Gating networks (paper §3.1, Fig. 11; the authors' gate code).

Every gate bank maps the input ``x_i`` of gated block ``i`` to a logit ``z_i`` of shape (B,);
``p_i = sigmoid(z_i)`` is the probability of *executing* the block. Logits (not probabilities) are returned
so that log-probabilities are computed stably with ``logsigmoid``.

- :class:`FFGateI`: 2x2 max-pool -> 3x3 conv s1 + BN + ReLU -> 3x3 conv s2 + BN + ReLU -> GAP -> linear.
  ~15.6% of a residual block's multiply-adds (the paper rounds to 19%). Used for depth < 100.
- :class:`FFGateII`: 3x3 conv s2 + BN + ReLU -> GAP -> linear. 12.5% of a block. Used for depth >= 100.
- :class:`AIGGate` (beyond the paper; ConvNet-AIG's gate, Veit & Belongie, ECCV 2018): GAP -> linear C -> 16
  -> BatchNorm -> ReLU -> linear 16 -> 1. Its BatchNorm normalises the gate's input features over the batch in
  training, so a gate sees how an image differs from the others rather than the block's shared offset. ~0.2% of
  a block.
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

from skipnet import capture, fastgate


class _SpatialMean(torch.autograd.Function):
    """``x.mean(dim=(2, 3))`` whose backward keeps ``x``'s memory format: it is a broadcast view.

    Autograd's own backward of ``mean`` (and of adaptive average pooling) returns an NCHW-contiguous gradient;
    in a ``channels_last`` network that gradient is then summed with the block's own (channels_last) input
    gradient and every following backward kernel runs on mixed layouts, several times slower. A broadcast view
    of ``grad / (H W)`` has no layout of its own: autograd adds it into the input's other gradients (the RNN
    gate's input is the block's input) in their layout, in one pass and without a full-size temporary, and a
    kernel that consumes it alone (a feed-forward gate's ReLU backward) writes in its other operand's layout.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        b, c, h, w = ctx.shape
        return (grad / (h * w)).view(b, c, 1, 1).expand(ctx.shape)


def spatial_mean(x: Tensor) -> Tensor:
    """Global average pooling (B, C, H, W) -> (B, C); same values as ``x.mean(dim=(2, 3))``.

    Under ``torch.compile`` the plain op is traced instead (the autograd function keeps the input's shape on
    ``ctx``, which does not trace with symbolic shapes; the compiler derives its own backward anyway).
    """
    if torch.is_grad_enabled() and x.requires_grad and not capture.active():
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


class AIGGate(nn.Module):
    """ConvNet-AIG's gate (its ``gs`` head, one logit instead of two): normalised pooled features."""

    def __init__(self, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(spatial_mean(x))
        if self.training and h.shape[0] == 1:  # one image has no batch to be normalised against: running stats
            bn = self.bn
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            h = self.bn(h)
        return self.fc(self.relu(h))[:, 0]


FF_GATES = {"ffgate1": FFGateI, "ffgate2": FFGateII, "aig": AIGGate}


class GateBank(nn.Module):
    """Common interface: ``init_state(x)`` then ``step(i, x_i, state) -> (logit (B,), state)``."""

    num_gates: int

    def init_state(self, x: Tensor, paths: capture.Paths | None = None) -> Any:
        """The state before the first gate of a forward on ``x`` with fast ``paths`` (default: decided from ``x``)."""
        return None

    def step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def kernel_run(
        self, x: Tensor, state: Any, threshold: float, paths: capture.Paths | None = None
    ) -> KernelRun | None:
        """A compiled inference path for this forward (see :class:`KernelRun`), or ``None``."""
        return None

    def heads(self) -> list[nn.Linear]:
        """The output layers whose single unit is each gate's logit (one shared layer for the recurrent gate)."""
        raise NotImplementedError


class FeedForwardGates(GateBank):
    """One independent feed-forward gate per gated block."""

    def __init__(self, channels: list[int], kind: str) -> None:
        super().__init__()
        cls = FF_GATES[kind]
        self.gates = nn.ModuleList(cls(c) for c in channels)
        self.num_gates = len(channels)

    def step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self.gates[i](x), state

    def heads(self) -> list[nn.Linear]:
        return [g.fc for g in self.gates]


class _FoldedStep:
    """One RNN gate step's folded input weights (see :class:`RNNGate`): ``weight`` = ``W_ih P_i``, ``bias``, and
    ``weight_hw`` = ``weight / hw`` for the spatial size ``hw`` = H W last seen; ``pack``: the same with the shared
    recurrent and output weights in the compiled kernel's layout (see ``_fastgate.cpp``), made when the kernel
    first needs it at this size."""

    __slots__ = ("weight", "bias", "hw", "weight_hw", "pack")

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        self.weight, self.bias, self.hw, self.weight_hw, self.pack = weight, bias, 0, weight, None

    def at_size(self, hw: int) -> _FoldedStep:
        if self.hw != hw:  # first step at this input size: fold the mean's 1 / (H W) in too
            self.hw, self.weight_hw, self.pack = hw, self.weight / hw, None
        return self

    def packed(self, hw: int, shared: tuple[Tensor, ...]) -> Tensor:
        """``pack`` at size ``hw``; ``shared`` = (``W_hh``, output weight row, output bias)."""
        if self.hw != hw or self.pack is None:
            w_hh, fc_w, fc_b = shared
            parts = (self.at_size(hw).weight_hw.t(), self.bias, w_hh.t(), fc_w, fc_b)
            self.pack = torch.cat([t.reshape(-1) for t in parts])
        return self.pack


class KernelRun:
    """One forward's use of the compiled gate step (:mod:`skipnet.fastgate`), for float32 CPU inference.

    Holds the LSTM state ``hc`` (2, B, Hd) and a (2, B, N) buffer that each :meth:`step` fills in column ``i``:
    ``z`` (logits) and ``p`` (probabilities) are its two halves; ``idx[:n]`` are the samples with
    ``p >= threshold`` after the step that returned ``n``. The caller reads them instead of computing
    ``sigmoid``, a comparison and ``nonzero`` per gate.
    """

    __slots__ = ("fn", "folded", "shared", "threshold", "hc", "zp", "z", "p", "idx")

    def __init__(self, fn: Any, params: tuple, batch: int, hidden: int, n_gates: int, threshold: float) -> None:
        self.fn, self.threshold = fn, float(threshold)
        self.folded, w_hh, fc_w, fc_b = params[:4]
        self.shared = (w_hh, fc_w, fc_b)
        self.hc = torch.zeros(2, batch, hidden)
        self.zp = torch.empty(2, batch, n_gates)
        self.z, self.p = self.zp[0], self.zp[1]
        self.idx = torch.empty(batch, dtype=torch.long)

    def step(self, i: int, x: Tensor) -> int:
        """Gate ``i`` on its block's input ``x``; returns how many samples execute the block."""
        pack = self.folded[i].packed(x.shape[2] * x.shape[3], self.shared)
        return self.fn(x, self.hc, pack, self.zp, self.idx, i, self.threshold)


class RNNGate(GateBank):
    """The recurrent gate (Fig. 11c): per-block projection, one shared LSTM cell and output layer.

    Two executions of the same function. With autograd (training), autocast, ``torch.compile`` or while someone
    watches the module calls (e.g. the cost counter's hooks), every step is the reference step: the projection,
    the LSTM cell and the output layer, called as modules. Otherwise (inference) :meth:`init_state` selects the
    fast step, three calls: the spatial sum, one ``torch.lstm_cell`` whose input weights are the LSTM's ``W_ih``
    with the block's projection and the mean's ``1 / (H W)`` folded in (``W_ih P_i / (H W)``, bias
    ``W_ih b_i + b_ih + b_hh``), and one ``addmv`` for the output layer (on a float32 CPU, the compiled kernel of
    :mod:`skipnet.fastgate` does the same in one call). The folded weights are computed for all gates at once (a
    few batched products) and cached until a gate parameter changes. At batch size 1 on a CPU a gate's cost is its
    number of calls, not its ~0.04% of a block's MACs. The logits equal the reference step's up to float rounding
    (the folded products are summed in another order).
    """

    def __init__(self, channels: list[int], embed: int = 10, hidden: int = 10) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(c, embed) for c in channels)
        self.lstm = nn.LSTMCell(embed, hidden)
        self.fc = nn.Linear(hidden, 1)
        self.hidden = hidden
        self.num_gates = len(channels)
        # Plain references for the hot path (a tuple is not registered as a submodule).
        self._hot = (list(self.proj), self.lstm, self.fc)
        # Runs of consecutive gates with the same input width (one per stage): folded together.
        runs: list[tuple[int, int]] = []
        for i, c in enumerate(channels):
            if runs and channels[runs[-1][0]] == c:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        self._runs = runs

    @staticmethod
    def _watched(*modules: nn.Module) -> bool:
        """Whether forward (pre-)hooks watch these module calls (then the modules must be called)."""
        if _hooks._global_forward_hooks or _hooks._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in modules)

    def _folded(self) -> tuple[list[_FoldedStep], Tensor, Tensor, Tensor, Tensor]:
        """The inference parameters (see :meth:`_fold`), cached while no gate parameter changes: the key is every
        parameter's storage address and version counter (bumped by optimizer steps, ``load_state_dict`` and
        any other in-place update; a moved, converted or replaced parameter has a new address)."""
        projs, lstm, fc = self._hot
        key = tuple(
            (t.data_ptr(), t._version) for m in (lstm, fc, *projs) for t in m._parameters.values() if t is not None
        )
        cache = self.__dict__.get("_fold_cache")
        if cache is None or cache[0] != key:
            cache = self.__dict__["_fold_cache"] = (key, self._fold())
        return cache[1]

    @torch.no_grad()
    def _fold(self) -> tuple[list[_FoldedStep], Tensor, Tensor, Tensor, Tensor]:
        """Per gate ``W_ih P_i`` and ``W_ih b_i + b_ih + b_hh``; ``W_hh``; the output layer's weight row and bias;
        a zero hidden bias."""
        projs, lstm, fc = self._hot
        w_ih = lstm.weight_ih
        bias = lstm.bias_ih + lstm.bias_hh
        folded: list[_FoldedStep] = []
        for a, b in self._runs:
            w = torch.stack([p.weight for p in projs[a:b]])  # (n, E, C)
            pb = torch.stack([p.bias for p in projs[a:b]])  # (n, E)
            folded += map(_FoldedStep, torch.matmul(w_ih, w).unbind(0), torch.addmm(bias, pb, w_ih.t()).unbind(0))
        # b_hh is folded into the per-gate bias; lstm_cell is given zeros for it (CUDA's fused cell needs both).
        zero = torch.zeros_like(lstm.bias_hh)
        return folded, lstm.weight_hh, fc.weight[0], fc.bias, zero

    def heads(self) -> list[nn.Linear]:
        return [self.fc]

    def init_state(self, x: Tensor, paths: capture.Paths | None = None) -> tuple[Tensor, ...]:
        """``(h, c)`` at zero, plus the folded parameters when the fast inference path applies (eager, no
        autograd, no autocast, no hook on the gate's modules)."""
        zeros = x.new_zeros(x.shape[0], self.hidden)
        projs, lstm, fc = self._hot
        captured = (capture.paths(x) if paths is None else paths).captured
        if (
            torch.is_grad_enabled()
            or torch.is_autocast_enabled(x.device.type)
            or captured
            or self._watched(lstm, fc, *projs)
        ):
            return zeros, zeros
        return zeros, zeros, self._folded()

    def kernel_run(
        self, x: Tensor, state: tuple[Tensor, ...], threshold: float, paths: capture.Paths | None = None
    ) -> KernelRun | None:
        """The compiled step for this forward when the fast inference path applies and ``paths`` (default:
        decided from ``x``) allow the compiled kernels (float32 CPU input ``x``)."""
        if len(state) != 3 or not (capture.paths(x) if paths is None else paths).kernels:
            return None
        return KernelRun(fastgate.load().gate_step, state[2], x.shape[0], self.hidden, self.num_gates, threshold)

    def step(self, i: int, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, Any]:
        if len(state) == 3:  # the inference path (see the class docstring)
            h, c, params = state
            folded, w_hh, fc_w, fc_b, zero = params
            f = folded[i].at_size(x.shape[2] * x.shape[3])
            h, c = torch.lstm_cell(x.sum(dim=(2, 3)), (h, c), f.weight_hw, w_hh, f.bias, zero)
            return torch.addmv(fc_b, h, fc_w), (h, c, params)
        projs, lstm, fc = self._hot  # the reference step: the module calls, which hooks (the cost counter) see
        h, c = lstm(projs[i](spatial_mean(x)), state)
        return fc(h)[:, 0], (h, c)


def build_gates(kind: str, channels: list[int], embed: int = 10, hidden: int = 10) -> GateBank | None:
    """A gate bank for blocks whose inputs have ``channels`` channels; ``None`` for a plain ResNet."""
    if kind == "none":
        return None
    if kind == "rnn":
        return RNNGate(channels, embed, hidden)
    return FeedForwardGates(channels, kind)
