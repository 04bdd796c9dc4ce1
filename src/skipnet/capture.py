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

from typing import Any

import torch
import torch.fx
from torch.fx import _symbolic_trace

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


def active() -> bool:
    """Whether any capturing tool is tracing this call (then no compiled kernel or custom autograd function)."""
    return tool() is not None


__all__ = ["COMPILE", "EXPORT", "FX", "JIT_TRACE", "MASKED_ONLY", "REFUSE_FX", "REFUSE_SCRIPT", "active", "tool"]
