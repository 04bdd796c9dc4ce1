"""How a gated block runs on its gate decision: the *executors*, and the autograd functions and compiled-kernel
glue that make them fast.

An executor is chosen once per forward (:func:`choose`) and called once per gated block as
``executor(block, x, decision)``, with the decision in the form its gate policy (:mod:`skipnet.policy`) hands it:

- :class:`MaskedExecutor`: every block for every sample, mixed with ``g`` by Eq. 1 (needed by ``hard`` and
  ``soft``, whose gradients need ``F_i(x_i) - S_i(x_i)`` for every sample). The decision is the per-sample gate
  ``g`` (B,), or ``True`` for a block that runs in full.
- :class:`RoutedExecutor`: gathers the samples whose decision is 1, runs the residual branch on that subset only
  and writes the result back; a block that no sample executes costs nothing and a batch of one takes a plain
  Python branch. The decision is the sorted indices of the executing samples (int64), or a Python ``bool`` for
  "every sample" / "none". The default for ``sample``, ``greedy``, ``random`` and forced decisions, where
  nothing needs the skipped branch; in training it also keeps skipped samples out of the block's BatchNorm
  statistics.

The export graphs (:mod:`skipnet.export`) are a third execution of the same Eq. 1, in graph operators only.

Both executors keep ``channels_last`` tensors in ``channels_last``, forward and backward (the gather/scatter,
the mix and the pooling have autograd functions of their own for that: PyTorch's built-in backwards of
indexing, ``index_copy`` and average pooling return NCHW gradients, which slow every later backward kernel
several-fold). Without autograd, routing writes the executed rows back into the block input in place.

To add an executor (e.g. a GPU routing path): a class with ``routed`` (which decision form it takes) and
``__call__(block, x, decision)``, chosen in :func:`choose`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from skipnet import blocks, capture, fastgate
from skipnet.errors import SkipnetError
from skipnet.policy import GateMode


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


class _MaskedTail(torch.autograd.Function):
    """Eq. 1 after a block's residual branch ``r`` for a per-sample gate ``g``: ``lerp(s, relu(r + s), g)``, a
    branch taken exactly where ``g`` is 0 or 1 (:func:`_mix`).

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
    def forward(
        ctx: Any, g: Tensor, residual: Tensor, shortcut: Tensor, paths: capture.Paths, binary: bool
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # the second output is normally unused: no zero gradient for it
        w = g.view(-1, 1, 1, 1).to(residual.dtype)
        ctx.paths = paths  # the forward's: its kernels asked only for tensors they take
        kernels = _tail_kernels(paths, residual, shortcut)
        if kernels is not None:  # the same in one pass (skipnet.fastgate)
            out = torch.empty_like(shortcut)
            kernels.masked_tail_forward(residual, shortcut, w.reshape(-1).contiguous(), out)
            executed = residual
        else:
            executed = residual.add_(shortcut).relu_()
            out = _mix(w, executed, shortcut, binary)
        ctx.mark_dirty(residual)
        ctx.save_for_backward(w, executed, shortcut)
        ctx.g_dtype = g.dtype
        return out, executed

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor | None, grad_executed: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        w, executed, shortcut = ctx.saved_tensors
        if grad is None:  # only the second output was used (nobody does): relu(r + s) alone
            grad = torch.zeros_like(executed)
        need_g, need_r, need_s, _, _ = ctx.needs_input_grad
        kernels = _tail_kernels(ctx.paths if (need_r or need_s) else None, executed, grad, grad_executed, shortcut)
        if kernels is not None:  # the same formulas in one pass (skipnet.fastgate)
            g_r, g_s = torch.empty_like(executed), torch.empty_like(shortcut)
            g_g = executed.new_empty(executed.shape[0] if need_g else 0)
            ge = grad_executed if grad_executed is not None else executed.new_empty(0)
            w1 = w.reshape(-1).contiguous()
            kernels.masked_tail_backward(grad, ge, executed, shortcut, w1, g_r, g_s, g_g, need_g)
            return g_g.to(ctx.g_dtype) if need_g else None, g_r if need_r else None, g_s if need_s else None, None, None
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
        return g_g, g_r if need_r else None, g_s, None, None


def _tail_kernels(paths: capture.Paths | None, *tensors: Tensor | None) -> Any:
    """The compiled masked-tail kernels (skipnet.fastgate) when the forward may use them (its ``paths``; ``None``:
    not here) and they apply to ``tensors`` (``None`` entries are ignored): float32 CPU, 4-D, one memory layout
    (NCHW or channels_last, so each sample is one dense run, with the same strides for all); else ``None``.
    :attr:`~skipnet.capture.Paths.kernels` is asked last, so that tensors no kernel takes (bfloat16 under
    autocast) never load the kernels."""
    first = tensors[0]
    if (
        paths is None
        or first.device.type != "cpu"
        or first.dim() != 4
        or not (first.is_contiguous() or first.is_contiguous(memory_format=torch.channels_last))
    ):
        return None
    strides = first.stride()
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or t.stride() != strides):
            return None
    return fastgate.load() if paths.kernels else None


def _mix(w: Tensor, executed: Tensor, skipped: Tensor, binary: bool = False, eager: bool = True) -> Tensor:
    """Eq. 1 for a per-sample gate ``w`` (B, 1, 1, 1) in the blocks' dtype, for a forward whose gradient in ``w``
    (if any) is written by hand: exactly ``skipped`` where ``w`` is 0 and ``executed`` where it is 1, as routed
    execution gives them, also where the other branch holds an inf or a NaN (``lerp``'s ``0 * inf`` would make a
    NaN: a skipped block that overflowed in float16 would poison the image), ``lerp`` in between. ``binary``: every
    ``w`` is 0 or 1 (every mode but ``soft``; read as routed execution reads a decision, ``> 0.5``).

    On the CPU, ``eager`` (not under a capture: the check reads a value), the ``lerp`` is kept when its result is
    finite (then it is exact at 0 and 1): ATen's CPU ``where`` with a per-sample condition takes about four times
    the ``lerp``'s time. Elsewhere (and when the ``lerp`` is not finite) one or two ``where``."""
    if eager and executed.device.type == "cpu":
        mixed = torch.lerp(skipped, executed, w)
        if math.isfinite(float(mixed.detach().sum(dtype=torch.float32))):  # a NaN or inf anywhere: the sum is one
            return mixed
    if binary:
        return torch.where(w > 0.5, executed, skipped)
    return torch.where(w == 0, skipped, torch.where(w == 1, executed, torch.lerp(skipped, executed, w)))


def _mix_autograd(w: Tensor, executed: Tensor, skipped: Tensor) -> Tensor:
    """Eq. 1 in plain ops for autograd's own backward (the captured path, a block with another activation): the
    values of :func:`_mix` (exact at a gate of 0 or 1 whatever the other branch holds), and the gradient of
    ``lerp(skipped, executed, w)``: ``d/dw = executed - skipped`` (the straight-through gradient of hard mode),
    zero where that difference is not finite. The ``lerp`` of soft gates gets zeros in the rows it does not
    decide, so that its backward never multiplies a zero by an inf there."""
    exact = (w == 0) | (w == 1)
    diff = executed - skipped
    zero = torch.zeros_like(diff)
    step = torch.where(exact & torch.isfinite(diff), diff, zero)
    picked = torch.where(w == 0, skipped, executed) + (w - w.detach()) * step
    soft = torch.lerp(torch.where(exact, zero, skipped), torch.where(exact, zero, executed), w)
    return torch.where(exact, picked, soft)


def _masked_tail(
    g: Tensor,
    residual: Tensor,
    shortcut: Tensor,
    paths: capture.Paths | None = None,
    block: nn.Module | None = None,
    binary: bool = False,
) -> Tensor:
    """Eq. 1 for the block whose residual branch gave ``residual``: ``act(residual + shortcut)`` mixed with
    ``shortcut`` by ``g``, ``act`` the activation of ``block`` (a ReLU when ``None``), on the forward's fast
    ``paths`` (default: decided from ``residual``); ``binary``: ``g`` holds only 0 and 1. May write into
    ``residual`` (a fresh tensor of the caller's)."""
    paths = capture.paths(residual) if paths is None else paths
    w = g.view(-1, 1, 1, 1).to(residual.dtype)
    plain = block is None or blocks.plain_relu(block)
    grad = torch.is_grad_enabled() and (g.requires_grad or residual.requires_grad or shortcut.requires_grad)
    if paths.captured or not plain:  # plain, out-of-place ops (every tracer records them), the block's activation
        executed = F.relu(residual + shortcut) if plain else block.relu(residual + shortcut)
        if grad and g.requires_grad:
            return _mix_autograd(w, executed, shortcut)
        return _mix(w, executed, shortcut, binary, eager=not paths.captured)
    if grad:
        return _MaskedTail.apply(g, residual, shortcut, paths, binary)[0]
    residual += shortcut
    return _mix(w, F.relu_(residual), shortcut, binary)


def masked_block(
    block: nn.Module, x: Tensor, g: Tensor, paths: capture.Paths | None = None, binary: bool = False
) -> Tensor:
    """Eq. 1 for every sample: the whole block and its shortcut (computed once), mixed by ``g`` (B,). ``paths``:
    the forward's (:func:`skipnet.capture.paths` of ``x`` when called on its own); ``binary``: ``g`` holds only 0
    and 1 (one selection instead of a mix)."""
    paths = capture.paths(x) if paths is None else paths
    shortcut = blocks.shortcut_branch(block, x)
    return _masked_tail(g, blocks.residual_branch(block, x), shortcut, paths, block, binary)


def routed_block(block: nn.Module, x: Tensor, decision: Tensor) -> Tensor:
    """Run ``block`` only for the samples with ``decision == 1`` (B,); others get the shortcut.

    Values equal the masked form of Eq. 1 with a hard 0/1 decision. ``x`` is not modified.
    """
    if x.shape[0] == 1:  # plain branch, no indexing
        return blocks.run_block(block, x) if bool(decision[0] > 0.5) else blocks.shortcut_branch(block, x)
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
        return blocks.run_block(block, x)
    if n == 0:
        return blocks.shortcut_branch(block, x)
    grad = torch.is_grad_enabled()
    xs = _GatherRows.apply(x, idx) if grad else take_rows(x, idx)
    if block.downsample is not None:
        # Every sample needs the projection (skipped ones get exactly it). It is a fresh tensor of ours, and
        # writing into it is autograd-safe (batch norm does not save its output).
        shortcut = block.downsample(x)
        executed = blocks.residual_branch(block, xs)
        executed += _GatherRows.apply(shortcut, idx) if grad else take_rows(shortcut, idx)
        executed = blocks.activation_(block, executed)
        return _ScatterRows.apply(shortcut, idx, executed, True) if grad else put_rows_(shortcut, idx, executed)
    executed = blocks.residual_branch(block, xs)
    executed += xs  # the identity shortcut of the executed rows, already gathered
    executed = blocks.activation_(block, executed)
    if grad:
        return _ScatterRows.apply(x, idx, executed, False)
    return put_rows_(x if inplace else x.clone(), idx, executed)


def global_avg_pool(x: Tensor, avgpool: nn.Module) -> Tensor:
    """The backbone's ``avgpool`` of ``x``; under autograd a gradient in ``x``'s memory format when it is the
    backbones' own global average pooling, unhooked (a replaced or watched ``avgpool`` is called as it is)."""
    if (
        torch.is_grad_enabled()
        and x.requires_grad
        and not capture.active()
        and type(avgpool) is nn.AdaptiveAvgPool2d
        and avgpool.output_size in (1, (1, 1))
        and not blocks.watched(avgpool)
    ):
        # The same values. (Under a capture the plain op is traced: the function keeps x's shape on ctx, which
        # does not trace with symbolic shapes.)
        return _GlobalAvgPool.apply(x)
    return avgpool(x)


class MaskedExecutor:
    """Eq. 1 for every sample: the decision is the gate ``g`` (B,), or ``True`` (the block runs in full)."""

    routed = False

    def __init__(self, paths: capture.Paths, binary: bool) -> None:
        self.paths, self.binary = paths, binary

    def __call__(self, block: nn.Module, x: Tensor, decision: Tensor | bool) -> Tensor:
        if decision is True:
            return blocks.run_block(block, x)
        return masked_block(block, x, decision, self.paths, self.binary)


class RoutedExecutor:
    """Each block on the samples that execute it only: the decision is their sorted indices, or a ``bool``
    (every sample / none). ``inplace``: write the executed rows into the block input (autograd off; the input
    is a tensor the forward made)."""

    routed = True

    def __init__(self, inplace: bool) -> None:
        self.inplace = inplace

    def __call__(self, block: nn.Module, x: Tensor, decision: Tensor | bool) -> Tensor:
        if decision is True:
            return blocks.run_block(block, x)
        if decision is False:
            return blocks.shortcut_branch(block, x)
        return route_indices(block, x, decision, inplace=self.inplace)


EXECUTIONS = ("auto", "routed", "masked")


def choose(paths: capture.Paths, execution: str, mode: GateMode, forced: bool) -> MaskedExecutor | RoutedExecutor:
    """The executor of one forward with fast ``paths``: ``execution`` (``auto``: routed for the modes that need no
    skipped branch and for ``forced`` decisions), masked under a graph capture (see :mod:`skipnet.capture`)."""
    tool, traced = paths.tool, paths.masked_only
    if traced and execution == "routed":
        raise SkipnetError(
            f"routed execution cannot be captured by {tool} (which samples run a block depends on the input); "
            "use execution='masked', or `skipnet export` for a graph that skips"
        )
    if execution not in EXECUTIONS:
        raise SkipnetError(f"execution must be auto, routed or masked, got {execution!r}")
    if mode.needs_masked and execution == "routed":
        raise SkipnetError(f"mode {mode.value!r} needs masked execution (its gradient needs every block)")
    routed = execution == "routed" or (execution == "auto" and (mode.routed_by_default or forced))
    if traced and routed:
        routed = False
        warnings.warn(
            f"skipnet: {tool} captures a SkipNet with masked execution (every block computed, mixed with the "
            "0/1 decisions): correct on every input, but it saves no compute; `skipnet export` builds graphs "
            "that skip",
            stacklevel=3,
        )
    return RoutedExecutor(not torch.is_grad_enabled()) if routed else MaskedExecutor(paths, mode != GateMode.SOFT)
