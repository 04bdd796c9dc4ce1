"""The gated ResNet (paper Eq. 1) with every gating behaviour as a mode of one network.

Placement follows the authors' code: the first residual block of the network always runs and every later
block ``i`` is gated by a decision ``g_i`` computed from its input ``x_i``:

    x_{i+1} = g_i * F_i(x_i) + (1 - g_i) * S_i(x_i)                                    (Eq. 1)

where ``F_i`` is the whole residual block (residual branch + shortcut + ReLU) and ``S_i`` its shortcut: the
identity, or for a downsampling block its projection ``BN(conv1x1_s2(x))`` (no ReLU).

Modes (:class:`GateMode`):

- ``hard``   straight-through (Eq. 7): forward ``1[p >= t]``, backward ``dp`` (supervised pre-training).
- ``soft``   ``g = p`` (the paper's soft-gating baseline in training).
- ``sample`` ``g ~ Bernoulli(p)`` (REINFORCE / hybrid RL, Eq. 5-6).
- ``greedy`` ``g = 1[p >= t]`` (inference; ``t`` = ``threshold``, 0.5 by default).
- ``random`` ``g ~ Bernoulli(keep)`` independent of the input (stochastic-depth variant, SDV).
- ``all_on`` every block runs, no gate is computed: exactly the plain ResNet.

Execution: *masked* computes every block for every sample and mixes with ``g`` (needed by ``hard`` and
``soft``, whose gradients need ``F_i(x_i) - S_i(x_i)`` for every sample). *Routed* gathers the samples whose
decision is 1, runs the residual branch on that subset only and writes the result back; a block that no
sample executes costs nothing and a batch of one takes a plain Python branch. Routed is the default for
``sample``, ``greedy``, ``random`` and forced decisions, where nothing needs the skipped branch; in training
it also keeps skipped samples out of the block's BatchNorm statistics.

Both executions keep ``channels_last`` tensors in ``channels_last``, forward and backward (the gather/scatter,
the mix and the pooling have autograd functions of their own for that: PyTorch's built-in backwards of
indexing, ``index_copy`` and average pooling return NCHW gradients, which slow every later backward kernel
several-fold). Without autograd, routing writes the executed rows back into the block input in place.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.resnet import Bottleneck

from skipnet import capture, fastgate
from skipnet.backbones import build_backbone, stages
from skipnet.config import ArchConfig
from skipnet.errors import SkipnetError
from skipnet.gates import GateBank, build_gates


class GateMode(StrEnum):
    HARD = "hard"
    SOFT = "soft"
    SAMPLE = "sample"
    GREEDY = "greedy"
    RANDOM = "random"
    ALL_ON = "all_on"


ROUTED_BY_DEFAULT = {GateMode.SAMPLE, GateMode.GREEDY, GateMode.RANDOM}


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

    def detach(self) -> GateTrace:
        return GateTrace(self.probs.detach(), self.decisions.detach(), self.log_probs.detach(), self.logits.detach())


@dataclass
class SkipOutput:
    """What the gated network returns: ``logits`` (B, classes) and the gate ``trace``."""

    logits: Tensor
    trace: GateTrace


def residual_branch(block: nn.Module, x: Tensor) -> Tensor:
    """The residual function of a torchvision BasicBlock/Bottleneck, before the addition."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(block.relu(out)))
    return out


def shortcut_branch(block: nn.Module, x: Tensor) -> Tensor:
    """What a skipped block yields (Eq. 1): its projection shortcut, or the identity."""
    return block.downsample(x) if block.downsample is not None else x


def run_block(block: nn.Module, x: Tensor) -> Tensor:
    """``F_i(x)``: the whole residual block, ``relu(residual(x) + shortcut(x))``.

    The addition and the ReLU are done in place on the residual's fresh output (as torchvision's own blocks
    do), which is autograd-safe: batch norm does not save its output.
    """
    out = residual_branch(block, x)
    out += shortcut_branch(block, x)
    return F.relu_(out)


class _GlobalAvgPool(torch.autograd.Function):
    """``adaptive_avg_pool2d(x, 1)`` (the backbones' ``avgpool``) whose backward keeps ``x``'s memory format.

    Autograd's own backward returns an NCHW-contiguous gradient; in a ``channels_last`` network it would flow
    down the identity shortcuts and make every later backward kernel run on mixed layouts.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        ctx.memory_format = torch.channels_last if cl else torch.contiguous_format
        return F.adaptive_avg_pool2d(x, 1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        _, _, h, w = ctx.shape
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.memory_format)
        return out.copy_((grad / (h * w)).expand(ctx.shape))


# ``a = relu(a + b)`` in one pass: an ATen kernel without autograd formula (made for fusion), float32/float64
# only on CPU; bit-identical to the two-op form. Only called inside :class:`_MaskedTail`, which has its own backward.
_ADD_RELU_ = getattr(torch.ops.aten, "_add_relu_", None)


def _add_relu_(a: Tensor, b: Tensor) -> Tensor:
    if (
        _ADD_RELU_ is not None
        and a.device.type == "cpu"
        and a.dtype in (torch.float32, torch.float64)
        and b.dtype == a.dtype
    ):
        return _ADD_RELU_(a, b)
    return a.add_(b).relu_()


class _MaskedTail(torch.autograd.Function):
    """Eq. 1 after a block's residual branch ``r`` for a per-sample gate ``g``: ``lerp(s, relu(r + s), g)``.

    One autograd node for the block's addition, ReLU and mix, with a backward that makes fewer full-size passes
    than autograd's three nodes (the block is memory-bound at training batch sizes):

    - ``d/dg``: the per-sample sum of the output gradient times ``relu(r + s) - s`` (one temporary, where
      ``lerp``'s own backward makes two);
    - ``d/dr = threshold(grad * g)`` (the ReLU backward), and ``d/ds = d/dr + grad * (1 - g)`` in one ``addcmul``,
      where autograd would write ``grad * (1 - g)`` and then add the two when it accumulates.

    Gradients are written in the memory format of ``r`` and ``s`` whatever the incoming gradient's. The forward
    adds and rectifies in one pass, in place in ``r`` (a fresh tensor: marked dirty and returned as the second
    output, so autograd would catch anyone who saved it; a new full-size tensor per block would make glibc map
    fresh pages at every step). Saved: ``relu(r + s)`` and ``s``, which the unfused form saves too.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, residual: Tensor, shortcut: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # the second output is normally unused: no zero gradient for it
        w = g.view(-1, 1, 1, 1).to(residual.dtype)
        kernels = _tail_kernels(residual, shortcut)
        if kernels is not None:  # the same in one pass (skipnet.fastgate)
            out = torch.empty_like(shortcut)
            kernels.masked_tail_forward(residual, shortcut, w.reshape(-1).contiguous(), out)
            executed = residual
        else:
            executed = _add_relu_(residual, shortcut)
            out = torch.lerp(shortcut, executed, w)
        ctx.mark_dirty(residual)
        ctx.save_for_backward(w, executed, shortcut)
        ctx.g_dtype = g.dtype
        return out, executed

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor | None, grad_executed: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        w, executed, shortcut = ctx.saved_tensors
        if grad is None:  # only the second output was used (nobody does): relu(r + s) alone
            grad = torch.zeros_like(executed)
        need_g, need_r, need_s = ctx.needs_input_grad
        kernels = _tail_kernels(executed, grad, grad_executed, shortcut) if (need_r or need_s) else None
        if kernels is not None:  # the same formulas in one pass (skipnet.fastgate)
            g_r, g_s = torch.empty_like(executed), torch.empty_like(shortcut)
            g_g = executed.new_empty(executed.shape[0] if need_g else 0)
            ge = grad_executed if grad_executed is not None else executed.new_empty(0)
            w1 = w.reshape(-1).contiguous()
            kernels.masked_tail_backward(grad, ge, executed, shortcut, w1, g_r, g_s, g_g, need_g)
            return g_g.to(ctx.g_dtype) if need_g else None, g_r if need_r else None, g_s if need_s else None
        g_g = g_r = g_s = None
        if need_g:
            g_g = (executed - shortcut).mul_(grad).sum(dim=(1, 2, 3)).to(ctx.g_dtype)
        if need_r or need_s:
            g_e = torch.mul(grad, w, out=torch.empty_like(executed))
            if grad_executed is not None:
                g_e += grad_executed
            g_r = torch.ops.aten.threshold_backward(g_e, executed, 0)
        if need_s:
            g_s = torch.addcmul(g_r, grad, 1.0 - w, out=torch.empty_like(shortcut))
        return g_g, g_r if need_r else None, g_s


def _tail_kernels(*tensors: Tensor | None) -> Any:
    """The compiled masked-tail kernels (skipnet.fastgate) when they apply to ``tensors`` (``None`` entries are
    ignored): float32 CPU, 4-D, one memory layout (NCHW or channels_last, so each sample is one dense run, with
    the same strides for all), outside any graph capture (:mod:`skipnet.capture`); else ``None``."""
    first = tensors[0]
    if (
        first.device.type != "cpu"
        or first.dim() != 4
        or capture.active()
        or not (first.is_contiguous() or first.is_contiguous(memory_format=torch.channels_last))
    ):
        return None
    strides = first.stride()
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or t.stride() != strides):
            return None
    return fastgate.load()


def _mix(g: Tensor, executed: Tensor, skipped: Tensor) -> Tensor:
    """Eq. 1 with a per-sample gate ``g`` of shape (B,), without autograd: ``lerp(skipped, executed, g)``.

    One fused ``lerp`` instead of four element-wise passes; exact for ``g`` in {0, 1}.
    """
    return torch.lerp(skipped, executed, g.view(-1, 1, 1, 1).to(executed.dtype))


def _masked_tail(g: Tensor, residual: Tensor, shortcut: Tensor) -> Tensor:
    """``lerp(shortcut, relu(residual + shortcut), g)``: Eq. 1 for the block whose residual branch gave
    ``residual``. May write into ``residual`` (a fresh tensor of the caller's)."""
    if capture.active():  # plain, out-of-place ops that every tracer and exporter records
        return torch.lerp(shortcut, F.relu(residual + shortcut), g.view(-1, 1, 1, 1).to(residual.dtype))
    if torch.is_grad_enabled() and (g.requires_grad or residual.requires_grad or shortcut.requires_grad):
        return _MaskedTail.apply(g, residual, shortcut)[0]
    residual += shortcut
    return _mix(g, F.relu_(residual), shortcut)


def masked_block(block: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Eq. 1 for every sample: the whole block and its shortcut (computed once), mixed by ``g`` (B,)."""
    shortcut = shortcut_branch(block, x)
    return _masked_tail(g, residual_branch(block, x), shortcut)


def routed_block(block: nn.Module, x: Tensor, decision: Tensor) -> Tensor:
    """Run ``block`` only for the samples with ``decision == 1`` (B,); others get the shortcut.

    Values equal the masked form of Eq. 1 with a hard 0/1 decision. ``x`` is not modified.
    """
    if x.shape[0] == 1:  # plain branch, no indexing
        return run_block(block, x) if bool(decision[0] > 0.5) else shortcut_branch(block, x)
    return route_indices(block, x, torch.nonzero(decision > 0.5).flatten())


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx]`` (rows ``idx`` of the batch dimension) in ``x``'s memory format.

    When every sample is one dense block of memory (NCHW- or NHWC-contiguous ``x``) this is a single row-wise
    ``index_select`` on a (B, C*H*W) view of the memory, viewed back: a third to a quarter of the time advanced
    indexing takes on a ``channels_last`` tensor, whose general index kernel copies element by element.
    (``index_select`` on the 4-D tensor itself would return NCHW.)
    """
    n = idx.numel()
    if x.is_contiguous():
        return x.view(x.shape[0], -1).index_select(0, idx).view((n, *x.shape[1:]))
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b, -1).index_select(0, idx)
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)
    return x[idx]


_RUN_COPY_BYTES = 1 << 16  # per sample; below this index_copy_ is as fast as slice copies


def put_rows_(x: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """``x.index_copy_(0, idx, src)`` for sorted, unique ``idx``: rows ``idx`` of ``x`` replaced by ``src``.

    On a CPU with large samples (64 KiB and more) each run of consecutive indices is one slice copy, a memcpy:
    ``index_copy_``'s element-wise kernel takes 1.3 to 2 times as long there.
    """
    n = idx.numel()
    if x.device.type != "cpu" or n == 0 or x[0].numel() * x.element_size() < _RUN_COPY_BYTES:
        return x.index_copy_(0, idx, src)
    rows = idx.tolist()
    start = 0
    for j in range(1, n + 1):
        if j == n or rows[j] != rows[j - 1] + 1:
            x.narrow(0, rows[start], j - start).copy_(src.narrow(0, start, j - start))
            start = j
    return x


class _GatherRows(torch.autograd.Function):
    """``x[idx]`` whose backward scatters into a zero tensor laid out like ``x`` (autograd's own backward of
    advanced indexing allocates NCHW-contiguous zeros, so a ``channels_last`` network would get a gradient in
    the other layout and every convolution backward would run on mixed formats)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.size, ctx.stride = x.shape, x.stride()
        return take_rows(x, idx)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (idx,) = ctx.saved_tensors
        out = grad.new_empty_strided(ctx.size, ctx.stride).zero_()
        return out.index_copy_(0, idx, grad), None


class _ScatterRows(torch.autograd.Function):
    """``base`` with its rows ``idx`` replaced by ``src`` (in place when ``inplace``), memory format kept both
    ways: autograd's backward of ``index_copy`` hands ``src`` an ``index_select``-ed, NCHW gradient."""

    @staticmethod
    def forward(ctx: Any, base: Tensor, idx: Tensor, src: Tensor, inplace: bool) -> Tensor:
        ctx.save_for_backward(idx)
        if inplace:
            ctx.mark_dirty(base)
            return put_rows_(base, idx, src)
        return put_rows_(base.clone(), idx, src)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        (idx,) = ctx.saved_tensors
        g_base = grad.clone().index_fill_(0, idx, 0.0) if ctx.needs_input_grad[0] else None
        g_src = take_rows(grad, idx) if ctx.needs_input_grad[2] else None
        return g_base, None, g_src, None


def route_indices(block: nn.Module, x: Tensor, idx: Tensor, inplace: bool = False) -> Tensor:
    """Run ``block`` on the rows ``idx`` (sorted, unique, 1-D int64) of ``x``; the other rows get the shortcut.

    The executed subset is gathered with :func:`take_rows` and written back with :func:`put_rows_`: both keep
    ``channels_last`` on CPU (a 4-D ``index_select`` and the out-of-place ``index_copy`` do not), and under
    autograd their backward keeps it too (:class:`_GatherRows`, :class:`_ScatterRows`). With ``inplace`` (only honoured
    when autograd is off; the caller must own ``x``) the result is written into ``x`` itself for an identity
    shortcut, so no full-size copy is made; a projection shortcut is always a fresh tensor and is written into.
    A block that every sample executes runs as a plain block; one that none executes costs only its shortcut.
    """
    n = idx.numel()
    if n == x.shape[0]:
        return run_block(block, x)
    if n == 0:
        return shortcut_branch(block, x)
    grad = torch.is_grad_enabled()
    xs = _GatherRows.apply(x, idx) if grad else take_rows(x, idx)
    if block.downsample is not None:
        # Every sample needs the projection (skipped ones get exactly it). It is a fresh tensor of ours, and
        # writing into it is autograd-safe (batch norm does not save its output).
        shortcut = block.downsample(x)
        executed = residual_branch(block, xs)
        executed += _GatherRows.apply(shortcut, idx) if grad else take_rows(shortcut, idx)
        executed = F.relu_(executed)
        return _ScatterRows.apply(shortcut, idx, executed, True) if grad else put_rows_(shortcut, idx, executed)
    executed = residual_branch(block, xs)
    executed += xs  # the identity shortcut of the executed rows, already gathered
    executed = F.relu_(executed)
    if grad:
        return _ScatterRows.apply(x, idx, executed, False)
    return put_rows_(x if inplace else x.clone(), idx, executed)


class GatedResNet(nn.Module):
    """A ResNet whose residual blocks (all but the first) can be skipped per input.

    Args:
        config: the architecture. ``config.gate == "none"`` builds a plain ResNet, which still supports the
            ``all_on`` and ``random`` (SDV) modes.

    Attributes:
        backbone: the ResNet (torchvision layout); for ImageNet a ``torchvision.models.ResNet`` whose
            state dict is interchangeable with torchvision's.
        gates: the :class:`~skipnet.gates.GateBank`, or ``None`` for a plain ResNet.
        mode, threshold, keep_ratio: defaults for :meth:`forward` (checkpoints store ``threshold``).
    """

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        blocks: list[nn.Module] = []
        stage_of: list[int] = []
        for s, layer in enumerate(stages(self.backbone)):
            for block in layer:
                blocks.append(block)
                stage_of.append(s)
        # Plain Python lists: the modules are registered once, inside the backbone.
        self._blocks = blocks
        self.block_stage = stage_of[1:]  # stage index of each gated block
        channels = [self._in_channels(b) for b in blocks[1:]]
        self.gates: GateBank | None = build_gates(config.gate, channels, config.rnn_embed, config.rnn_hidden)
        self.mode = GateMode.GREEDY if config.gated else GateMode.ALL_ON
        self.threshold = 0.5
        self.keep_ratio = 1.0

    @staticmethod
    def _in_channels(block: nn.Module) -> int:
        return block.conv1.in_channels

    @torch.no_grad()
    def zero_init_residual(self) -> None:
        """Zero the scale of the last BN of every residual branch (Goyal et al. 2017; torchvision's
        ``zero_init_residual``), beyond the paper: each block starts as the identity, so a freshly initialised
        branch does not disturb the signal. In SP the gate's gradient is the inner product of the output gradient
        with the branch, zero here, and a branch learns only where its block runs: gates that start closed stay
        closed, so pair it with an open gate bias (:meth:`set_gate_bias`)."""
        for block in self._blocks:
            bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            bn.weight.zero_()

    @torch.no_grad()
    def set_gate_bias(self, bias: float) -> None:
        """Set the bias of every gate's output layer, so each gate starts at ``p = sigmoid(bias)`` (beyond the
        paper: a positive bias starts SP from scratch with the blocks executing)."""
        if self.gates is None:
            raise SkipnetError(f"{self.config.name} has no gates to set a bias on")
        for fc in self.gates.heads():
            fc.bias.fill_(float(bias))

    @property
    def num_gates(self) -> int:
        """N: the number of gated blocks (blocks - 1)."""
        return len(self._blocks) - 1

    @property
    def first_block(self) -> nn.Module:
        return self._blocks[0]

    @property
    def gated_blocks(self) -> list[nn.Module]:
        return self._blocks[1:]

    def stem(self, x: Tensor) -> Tensor:
        b = self.backbone
        return b.maxpool(b.relu(b.bn1(b.conv1(x))))

    def head(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad and not capture.active():
            # The same values; a gradient in x's memory format. (Under a capture the plain op is traced: the
            # function keeps x's shape on ctx, which does not trace with symbolic shapes.)
            pooled = _GlobalAvgPool.apply(x)
        else:
            pooled = self.backbone.avgpool(x)
        return self.backbone.fc(torch.flatten(pooled, 1))

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` before compiling: a SkipNet cannot be scripted; say what to use."""
        raise SkipnetError(capture.REFUSE_SCRIPT)

    def gate_step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Logit (B,) of gate ``i`` from the input ``x`` of gated block ``i``."""
        assert self.gates is not None
        return self.gates.step(i, x, state)

    def forward(
        self,
        x: Tensor,
        mode: GateMode | str | None = None,
        *,
        threshold: float | None = None,
        keep: float | None = None,
        decisions: Tensor | None = None,
        execution: str = "auto",
        explore: float = 0.0,
    ) -> SkipOutput:
        """Run the network on images ``x`` (B, C, H, W).

        Args:
            mode: a :class:`GateMode` (default ``self.mode``).
            threshold: greedy/hard threshold on ``p`` (default ``self.threshold``).
            keep: keep ratio for ``random`` mode (default ``self.keep_ratio``).
            decisions: (B, N) forced 0/1 decisions; gates are still computed (their cost is real) but the
                given decisions are taken. Used by benchmarks and tests.
            execution: ``"auto"``, ``"routed"`` or ``"masked"``.
            explore: exploration floor ``eps`` of ``sample`` mode (beyond the paper): decisions are drawn from
                ``pi = eps + (1 - 2 eps) p`` and ``log_probs`` are those of ``pi``, so every block is tried on and
                off at least ``eps`` of the time. ``pi >= 1/2`` exactly when ``p >= 1/2``: greedy inference at
                threshold 0.5 decides as the policy's mode. 0 is the paper's policy.

        Under ``torch.jit.trace`` and ``torch.export`` (and the ONNX exporters built on them) the forward runs
        masked, with every decision a tensor op, so the captured graph is right on every input (see
        :mod:`skipnet.capture`); ``torch.jit.script`` and FX symbolic tracing are refused.
        """
        tool = capture.tool(x)
        if tool == capture.FX:
            raise SkipnetError(capture.REFUSE_FX)
        traced = tool in capture.MASKED_ONLY
        if traced and execution == "routed":
            raise SkipnetError(
                f"routed execution cannot be captured by {tool} (which samples run a block depends on the input); "
                "use execution='masked', or `skipnet export` for a graph that skips"
            )
        mode = GateMode(mode or self.mode)
        threshold = self.threshold if threshold is None else threshold
        keep = self.keep_ratio if keep is None else keep
        if execution not in ("auto", "routed", "masked"):
            raise SkipnetError(f"execution must be auto, routed or masked, got {execution!r}")
        if mode in (GateMode.HARD, GateMode.SOFT, GateMode.SAMPLE) and self.gates is None:
            raise SkipnetError(f"mode {mode.value!r} needs a gated architecture; this one has no gates")
        if not 0.0 <= explore < 0.5:
            raise SkipnetError(f"explore must be in [0, 0.5), got {explore}")
        if mode in (GateMode.HARD, GateMode.SOFT) and execution == "routed":
            raise SkipnetError(f"mode {mode.value!r} needs masked execution (its gradient needs every block)")
        routed = execution == "routed" or (execution == "auto" and (mode in ROUTED_BY_DEFAULT or decisions is not None))
        if traced and routed:
            routed = False
            warnings.warn(
                f"skipnet: {tool} captures a SkipNet with masked execution (every block computed, mixed with the "
                "0/1 decisions): correct on every input, but it saves no compute; `skipnet export` builds graphs "
                "that skip",
                stacklevel=2,
            )
        n_gates = self.num_gates
        if decisions is not None and tuple(decisions.shape) != (x.shape[0], n_gates):
            raise SkipnetError(f"decisions must have shape (B, N) = ({x.shape[0]}, {n_gates})")

        x = self.stem(x)
        x = self.first_block(x)
        batch, dtype = x.shape[0], x.dtype
        compute_gates = self.gates is not None and mode not in (GateMode.ALL_ON, GateMode.RANDOM)
        state = self.gates.init_state(x) if compute_gates else None
        if mode == GateMode.RANDOM and decisions is None:
            decisions = torch.bernoulli(x.new_full((batch, n_gates), float(keep)))
        forced = None if decisions is None else decisions.detach().to(device=x.device, dtype=dtype)
        all_on = mode == GateMode.ALL_ON and forced is None

        # Routing reads each decision on the host. Forced decisions are read once, up front: as Python flags
        # for a batch of one, as per-block index tensors otherwise (one nonzero for the whole (B, N) matrix).
        # Decisions made inside the loop cost one host read per gated block (.item() or nonzero).
        flags: list[bool] | None = None
        rows: list[Tensor] | None = None
        if routed and forced is not None and n_gates:
            executed = forced > 0.5
            if batch == 1:
                flags = executed[0].tolist()
            else:
                pairs = torch.nonzero(executed.t())  # (block, sample) pairs, sorted by block then sample
                rows = list(pairs[:, 1].contiguous().split(executed.sum(0).tolist()))
        # From here on ``x`` is always a tensor this forward made, so without autograd routing may write the
        # executed rows back into it instead of copying it.
        inplace = routed and not torch.is_grad_enabled()

        z_l: list[Tensor] = []
        p_l: list[Tensor] = []
        dec_l: list[Tensor] | list[bool] = []
        host_threshold: float | None = None
        # CPU float32 inference with the recurrent gate: each gate step is one compiled call that also takes the
        # decision and lists the executed samples (skipnet.fastgate); ``kern.z`` / ``kern.p`` hold the trace.
        kern = self.gates.kernel_run(x, state, threshold) if compute_gates and n_gates else None
        kern_routes = kern is not None and routed and mode == GateMode.GREEDY and forced is None
        for i, block in enumerate(self.gated_blocks):
            if kern is not None:
                n_exec = kern.step(i, x)
            elif compute_gates:
                z, state = self.gate_step(i, x, state)
                z_l.append(z)
            if all_on:
                x = run_block(block, x)
                continue
            if forced is not None:
                if not routed:
                    x = masked_block(block, x, forced[:, i])
                elif flags is not None:  # batch of one: a plain Python branch
                    x = run_block(block, x) if flags[i] else shortcut_branch(block, x)
                else:
                    x = route_indices(block, x, rows[i], inplace=inplace)
                continue

            if kern_routes:  # the kernel decided: n_exec samples, listed in kern.idx
                if n_exec == batch:
                    x = run_block(block, x)
                elif n_exec == 0:
                    x = shortcut_branch(block, x)
                else:
                    x = route_indices(block, x, kern.idx[:n_exec], inplace=inplace)
                continue
            # A plain ResNet has no gate: p = 1, so greedy (threshold <= 1) executes every block.
            if kern is not None:
                p = kern.p[:, i]
            else:
                p = torch.sigmoid(z) if compute_gates else x.new_ones(batch)
                p_l.append(p)
            if routed and mode == GateMode.GREEDY:  # only the decision 1[p >= t] is needed, as few ops as can be
                if batch == 1:  # one host read, a plain Python branch
                    if host_threshold is None:  # ``p >= t`` compares in p's dtype: so does this
                        host_threshold = torch.tensor(threshold, dtype=p.dtype).item()
                    take = p.item() >= host_threshold
                    dec_l.append(take)
                    x = run_block(block, x) if take else shortcut_branch(block, x)
                else:
                    mask = p.detach() >= threshold
                    dec_l.append(mask)
                    x = route_indices(block, x, torch.nonzero(mask).flatten(), inplace=inplace)
                continue
            if mode == GateMode.SAMPLE:
                hard = torch.bernoulli(p.detach() if not explore else explore + (1.0 - 2.0 * explore) * p.detach())
            else:  # hard, soft, greedy
                hard = (p.detach() >= threshold).to(dtype)
            dec_l.append(hard)
            if mode == GateMode.HARD:
                # Eq. 7: forward 1[p >= t], backward dp. ``p - p.detach()`` is exactly 0, so g is exactly 0 or 1
                # (``hard - p.detach() + p`` rounds to 1 +- 1 ulp, or +-3e-8 for a skip).
                g = hard + (p - p.detach())
            elif mode == GateMode.SOFT:
                g = p
            else:
                g = hard

            if not routed:
                x = masked_block(block, x, g)
            elif batch == 1:  # plain Python branch, no indexing
                x = run_block(block, x) if hard.item() > 0.5 else shortcut_branch(block, x)
            else:  # sample: a Bernoulli draw is exactly 0 or 1
                x = route_indices(block, x, torch.nonzero(hard).flatten(), inplace=inplace)

        logits = self.head(x)
        if kern is not None:
            z_all, probs = kern.z, kern.p
        elif compute_gates and n_gates:
            z_all = torch.stack(z_l, 1)
            probs = torch.stack(p_l, 1) if p_l else torch.sigmoid(z_all)
        else:
            z_all = x.new_zeros(batch, n_gates)
            probs = x.new_ones(batch, n_gates)
        if forced is not None:
            dec = forced
        elif kern_routes:  # the kernel's own comparison, p >= t in p's dtype
            dec = (probs >= threshold).to(dtype)
        elif dec_l and not isinstance(dec_l[0], Tensor):  # routed greedy, batch of one: Python flags
            dec = torch.tensor(dec_l, dtype=dtype, device=x.device).view(1, -1)
        elif dec_l:
            dec = torch.stack(dec_l, 1)
            if dec.dtype == torch.bool:  # routed greedy
                dec = dec.to(dtype)
        else:  # all_on: every block ran
            dec = x.new_ones(batch, n_gates)
        if compute_gates and n_gates:
            # log pi(g_i | x) for the Bernoulli policy of Eq. 3, stable in the logit; one pass for all gates.
            if explore and mode == GateMode.SAMPLE:  # the floored policy pi = eps + (1 - 2 eps) p; 1 - pi likewise
                on = torch.log(explore + (1.0 - 2.0 * explore) * torch.sigmoid(z_all))
                off = torch.log(explore + (1.0 - 2.0 * explore) * torch.sigmoid(-z_all))
                log_probs = dec * on + (1.0 - dec) * off
            else:
                log_probs = dec * F.logsigmoid(z_all) + (1.0 - dec) * F.logsigmoid(-z_all)
        else:
            log_probs = x.new_zeros(batch, n_gates)
        trace = GateTrace(probs=probs, decisions=dec.detach(), log_probs=log_probs, logits=z_all)
        return SkipOutput(logits, trace)
