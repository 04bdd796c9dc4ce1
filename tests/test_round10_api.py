"""The tenth hostile review: the Python API at inference, as a user's own code drives it (2026-12-07).

Each test fails on the code before its fix: masked execution made a NaN of a skipped block's overflow (``lerp``'s
``0 * inf``); a replaced ``backbone.avgpool`` was bypassed under autograd; a replaced block activation was applied
as a ReLU after the addition (while the block's inner activation was the new one); an invalid
``SKIPNET_KERNEL_ISA`` was refused once and then quietly replaced by another variant; a NumPy array (or a list of
decisions) was an ``AttributeError``; the unfused masked tail zeroed a NaN in its scalar remainder.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from skipnet import SkipnetError, create_model, fastgate
from skipnet.capture import Paths
from skipnet.executors import _masked_tail

# --------------------------------------------------------------------------------------------- 1. overflow
PATHS = {"eager": Paths(None, False), "kernel": Paths(None, True), "captured": Paths("torch.export", False)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("binary", [False, True])
def test_a_gate_of_0_takes_the_shortcut_exactly_whatever_the_block_holds(dtype, grad, path, binary) -> None:
    """Eq. 1 at g = 0 is the shortcut and at g = 1 the executed block, as routed execution gives them, on every path
    of the masked tail (no autograd; the autograd function with and without the compiled kernel; the plain ops a
    tracer records), also where the other branch (or the shortcut itself) is inf or NaN."""
    g = torch.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=grad)
    s = torch.randn(4, 8, 3, 3, dtype=dtype)
    r = torch.randn(4, 8, 3, 3, dtype=dtype)
    r[0, 0, 0, 0] = r[1, 1, 1, 1] = float("inf")  # overflowed residuals
    r[2, 2, 2, 2] = float("nan")
    s[2, 3, 0, 0], s[3, 3, 0, 0] = float("inf"), float("-inf")  # overflowed shortcuts: skipped, executed (relu: 0)
    expected = torch.where(g.detach().view(-1, 1, 1, 1) == 1, torch.relu(r + s), s)
    with torch.set_grad_enabled(grad):
        out = _masked_tail(g, r.clone().requires_grad_(grad) * 1.0, s, PATHS[path], binary=binary)
    assert torch.equal(out.detach(), expected)  # the branch each gate takes, whatever the other holds
    if grad:
        out.sum().backward()
        if path == "captured":  # plain ops: a non-finite difference of the branches gives the gate no gradient
            assert torch.isfinite(g.grad).all()


def test_the_traced_mix_has_the_hand_written_gradient_on_finite_values() -> None:
    """The plain ops a tracer records (``_mix_autograd``) give the same values and gradients in g, r and s as the
    hand-written backward (the straight-through gradient of hard mode, Eq. 7), at 0/1 and at soft gates."""
    torch.manual_seed(0)
    base = [torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0]), torch.randn(5, 4, 3, 3, dtype=torch.float64)]
    base.append(torch.randn(5, 4, 3, 3, dtype=torch.float64))
    results = []
    for path in ("captured", "eager"):
        g, r, s = (t.clone().double().requires_grad_() for t in base)
        out = _masked_tail(g, r * 1.0, s, PATHS[path])
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), g.grad, r.grad, s.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_masked_equals_routed_when_a_skipped_block_overflows_in_float16() -> None:
    model = create_model("tiny_rnn_gate_14").eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        block = model.gated_blocks[2]
        block.conv1.weight.mul_(300)
        block.conv2.weight.mul_(300)
    model, x = model.half(), x.half()
    decisions = torch.ones(6, model.num_gates)
    decisions[:, 2] = 0  # the overflowing block skipped by every image
    with torch.no_grad():
        routed = model(x, "greedy", decisions=decisions, execution="routed").logits
        masked = model(x, "greedy", decisions=decisions, execution="masked").logits
        executed = model(x, "greedy", decisions=torch.ones(6, model.num_gates), execution="routed").logits
    assert not torch.isfinite(executed).all()  # the block overflows where it runs
    assert torch.isfinite(routed).all()
    assert torch.equal(masked, routed)


# --------------------------------------------------------------------------------------------- 2. avgpool
def test_a_replaced_or_hooked_avgpool_runs_under_autograd_too() -> None:
    model = create_model("tiny_rnn_gate_14").eval()
    model.backbone.avgpool = nn.AdaptiveMaxPool2d(1)
    calls = []
    model.backbone.avgpool.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        reference = model(x).logits
    out = model(x.clone().requires_grad_()).logits  # a saliency map: frozen weights, gradient in the input
    assert torch.allclose(out.detach(), reference, atol=1e-5)
    assert len(calls) == 2
    out.sum().backward()


# --------------------------------------------------------------------------------------------- 3. activation
@pytest.mark.parametrize("act", [lambda: nn.ReLU6(inplace=True), lambda: nn.LeakyReLU(0.1), lambda: nn.Hardtanh(0, 1)])
def test_a_replaced_activation_is_the_blocks_in_every_execution(act) -> None:
    """``all_on`` is the plain ResNet's forward; routed and masked execution of the same decisions agree, with and
    without autograd; export refuses a graph that would apply ReLUs instead."""
    torch.manual_seed(0)
    model = create_model("tiny_rnn_gate_14").eval()
    for block in model.backbone.modules():
        if isinstance(getattr(block, "relu", None), nn.ReLU):
            block.relu = act()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x, "all_on").logits, model.backbone(x), atol=1e-5)
        greedy = model(x, "greedy", threshold=0.5)
    d = greedy.trace.decisions
    assert 0 < d.sum() < d.numel()  # some blocks skipped, some executed
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            routed = model(x, "greedy", decisions=d, execution="routed").logits
            masked = model(x, "greedy", decisions=d, execution="masked").logits
        assert torch.allclose(routed, masked, atol=1e-5)
        assert torch.allclose(routed.detach(), greedy.logits, atol=1e-5)
    from skipnet.export import export_model

    with pytest.raises(SkipnetError, match="ReLU activations, and backbone.*relu is a"):
        export_model(model, "onnx")


def test_a_hooked_relu_is_called_as_a_module() -> None:
    model = create_model("tiny_rnn_gate_14").eval()
    block = model.gated_blocks[0]
    seen = []
    block.relu.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16), "greedy", decisions=torch.ones(4, model.num_gates), execution="routed")
    assert seen.count(4) == 2  # inside the residual branch and after the addition, as the block's own forward


@pytest.mark.parametrize("execution", ["routed", "masked"])
def test_a_global_forward_hook_sees_every_module_the_plain_forward_calls(execution) -> None:
    """A hook on every module (``register_module_forward_hook``, as profilers and activation collectors use) sees
    the block's ReLU after the addition and the ``avgpool`` under autograd, as the plain network's forward calls
    them, and the gate's layers (the fused gate paths step aside, as for a module's own hook)."""
    from torch.nn.modules.module import register_module_forward_hook

    model = create_model("tiny_rnn_gate_14").eval()
    seen: list[nn.Module] = []
    handle = register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no "converting a tensor that requires grad to a scalar" here
            decisions = torch.ones(4, model.num_gates)
            x = torch.randn(4, 3, 16, 16, requires_grad=True)
            model(x, "greedy", decisions=decisions, execution=execution).logits.sum().backward()
    finally:
        handle.remove()
    relus = [b.relu for b in model.gated_blocks]
    assert all(sum(m is r for m in seen) == 2 for r in relus)  # inside the residual branch and after the addition
    assert any(m is model.backbone.avgpool for m in seen)
    assert any(isinstance(m, nn.LSTMCell) for m in seen)


# --------------------------------------------------------------------------------------------- 4. variant
def test_an_invalid_kernel_variant_is_refused_at_every_call_until_one_is_selected(monkeypatch) -> None:
    if fastgate.load() is None:
        pytest.fail("the compiled kernels did not build here")
    chosen = fastgate.variant()
    monkeypatch.setenv(fastgate.VARIANT_ENV, "bogus")
    monkeypatch.setattr(fastgate, "_selected", False)
    model = create_model("tiny_rnn_gate_14").eval()
    x = torch.randn(2, 3, 16, 16)
    try:
        for _ in range(2):
            with pytest.raises(SkipnetError, match="SKIPNET_KERNEL_ISA=bogus"), torch.no_grad():
                model(x)
        fastgate.set_variant("default")  # a choice made in code overrides the variable
        assert fastgate.variant() == "default"
        with torch.no_grad():
            model(x)
    finally:
        fastgate.set_variant(chosen)


# --------------------------------------------------------------------------------------------- 5. types
def test_numpy_images_and_listed_decisions_are_one_clear_error() -> None:
    model = create_model("tiny_rnn_gate_14").eval()
    with pytest.raises(SkipnetError, match="torch.Tensor .* got ndarray"):
        model(np.zeros((2, 3, 16, 16), dtype=np.float32))
    with pytest.raises(SkipnetError, match="decisions must be a torch.Tensor .* got list"):
        model(torch.zeros(1, 3, 16, 16), decisions=[[1] * model.num_gates])


# --------------------------------------------------------------------------------------------- 6. NaN in the tail
def test_the_unfused_masked_tail_keeps_a_nan_as_the_kernel_does() -> None:
    """float64 (no kernel) and float32 (the kernel) give the same executed output for a NaN in any position,
    the vectorised body and the scalar remainder alike."""
    for n in (1, 7, 17):
        for dtype in (torch.float64, torch.float32):
            r = torch.zeros(1, 1, 1, n, dtype=dtype)
            r[..., -1] = float("nan")
            s = torch.zeros_like(r)
            g = torch.ones(1, requires_grad=True)
            out = _masked_tail(g, r.requires_grad_() * 1.0, s, Paths(None, True))
            assert out[..., -1].isnan().all(), (n, dtype)
