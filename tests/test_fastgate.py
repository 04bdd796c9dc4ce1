"""The compiled recurrent-gate step (skipnet.fastgate) against the eager PyTorch gate it replaces."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.testing import assert_close

from conftest import trained_like
from skipnet import capture, create_model, fastgate
from skipnet.errors import SkipnetError
from skipnet.gates import KernelRun

# Every instruction-set variant of the kernels this CPU can run (an AVX-512 machine runs all three).
VARIANTS = fastgate.variants()
# The variant selected at load: SKIPNET_KERNEL_ISA's, or the fastest.
CHOSEN = os.environ.get("SKIPNET_KERNEL_ISA", "auto").strip().lower() or "auto"
CHOSEN = VARIANTS[0] if CHOSEN == "auto" else CHOSEN


@pytest.fixture(params=VARIANTS)
def variant(request):
    """Run the test with the kernels forced to one variant, then restore the automatic choice."""
    fastgate.set_variant(request.param)
    assert fastgate.variant() == request.param
    yield request.param
    fastgate.set_variant(CHOSEN)


@pytest.fixture
def no_kernel(monkeypatch):
    monkeypatch.setenv("SKIPNET_FAST_GATE", "0")


def test_kernel_builds_here() -> None:
    """This machine (and CI, a machine like it) has a compiler: the kernel must be available, not silently off."""
    assert fastgate.load() is not None
    assert fastgate.module_name().startswith("skipnet_fastgate_")
    assert VARIANTS[-1] == "default" and fastgate.variant() == CHOSEN  # the fastest unless forced
    if os.uname().machine in ("x86_64", "AMD64"):
        assert "avx2" in VARIANTS  # every x86-64 machine this project supports has AVX2


def test_variant_env_is_read_at_load_and_checked() -> None:
    code = "from skipnet import fastgate; print(fastgate.variant())"
    env = {**os.environ, "SKIPNET_KERNEL_ISA": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "default"
    with pytest.raises(SkipnetError, match="kernel variants .*default"):
        fastgate.set_variant("avx1024")
    assert fastgate.variant() == CHOSEN  # a refused choice changes nothing


def _kernel_outputs(model, x):
    """Every compiled kernel's results on fixed inputs: gate steps of a whole network, tail forward and backward."""
    import skipnet.executors as executors

    out = []
    with torch.no_grad():
        h = model.first_block(model.stem(x))
        kern = model.gates.kernel_run(h, model.gates.init_state(h), 0.5)
        for i, block in enumerate(model.gated_blocks):
            for xi in (h.contiguous(memory_format=torch.channels_last), h.contiguous(), torch.cat([h, h], 3)[..., ::2]):
                n = kern.step(i, xi)
                out += [kern.z[:, i].clone(), kern.p[:, i].clone(), kern.hc.clone(), kern.idx[:n].clone()]
            h = block(h)
    g = torch.tensor([0.0, 1.0, 0.3, 0.7, 0.5])
    torch.manual_seed(1)  # the same tail inputs for every variant
    for layout in (torch.channels_last, torch.contiguous_format):
        r, s, grad = (torch.randn(5, 19, 7, 9).contiguous(memory_format=layout) for _ in range(3))
        out += _tail_run(g, r, s, grad)
        assert executors._tail_kernels(capture.paths(r), r, s) is not None
    return out


def test_variants_are_bit_identical() -> None:
    """No contraction, no reordering: each variant computes the same floats as the baseline, bit for bit."""
    model = trained_like("tiny_rnn_gate_14")
    x = torch.randn(6, 3, 16, 16)
    results = {}
    try:
        for name in VARIANTS:
            fastgate.set_variant(name)
            results[name] = _kernel_outputs(model, x)
    finally:
        fastgate.set_variant(CHOSEN)
    for name in VARIANTS[:-1]:
        for a, b in zip(results[name], results["default"]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
@pytest.mark.parametrize("name,size", [("cifar10_rnn_gate_38", 32), ("tiny_rnn_gate_14", 16)])
def test_kernel_step_equals_eager_gate(name: str, size: int, layout: str, variant: str) -> None:
    """Every gate of a network, on its block's real input: logits, probabilities, LSTM state and decisions."""
    model = trained_like(name)
    for batch in (1, 7):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            h = model.first_block(model.stem(x))
            state = model.gates.init_state(h)
            assert len(state) == 3  # the eager inference path
            kern = model.gates.kernel_run(h, state, 0.5)
            assert isinstance(kern, KernelRun)
            for i, block in enumerate(model.gated_blocks):
                if layout == "channels_last":
                    xi = h.contiguous(memory_format=torch.channels_last)
                elif layout == "contiguous":
                    xi = h.contiguous()
                else:  # a view with gaps between rows: the kernel's general-stride loop
                    xi = torch.cat([h, h], 3)[..., ::2]
                z, state = model.gates.step(i, xi, state)
                n = kern.step(i, xi)
                assert_close(kern.z[:, i], z, rtol=1e-4, atol=1e-5)
                assert_close(kern.hc[0], state[0], rtol=1e-4, atol=1e-5)
                assert_close(kern.hc[1], state[1], rtol=1e-4, atol=1e-5)
                assert_close(kern.p[:, i], torch.sigmoid(kern.z[:, i]), rtol=1e-6, atol=1e-7)
                executed = torch.nonzero(kern.p[:, i] >= 0.5).flatten()
                assert n == executed.numel() and torch.equal(kern.idx[:n], executed)
                h = block(h)


def test_forward_with_and_without_kernel_agree(monkeypatch) -> None:
    """Greedy routed and masked forwards: same decisions, same logits (to float rounding), kernel or not."""
    model = trained_like("cifar10_rnn_gate_38").to(memory_format=torch.channels_last)
    x = torch.randn(9, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast_r = model(x, "greedy", execution="routed")
        fast_m = model(x, "greedy", execution="masked")
        monkeypatch.setenv("SKIPNET_FAST_GATE", "0")
        assert model.gates.kernel_run(x, model.gates.init_state(x), 0.5) is None
        slow_r = model(x, "greedy", execution="routed")
    dec = fast_r.trace.decisions
    assert 0.1 < float(dec.mean()) < 0.9  # the gates really route
    assert torch.equal(dec, fast_m.trace.decisions) and torch.equal(dec, slow_r.trace.decisions)
    assert torch.equal(fast_r.logits, fast_m.logits)
    assert_close(fast_r.logits, slow_r.logits, rtol=1e-5, atol=1e-5)
    assert_close(fast_r.trace.logits, slow_r.trace.logits, rtol=1e-5, atol=2e-6)
    assert_close(fast_r.trace.probs, slow_r.trace.probs, rtol=1e-5, atol=1e-6)
    assert_close(fast_r.trace.log_probs, slow_r.trace.log_probs, rtol=1e-5, atol=1e-5)


def test_batch_of_one_and_threshold_ties() -> None:
    """At batch 1 the kernel's decision is the only one taken; a threshold equal to p executes (p >= t)."""
    model = trained_like("tiny_rnn_gate_14")
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        out = model(x, "greedy", execution="routed")
        p = out.trace.probs[0]
        j = int(torch.argmin((p - 0.5).abs()))
        t = float(p[j])  # exactly p_j, as a Python float
        tie = model(x, "greedy", threshold=t, execution="routed")
        masked = model(x, "greedy", threshold=t, execution="masked")
    assert tie.trace.decisions[0, j] == 1
    assert torch.equal(tie.trace.decisions, masked.trace.decisions)
    assert torch.equal(tie.trace.decisions, (tie.trace.probs >= t).float())
    assert_close(tie.logits, masked.logits)


def test_training_and_other_dtypes_use_eager_gates() -> None:
    model = create_model("tiny_rnn_gate_14")
    x = torch.randn(2, 3, 16, 16)
    state = model.gates.init_state(x)  # grad enabled: the module path
    assert model.gates.kernel_run(x, state, 0.5) is None
    with torch.no_grad():
        state = model.double().gates.init_state(x.double())
        assert model.gates.kernel_run(x.double(), state, 0.5) is None
        out = model(x.double(), "greedy", execution="routed")
    assert out.trace.probs.dtype == torch.float64


def test_bf16_autocast_training_never_asks_for_the_kernels(monkeypatch) -> None:
    """SP training under CPU bf16 autocast: the block tails are bfloat16, which no kernel takes, so the kernels are
    not loaded (built, or warned about where they cannot be) for it; a float32 step still asks (the control)."""
    asked = []
    monkeypatch.setattr(fastgate, "load", lambda: asked.append(1))  # None: the eager tail runs
    model = create_model("tiny_rnn_gate_14").train()
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, "hard", execution="masked")
    out.logits.float().sum().backward()
    assert not asked
    model(x, "hard", execution="masked").logits.sum().backward()
    assert asked


def test_build_failure_falls_back_with_one_warning(monkeypatch) -> None:
    import torch.utils.cpp_extension as ext

    def broken(*args, **kwargs):
        raise OSError("no C++ compiler\nsecond line")

    monkeypatch.setattr(ext, "load", broken)
    monkeypatch.setattr(fastgate, "_module", None)
    monkeypatch.setattr(fastgate, "_tried", False)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(OSError: no C\+\+ compiler\)"):
        assert fastgate.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastgate.load() is None  # tried once per process: no second warning
        model = create_model("tiny_rnn_gate_14").eval()
        with torch.no_grad():
            out = model(torch.randn(3, 3, 16, 16), "greedy", execution="routed")
    assert out.trace.decisions.shape == (3, model.num_gates)


def test_disabled_by_environment(no_kernel) -> None:
    assert not fastgate.enabled()
    assert fastgate.load() is None
    assert not fastgate.applies(torch.randn(1, 3, 8, 8))


def _tail_run(g, r, s, grad, grad_layout=None):
    """Forward and backward of the masked tail (Eq. 1 after a block's residual branch) from fresh leaves."""
    import skipnet.executors as executors

    gl, rl, sl = (t.detach().clone().requires_grad_() for t in (g, r, s))
    out = executors._masked_tail(gl, rl * 1.0, sl)  # rl * 1.0: the tail writes into its residual argument
    out.backward(grad if grad_layout is None else grad.contiguous(memory_format=grad_layout))
    return out.detach(), gl.grad, rl.grad, sl.grad


# The bound between the kernel's lerp and torch.lerp's for a gate value g strictly between 0 and 1. Both evaluate
# s + g (e - s) (g < 1/2) or e - (1 - g)(e - s) (otherwise), but torch's vectorised kernel may fuse the multiply
# and the add (FMA, depending on the CPU capability ATen picked) while the kernel never does. With u = 2^-24:
# |fused - unfused| <= 2u |out| + u |g (e - s)| (1 + u) <= 2^-23 (|out| + |e - s|). At g = 0 and g = 1 both forms
# are exact (s, resp. e), so hard gates (SP: straight-through values exactly 0 or 1) are bit-identical.
def _lerp_bound(out: torch.Tensor, e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return 2.0**-23 * (out.abs() + (e - s).abs()) + 1e-38


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_masked_tail_kernels_equal_eager(layout, monkeypatch, variant: str) -> None:
    """The compiled forward/backward of the SP block tail give the eager values: bit-identical for hard gate
    values (0, 1), within the stated rounding bound (:func:`_lerp_bound`) for soft ones, in every variant."""
    import skipnet.executors as executors

    z = torch.zeros(2, 3, 4, 4)
    assert executors._tail_kernels(capture.paths(z), z) is not None  # the kernels are there to compare
    r, s, grad = (torch.randn(7, 16, 9, 9).contiguous(memory_format=layout) for _ in range(3))
    g = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3, 0.7, 0.5])  # exact skips and executions, and soft values
    fast = _tail_run(g, r, s, grad)
    other_layout = _tail_run(g, r, s, grad, torch.contiguous_format if layout == torch.channels_last else None)
    monkeypatch.setattr(executors, "_tail_kernels", lambda *t: None)
    slow = _tail_run(g, r, s, grad)
    hard = (g == 0) | (g == 1)
    assert torch.equal(fast[0][hard], slow[0][hard])  # hard gates: bit-identical
    e = torch.relu(r + s)  # the executed block output, exactly as both compute it
    err = (fast[0] - slow[0]).abs()[~hard]
    assert bool((err <= _lerp_bound(slow[0], e, s)[~hard]).all()), float(err.max())
    assert fast[0].stride() == slow[0].stride()
    assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-5)  # per-sample sums, another order
    for a, b in zip(fast[2:], slow[2:]):
        assert a.stride() == b.stride()
        assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(other_layout, slow):  # a gradient in another layout takes the eager path: same values
        assert_close(a, b, rtol=1e-5, atol=1e-5)
