"""Which graph-capturing tool, if any, is tracing the current call.

A SkipNet decides per input which blocks run. Eager PyTorch takes those decisions on the host (``nonzero``,
``.item()``) and, on the CPU, in compiled C++ kernels (:mod:`skipnet.fastgate`) that no tracer can see into: a
tracer would freeze the decisions it saw while tracing into the graph, which then gives wrong answers on new
inputs without an error. So the network asks :func:`tool` before taking a fast path:

- ``torch.jit.trace`` (and the TorchScript-based ONNX exporter, which traces) and ``torch.export`` (and the
  dynamo-based ONNX exporter, which exports): every decision stays a tensor op; the network computes every block
  and mixes with the 0/1 decisions (masked execution, Eq. 1), so the graph is right on every input but saves no
  compute (``skipnet export`` builds graphs that skip);
- ``torch.compile``: dynamo sees the host reads and breaks the graph there, so routing stays; only the compiled
  kernels and the custom autograd functions are avoided;
- ``torch.jit.script`` and ``torch.fx.symbolic_trace`` cannot express per-input control flow at all: refused
  with one line naming what to use instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.fx
from torch.fx import _symbolic_trace

from skipnet.errors import SkipnetError

# torch >= 2.6 tells FX symbolic tracing apart from export (``is_fx_tracing`` is true for both, with a warning).
_fx_symbolic = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)

JIT_TRACE = "torch.jit.trace"
EXPORT = "torch.export"
COMPILE = "torch.compile"
FX = "torch.fx"

# Tools under which the network must not route (host reads) and must not use the compiled kernels.
MASKED_ONLY = (JIT_TRACE, EXPORT)

REFUSE_SCRIPT = (
    "torch.jit.script cannot compile a SkipNet (per-input gate decisions, dataclass outputs); use torch.export "
    "or `skipnet export --format onnx|pt2` instead"
)
REFUSE_FX = (
    "torch.fx.symbolic_trace cannot follow a SkipNet's per-input gate decisions (Python control flow on tensor "
    "values); use torch.export or `skipnet export --format onnx|pt2` instead"
)


def tool(x: Any = None) -> str | None:
    """The capturing tool tracing this call (``x``: the forward's input, which FX replaces by a proxy)."""
    if torch.jit.is_tracing():
        return JIT_TRACE
    if torch.compiler.is_exporting():  # before FX: torch.export traces with FX machinery itself
        return EXPORT
    if torch.compiler.is_compiling():
        return COMPILE
    if isinstance(x, torch.fx.Proxy) or _fx_symbolic():
        return FX
    return None


@dataclass(frozen=True)
class Paths:
    """The fast paths one forward may take, decided once from its input (:func:`paths`) and handed to the
    executor, the policy and the gates (issue 34; as timm decides its fused attention once, not per call).

    ``tool``: the capturing tool tracing the forward (``None``: eager). ``kernels``: whether the compiled CPU
    kernels (:mod:`skipnet.fastgate`) may run -- eager float32 4-D CPU input and the kernels built; each kernel
    still checks its own tensors' dtype and layout."""

    tool: str | None
    eligible: bool  # eager float32 4-D CPU input

    @cached_property
    def kernels(self) -> bool:
        """Whether the compiled kernels may run (built on first need, not for a forward that never asks)."""
        from skipnet import fastgate

        return self.eligible and fastgate.load() is not None

    @property
    def captured(self) -> bool:
        """A tracer records this forward: plain tensor ops only (no compiled kernel, no custom autograd function)."""
        return self.tool is not None

    @property
    def masked_only(self) -> bool:
        """The tracer freezes host reads: every decision must stay a tensor op (masked execution)."""
        return self.tool in MASKED_ONLY


def paths(x: Any) -> Paths:
    """The :class:`Paths` of a forward on input ``x``; ``torch.fx.symbolic_trace`` is refused (:data:`REFUSE_FX`)."""
    found = tool(x)
    if found == FX:
        raise SkipnetError(REFUSE_FX)
    if not isinstance(x, torch.Tensor):
        raise SkipnetError(f"the model takes images as a torch.Tensor (B, C, H, W), got {type(x).__name__}")
    eligible = found is None and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
    return Paths(found, eligible)


def active() -> bool:
    """Whether any capturing tool is tracing this call (then no compiled kernel or custom autograd function)."""
    return tool() is not None


__all__ = [
    "COMPILE",
    "EXPORT",
    "FX",
    "JIT_TRACE",
    "MASKED_ONLY",
    "REFUSE_FX",
    "REFUSE_SCRIPT",
    "Paths",
    "active",
    "paths",
    "tool",
]
