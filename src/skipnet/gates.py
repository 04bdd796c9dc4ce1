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

from skipnet import blocks, capture, fastgate


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


class _GateWeights:
    """One forward's recurrent-gate parameters, read from the module tree when the forward starts and dropped with it.

    Nothing is kept between forwards, so the next forward sees every update, however it was made (optimizer steps,
    fused ones included, which do not bump version counters; ``.data`` edits; ``vector_to_parameters``; replaced
    modules; another process writing a ``share_memory()`` model), and concurrent forwards share nothing.

    ``proj[i]``: gate ``i``'s projection's ``_parameters`` (``weight`` (E, C), ``bias`` (E)); ``lstm``, ``fc``: the
    LSTM cell's and the output layer's. :meth:`folded` gives the eager inference step its folded input weights,
    computed in this forward on first use, one run of gates at a time.
    """

    __slots__ = ("proj", "lstm", "fc", "runs", "_folded", "_shared")

    def __init__(self, proj: list[dict], lstm: dict, fc: dict, runs: list[tuple[int, int]]) -> None:
        self.proj, self.lstm, self.fc, self.runs = proj, lstm, fc, runs
        self._folded: dict[int, tuple[Tensor, Tensor]] = {}
        self._shared: tuple[Tensor, ...] | None = None

    @classmethod
    def read(cls, gate: RNNGate) -> _GateWeights | None:
        """``gate``'s parameters now, or ``None`` when one of its modules must be called to compute its function:
        not exactly an ``nn.Linear`` / ``nn.LSTMCell`` with biases (quantized, parametrized or subclassed modules),
        or watched by forward hooks (the cost counter's)."""
        mods, lin = gate._modules, nn.Linear
        projs = [
            m._parameters
            for m in mods["proj"]._modules.values()
            if type(m) is lin and not blocks.watched(m) and m._parameters["bias"] is not None
        ]
        lstm, fc = mods["lstm"], mods["fc"]
        if (
            len(projs) != gate.num_gates
            or type(lstm) is not nn.LSTMCell
            or type(fc) is not lin
            or blocks.watched(lstm)
            or blocks.watched(fc)
            or lstm._parameters["bias_ih"] is None
            or fc._parameters["bias"] is None
        ):
            return None
        return cls(projs, lstm._parameters, fc._parameters, gate._run_of)

    def shared(self) -> tuple[Tensor, ...]:
        """``W_hh``, ``b_ih + b_hh``, zeros for ``b_hh``, the output layer's first row and bias (this forward's)."""
        if self._shared is None:
            lstm, fc = self.lstm, self.fc
            bias = lstm["bias_ih"] + lstm["bias_hh"]
            self._shared = (lstm["weight_hh"], bias, torch.zeros_like(bias), fc["weight"][0], fc["bias"][:1])
        return self._shared

    def folded(self, i: int) -> tuple[Tensor, Tensor]:
        """Gate ``i``'s ``W_ih P_i`` and ``W_ih b_i + b_ih + b_hh``, folded for its whole run of gates at once."""
        if i not in self._folded:
            a, b = self.runs[i]
            w_ih, bias = self.lstm["weight_ih"], self.shared()[1]
            w = torch.stack([self.proj[k]["weight"] for k in range(a, b)])  # (n, E, C)
            pb = torch.stack([self.proj[k]["bias"] for k in range(a, b)])  # (n, E)
            pairs = zip(torch.matmul(w_ih, w).unbind(0), torch.addmm(bias, pb, w_ih.t()).unbind(0), strict=True)
            self._folded.update(zip(range(a, b), pairs, strict=True))
        return self._folded[i]


class KernelRun:
    """One forward's use of the compiled gate step (:mod:`skipnet.fastgate`), for float32 CPU inference.

    Holds the forward's parameters (the projections as they are, the shared LSTM and output weights laid out once
    by ``gate_pack``), the LSTM state ``hc`` (2, B, Hd) and a (2, B, N) buffer that each :meth:`step` fills in
    column ``i``: ``z`` (logits) and ``p`` (probabilities) are its two halves; ``idx[:n]`` are the samples with
    ``p >= threshold`` after the step that returned ``n``. The caller reads them instead of computing
    ``sigmoid``, a comparison and ``nonzero`` per gate. Every buffer is float32 (int64 ``idx``), whatever the
    default dtype.
    """

    __slots__ = ("fn", "proj", "shared", "threshold", "hc", "zp", "z", "p", "idx")

    def __init__(self, module: Any, weights: _GateWeights, batch: int, n_gates: int, threshold: float) -> None:
        self.fn, self.threshold, self.proj = module.gate_step, float(threshold), weights.proj
        lstm, fc = weights.lstm, weights.fc
        w_ih, w_hh = lstm["weight_ih"], lstm["weight_hh"]
        self.shared = module.gate_pack(w_ih, w_hh, lstm["bias_ih"], lstm["bias_hh"], fc["weight"], fc["bias"])
        self.hc = torch.zeros(2, batch, w_hh.shape[1], dtype=torch.float32)
        self.zp = torch.empty(2, batch, n_gates, dtype=torch.float32)
        self.z, self.p = self.zp[0], self.zp[1]
        self.idx = torch.empty(batch, dtype=torch.long)

    def step(self, i: int, x: Tensor) -> int:
        """Gate ``i`` on its block's input ``x``; returns how many samples execute the block."""
        d = self.proj[i]
        return self.fn(x, self.hc, d["weight"], d["bias"], self.shared, self.zp, self.idx, i, self.threshold)


class RNNGate(GateBank):
    """The recurrent gate (Fig. 11c): per-block projection, one shared LSTM cell and output layer.

    Two executions of the same function. With autograd (training), autocast, a graph capture, while someone
    watches the module calls (e.g. the cost counter's hooks), or when a module is not a plain ``nn.Linear`` /
    ``nn.LSTMCell`` (quantized, parametrized, subclassed), every step is the reference step: the projection, the
    LSTM cell and the output layer, called as modules. Otherwise (inference) :meth:`init_state` reads the
    parameters from the module tree for this forward (:class:`_GateWeights`; nothing is cached between forwards)
    and selects the fast step: on a float32 CPU input the compiled kernel of :mod:`skipnet.fastgate` (mean,
    projection, LSTM cell, output layer and decision in one call), else three calls: the spatial mean, one
    ``torch.lstm_cell`` whose input weights have the block's projection folded in (``W_ih P_i``, bias
    ``W_ih b_i + b_ih + b_hh``, folded in the forward for each run of gates), and one ``addmv`` for the output
    layer. At batch size 1 on a CPU a gate's cost is its number of calls, not its ~0.04% of a block's MACs. The
    logits equal the reference step's up to float rounding (the products are summed in another order).

    Modules are looked up in the tree at every forward: a replaced projection, LSTM cell or output layer (e.g. by
    ``torch.ao.quantization.quantize_dynamic``) is the one that runs.
    """

    def __init__(self, channels: list[int], embed: int = 10, hidden: int = 10) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(c, embed) for c in channels)
        self.lstm = nn.LSTMCell(embed, hidden)
        self.fc = nn.Linear(hidden, 1)
        self.hidden = hidden
        self.num_gates = len(channels)
        # Runs of consecutive gates with the same input width (one per stage): folded together by the eager step.
        runs: list[tuple[int, int]] = []
        for i, c in enumerate(channels):
            if runs and channels[runs[-1][0]] == c:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        self._run_of = [r for r in runs for _ in range(*r)]  # gate i -> the (start, end) of its run

    def heads(self) -> list[nn.Linear]:
        return [self.fc]

    def init_state(self, x: Tensor, paths: capture.Paths | None = None) -> tuple[Any, ...]:
        """``(h, c)`` at zero, plus this forward's parameters (:class:`_GateWeights`) when the fast inference path
        applies (eager, no autograd, no autocast, plain modules, no hook on them)."""
        zeros = x.new_zeros(x.shape[0], self.hidden)
        captured = (capture.paths(x) if paths is None else paths).captured
        if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or captured:
            return zeros, zeros
        weights = _GateWeights.read(self)
        return (zeros, zeros) if weights is None else (zeros, zeros, weights)

    def kernel_run(
        self, x: Tensor, state: tuple[Any, ...], threshold: float, paths: capture.Paths | None = None
    ) -> KernelRun | None:
        """The compiled step for this forward when the fast inference path applies and ``paths`` (default:
        decided from ``x``) allow the compiled kernels (float32 CPU input ``x``)."""
        if len(state) != 3 or not (capture.paths(x) if paths is None else paths).kernels:
            return None
        return KernelRun(fastgate.load(), state[2], x.shape[0], self.num_gates, threshold)

    def step(self, i: int, x: Tensor, state: tuple[Any, ...]) -> tuple[Tensor, Any]:
        if len(state) == 3:  # the inference path (see the class docstring)
            h, c, weights = state
            w_hh, bias, zero, fc_w, fc_b = weights.shared()
            w, b = weights.folded(i)
            h, c = torch.lstm_cell(x.mean(dim=(2, 3)), (h, c), w, w_hh, b, zero)
            return torch.addmv(fc_b, h, fc_w), (h, c, weights)
        # the reference step: the modules of the tree, called (hooks such as the cost counter's see them)
        h, c = self.lstm(self.proj[i](spatial_mean(x)), state)
        return self.fc(h)[:, 0], (h, c)


def build_gates(kind: str, channels: list[int], embed: int = 10, hidden: int = 10) -> GateBank | None:
    """A gate bank for blocks whose inputs have ``channels`` channels; ``None`` for a plain ResNet."""
    if kind == "none":
        return None
    if kind == "rnn":
        return RNNGate(channels, embed, hidden)
    return FeedForwardGates(channels, kind)
