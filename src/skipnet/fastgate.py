"""Compiled CPU kernels (``_fastgate.cpp``), built on first use: the recurrent gate's inference step as one call,
and the SP block tail (:class:`skipnet.executors._MaskedTail`) forward and backward in one pass each.

At batch size 1 on a CPU a gate step in eager PyTorch is about ten small calls (spatial sum, LSTM cell, output
layer, sigmoid, threshold, host read) at 15-20 us in all, against ~1.5 us for the same work in one C++ function:
over the 53 gates of a ResNet-110 that is ~1 ms of a ~10 ms forward, the whole of the gate overhead that routing
must recover. The kernel computes exactly the inference path of :class:`skipnet.gates.RNNGate` (logits equal
to float rounding; the decision ``p >= t`` is taken on the kernel's own ``p``, which the trace records), on the
parameters as they are at the call: each gate's projection is passed as it is, the shared LSTM and output weights
are laid out once per forward (``gate_pack``), and nothing is kept between forwards.

The masked tail (SP / soft training, masked execution) is memory-bound at training batch sizes: the eager form
reads and writes the block's activations ~5 times in the backward, the kernel once (float32 CPU, NCHW or
channels_last; values equal the eager form's, the per-sample gate gradient up to summation order).

It is built once per machine and source version with ``torch.utils.cpp_extension`` (a C++ compiler and ninja, a
dependency of the package; about 25 s; cached under ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). Where it cannot be built, or with ``SKIPNET_FAST_GATE=0``, the gates and the tail
run in eager PyTorch, with the same results.

Instruction-set variants: on x86-64 every kernel is compiled for AVX-512, AVX2 and the baseline (one variant
elsewhere, e.g. NEON on aarch64); the fastest the CPU runs is used, or the one named by ``SKIPNET_KERNEL_ISA``
(``avx512``, ``avx2``, ``default``; read at load) or :func:`set_variant`. The build turns off floating-point
contraction (``-ffp-contract=off``), so no variant fuses a multiply-add or reorders a sum: all variants give
bit-identical results, which the tests check on every variant the machine can run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from skipnet.errors import SkipnetError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_fastgate.cpp")
# No multiply-add contraction: every instruction-set variant then rounds exactly as the others (module docstring).
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
VARIANT_ENV = "SKIPNET_KERNEL_ISA"
_module: ModuleType | None = None
_tried = False
_selected = False  # a variant was selected in the loaded module (SKIPNET_KERNEL_ISA's or set_variant's)


def enabled() -> bool:
    """Whether the kernel may be used (``SKIPNET_FAST_GATE`` is not ``0``)."""
    return os.environ.get("SKIPNET_FAST_GATE", "1").strip() not in ("0", "false", "no", "off")


def module_name() -> str:
    """The extension's name: one per source text, torch and Python version (a stale build is never loaded)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {CFLAGS}".encode())
    return f"skipnet_fastgate_{h.hexdigest()[:12]}"


def load() -> ModuleType | None:
    """The compiled kernel, building it on the first call of the process if needed, in ``SKIPNET_KERNEL_ISA``'s
    variant (the fastest when unset); ``None`` if unavailable. A variant this CPU does not run is refused at every
    call until one is selected (never quietly replaced by another after the first refusal)."""
    global _selected
    module = _build()
    if module is not None and not _selected:
        _select(module, os.environ.get(VARIANT_ENV, "auto").strip().lower() or "auto")
        _selected = True
    return module


def _build() -> ModuleType | None:
    """The compiled kernel as built or loaded once per process (no variant selected here); ``None`` if
    unavailable."""
    global _module, _tried
    if not enabled():
        return None
    if _tried:
        return _module
    _tried = True
    quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU machines
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load as load_extension

        name = module_name()
        if not _built(name):
            log.info("building skipnet's compiled kernels %s (once per machine, ~25 s)", name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # compiler-ABI notes
            _module = load_extension(name, [str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
    except Exception as e:  # no compiler, no ninja, read-only cache, ...: the eager path does the same
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"skipnet: the compiled kernels (gate step, SP block tail) could not be built ({type(e).__name__}: "
            f"{first}); eager PyTorch runs instead (same results, slower). Set SKIPNET_FAST_GATE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        _module = None
    finally:
        quiet.setLevel(level)
    return _module


def _select(module: ModuleType, name: str) -> None:
    """Select variant ``name`` (``auto``: the fastest this CPU runs) in the loaded ``module``."""
    supported = list(module.supported_isas())
    if name == "auto":
        name = supported[0]
    if name not in supported:
        raise SkipnetError(
            f"{VARIANT_ENV}={name}: this CPU runs the kernel variants {', '.join(supported)} "
            f"(unset {VARIANT_ENV} to pick the fastest)"
        )
    module.set_isa(name)


def variants() -> list[str]:
    """The kernel's instruction-set variants this CPU can run, fastest first; empty without the kernel."""
    module = load()
    return [] if module is None else list(module.supported_isas())


def variant() -> str | None:
    """The variant the kernels run now (``None`` without the kernel)."""
    module = load()
    return None if module is None else str(module.current_isa())


def set_variant(name: str) -> None:
    """Run every kernel in variant ``name`` (one of :func:`variants`, or ``auto``) from now on, process-wide, in
    place of ``SKIPNET_KERNEL_ISA``'s."""
    global _selected
    module = _build()
    if module is None:
        raise SkipnetError("the compiled kernels are not available, so there is no variant to select")
    _select(module, name)
    _selected = True


def _built(name: str) -> bool:
    """Whether a build of ``name`` is already cached (then loading takes milliseconds); True when unknown."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch's: if it moves, just say nothing
        return True


def applies(x: torch.Tensor) -> bool:
    """Whether the kernel handles the input ``x`` (float32 CPU, 4-D); it is loaded if so."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and load() is not None


__all__ = ["SOURCE", "applies", "enabled", "load", "module_name", "set_variant", "variant", "variants"]
