"""The gated network: every registered name, every gate mode, Eq. 1 skipping, routed vs masked execution."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.testing import assert_close

from skipnet import ArchConfig, GatedResNet, GateMode, SkipnetError, create_model, get_config, list_models
from skipnet.blocks import run_block, shortcut_branch
from skipnet.executors import routed_block
from skipnet.gated import SkipOutput
from skipnet.gates import KernelRun, RNNGate
from skipnet.registry import register

# Gated blocks N = blocks - 1 (the first residual block always runs); reference notes §1.
EXPECTED_GATES = {
    ("cifar", 14): 5,
    ("cifar", 38): 17,
    ("cifar", 74): 35,
    ("cifar", 110): 53,
    ("cifar", 152): 74,
    ("imagenet", 34): 15,
    ("imagenet", 50): 15,
    ("imagenet", 101): 32,
}

GATED_TINY = ["tiny_rnn_gate_14", "tiny_feedforward_14", "tiny_feedforward2_14"]


# --------------------------------------------------------------------------------------------- helpers


def _size(name: str) -> int:
    # 64x64 keeps ImageNet nets fast and still leaves a 2x2 map in layer4 (BN in train mode needs > 1 value).
    return 64 if name.startswith("imagenet") else 32


def _images(name: str, batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s = _size(name)
    return torch.randn(batch, 3, s, s, dtype=dtype)


def _counterpart(name: str) -> str:
    """The plain ``*_resnet_*`` name of a gated name."""
    for kind in ("rnn_gate", "feedforward2", "feedforward"):
        if f"_{kind}_" in name:
            return name.replace(f"_{kind}_", "_resnet_")
    raise AssertionError(name)


@torch.no_grad()
def _realistic_bn(model: GatedResNet, x: torch.Tensor) -> GatedResNet:
    """Random BN affine parameters and running statistics calibrated on ``x``; returns the model in eval mode.

    At init BN's running stats are (0, 1) and the activations of a deep net reach ~1e4 in eval mode; calibrated
    stats keep them O(1), so equality checks compare meaningful numbers, and random affine parameters make
    every BN (the projection shortcut's included) matter.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the stats to the batch stats
    model.train()
    model(x, mode="hard" if model.gates is not None else "all_on")
    return model.eval()


def _reference_forward(model: GatedResNet, x: torch.Tensor) -> torch.Tensor:
    """Plain ResNet forward through torchvision's own block ``forward`` (independent of skipnet.gated)."""
    h = model.first_block(model.stem(x))
    for block in model.gated_blocks:
        h = block(h)
    return model.head(h)


def _gate_units(model: GatedResNet) -> list[nn.Module]:
    """The modules whose parameters must receive gradient: one per gate (FF) or the shared parts and projections."""
    g = model.gates
    if isinstance(g, RNNGate):
        return [g.lstm, g.fc, *g.proj]
    return list(g.gates)


def _grad_abs(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def _is01(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


# --------------------------------------------------------------------------------------------- every name


@pytest.mark.parametrize("name", list_models())
def test_every_registered_name_forward_backward(name: str) -> None:
    model = create_model(name)
    cfg = model.config
    n = EXPECTED_GATES[(cfg.family, cfg.depth)]
    assert model.num_gates == n
    assert (model.gates is None) == (cfg.gate == "none")
    for batch in (2, 1):
        # Inference: greedy (routed by default).
        model.eval()
        with torch.no_grad():
            out = model(_images(name, batch), mode="greedy")
        assert out.logits.shape == (batch, cfg.num_classes)
        assert torch.isfinite(out.logits).all()
        for field in ("probs", "decisions", "log_probs", "logits"):
            assert getattr(out.trace, field).shape == (batch, n), field
        assert _is01(out.trace.decisions)

        # Training: straight-through hard gates (masked), or all_on for a plain ResNet.
        model.train()
        model.zero_grad(set_to_none=True)
        mode = "hard" if cfg.gated else "all_on"
        out = model(_images(name, batch), mode=mode)
        assert out.trace.decisions.shape == (batch, n)
        target = torch.arange(batch) % cfg.num_classes
        F.cross_entropy(out.logits, target).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.backbone.conv1.weight.grad.abs().sum() > 0
        assert model.backbone.fc.weight.grad.abs().sum() > 0
        if cfg.gated:
            assert all(_grad_abs(u) > 0 for u in _gate_units(model))


@pytest.mark.parametrize(
    ("name", "n"),
    [
        ("cifar10_rnn_gate_38", 17),
        ("cifar100_resnet_74", 35),
        ("svhn_feedforward_110", 53),
        ("cifar10_rnn_gate_152", 74),
        ("imagenet_rnn_gate_34", 15),
        ("imagenet_resnet_50", 15),
        ("imagenet_rnn_gate_101", 32),
    ],
)
def test_num_gates_and_trace_shapes_batch_one(name: str, n: int) -> None:
    model = create_model(name).eval()
    assert model.num_gates == n
    assert len(model.block_stage) == n
    with torch.no_grad():
        out = model(_images(name, 1), mode="sample" if model.gates is not None else "random", keep=0.5)
    tr = out.trace
    assert tr.num_gates == n
    for t in (tr.probs, tr.decisions, tr.log_probs, tr.logits):
        assert t.shape == (1, n)
    assert tr.decisions.shape == (1, n)


# --------------------------------------------------------------------------------------------- all_on = plain


@pytest.mark.parametrize("name", ["cifar10_rnn_gate_38", "imagenet_rnn_gate_50"])
def test_all_on_equals_plain_resnet(name: str) -> None:
    gated = create_model(name).double()
    x = _images(name, 3, torch.float64)
    _realistic_bn(gated, x)
    plain = create_model(_counterpart(name)).double().eval()
    assert plain.gates is None
    with torch.no_grad():
        before = plain(x, mode="all_on").logits
    result = plain.load_state_dict(gated.state_dict(), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all(k.startswith("gates.") for k in result.unexpected_keys)
    with torch.no_grad():
        out_gated = gated(x, mode="all_on")
        out_plain = plain(x, mode="all_on")
        ref = _reference_forward(gated, x)
    assert not torch.allclose(before, out_plain.logits)  # the weights really changed
    assert_close(out_gated.logits, out_plain.logits, rtol=1e-10, atol=1e-10)
    assert_close(out_gated.logits, ref, rtol=1e-10, atol=1e-10)
    # all_on computes no gate: probs are ones and every block is recorded as executed.
    assert torch.equal(out_gated.trace.decisions, torch.ones_like(out_gated.trace.decisions))
    assert torch.equal(out_gated.trace.probs, torch.ones_like(out_gated.trace.probs))
    assert torch.equal(out_gated.trace.log_probs, torch.zeros_like(out_gated.trace.log_probs))


def test_torchvision_resnet50_state_dict_loads_and_matches() -> None:
    tv = torchvision.models.resnet50(weights=None).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.reset_running_stats()
                m.momentum = None
        tv.train()(x)
    tv.eval()
    model = create_model("imagenet_rnn_gate_50").double()
    model.backbone.load_state_dict(tv.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():
        expected = tv(x)
        got = model(x, mode="all_on").logits
    assert_close(got, expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------- gate modes


@pytest.mark.parametrize(("name", "kind"), zip(GATED_TINY, ["rnn", "ffgate1", "ffgate2"]))
def test_hard_mode_straight_through(name: str, kind: str) -> None:
    model = create_model(name)
    assert model.config.gate == kind
    x = _images(name, 4)
    model.train()
    out = model(x, mode="hard")
    tr = out.trace
    assert _is01(tr.decisions)
    assert torch.equal(tr.decisions, (tr.probs.detach() >= 0.5).to(tr.decisions.dtype))
    assert ((tr.probs > 0) & (tr.probs < 1)).all()
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    # Eq. 7: the backward pass uses dp, so every gate's parameters receive gradient.
    for unit in _gate_units(model):
        assert _grad_abs(unit) > 0

    # The forward value is exactly the hard decision: same logits as masked execution of those decisions.
    model.eval()
    with torch.no_grad():
        hard = model(x, mode="hard")
        forced = model(x, decisions=hard.trace.decisions, execution="masked")
        # With threshold 0 every block runs, whatever p is.
        all_on = model(x, mode="hard", threshold=0.0)
    assert torch.equal(hard.logits, forced.logits)
    assert torch.equal(all_on.trace.decisions, torch.ones_like(all_on.trace.decisions))


@pytest.mark.parametrize("name", GATED_TINY)
def test_soft_mode_is_continuous_mixture(name: str) -> None:
    model = create_model(name).double()
    x = _images(name, 3, torch.float64)
    _realistic_bn(model, x)
    with torch.no_grad():
        out = model(x, mode="soft")
    p = out.trace.probs
    assert ((p > 0) & (p < 1)).all()
    assert not _is01(p)
    # Eq. 1 with g = p, walked by hand.
    with torch.no_grad():
        h = model.first_block(model.stem(x))
        for i, block in enumerate(model.gated_blocks):
            g = p[:, i].view(-1, 1, 1, 1)
            h = g * run_block(block, h) + (1 - g) * shortcut_branch(block, h)
        expected = model.head(h)
    assert_close(out.logits, expected, rtol=1e-10, atol=1e-10)

    model.train()
    model.zero_grad()
    out = model(x, mode="soft")
    out.logits.square().sum().backward()
    assert out.trace.probs.requires_grad
    for unit in _gate_units(model):
        assert _grad_abs(unit) > 0


@pytest.mark.parametrize("name", GATED_TINY)
def test_sample_mode_log_probs(name: str) -> None:
    model = create_model(name).double().train()
    out = model(_images(name, 8, torch.float64), mode="sample")
    tr = out.trace
    assert _is01(tr.decisions)
    assert (tr.decisions == 0).any() and (tr.decisions == 1).any()  # p ~ 0.5 at init, 8 x 5 draws
    expected = torch.where(tr.decisions == 1, torch.log(tr.probs), torch.log1p(-tr.probs))
    assert_close(tr.log_probs, expected, rtol=1e-10, atol=1e-12)
    assert_close(tr.logits, torch.logit(tr.probs), rtol=1e-8, atol=1e-10)
    # log pi(g | x) carries gradient to the gates (REINFORCE, Eq. 6).
    assert tr.log_probs.requires_grad
    model.zero_grad()
    tr.log_probs.sum().backward()
    for unit in _gate_units(model):
        assert _grad_abs(unit) > 0
    # Sampling is random: another call draws other decisions.
    again = model(_images(name, 8, torch.float64), mode="sample").trace.decisions
    assert not torch.equal(again, tr.decisions)


def test_sample_mode_exploration_floor() -> None:
    """``explore=eps`` draws from pi = eps + (1 - 2 eps) p with log pi in the trace; gates at p ~ 1 still skip."""
    name, eps = "tiny_rnn_gate_14", 0.2
    model = create_model(name).double().train()
    with torch.no_grad():
        for unit in _gate_units(model):
            for m in unit.modules():
                if isinstance(m, nn.Linear) and m.out_features == 1:
                    m.bias.fill_(30.0)  # p = sigmoid(~30): the paper's policy would never skip
    x = _images(name, 64, torch.float64)
    torch.manual_seed(0)
    tr = model(x, mode="sample").trace
    assert bool((tr.probs > 1 - 1e-9).all()) and bool((tr.decisions == 1).all())
    torch.manual_seed(0)
    tr = model(x, mode="sample", explore=eps).trace
    skipped = float((tr.decisions == 0).double().mean())
    assert 0.1 < skipped < 0.3, skipped  # ~eps of 64 x N draws
    pi = eps + (1 - 2 * eps) * tr.probs
    expected = torch.where(tr.decisions == 1, torch.log(pi), torch.log1p(-pi))
    assert_close(tr.log_probs, expected, rtol=1e-10, atol=1e-12)
    assert tr.log_probs.requires_grad
    # Greedy decisions do not depend on the floor's training policy (pi >= 1/2 iff p >= 1/2).
    model.eval()
    with torch.no_grad():
        assert bool((model(x).trace.decisions == 1).all())
    with pytest.raises(SkipnetError, match="explore"):
        model(x, mode="sample", explore=0.5)


@pytest.mark.parametrize("name", GATED_TINY)
def test_gate_bias_sets_the_starting_probability(name: str) -> None:
    model = create_model(name).double().eval()
    x = _images(name, 16, torch.float64)
    with torch.no_grad():
        for bias, above in ((12.0, True), (-12.0, False)):
            model.set_gate_bias(bias)
            p = model(x).trace.probs
            assert bool((p > 0.999).all() if above else (p < 0.001).all()), (bias, p.min(), p.max())
    assert bool((model(x).trace.decisions == 0).all())  # closed gates: nothing runs at threshold 0.5
    with pytest.raises(SkipnetError, match="no gates"):
        create_model("tiny_resnet_14").set_gate_bias(1.0)


def test_zero_init_residual_starts_every_block_as_the_identity() -> None:
    model = create_model("tiny_rnn_gate_14").double().eval()
    model.zero_init_residual()
    x = model.stem(_images("tiny_rnn_gate_14", 8, torch.float64))  # non-negative: after the stem's ReLU
    with torch.no_grad():
        for block in model._blocks:
            if block.downsample is None:  # identity shortcut: relu(0 + x) = x
                assert_close(block(x), x, rtol=0, atol=0)
            x = block(x)
        # so in SP the gate's straight-through gradient, <dL/dx_out, F(x)>, starts at zero
        trained = create_model("tiny_rnn_gate_14").double()
        assert any(float(b.bn2.weight.abs().sum()) > 0 for b in trained._blocks)
        assert all(float(b.bn2.weight.abs().sum()) == 0 for b in model._blocks)


@pytest.mark.parametrize("name", GATED_TINY)
def test_greedy_threshold(name: str) -> None:
    model = create_model(name).eval()
    x = _images(name, 3)
    with torch.no_grad():
        default = model(x)  # a gated model defaults to greedy at 0.5
        everything = model(x, mode="greedy", threshold=0.0)
        nothing = model(x, mode="greedy", threshold=1.01)
        all_on = model(x, mode="all_on")
        zeros = model(x, decisions=torch.zeros(3, model.num_gates))
        model.threshold = 1.01  # the attribute is the default threshold
        nothing_attr = model(x, mode="greedy")
    tr = default.trace
    assert torch.equal(tr.decisions, (tr.probs >= 0.5).to(tr.decisions.dtype))
    assert torch.equal(everything.trace.decisions, torch.ones(3, model.num_gates))
    assert torch.equal(nothing.trace.decisions, torch.zeros(3, model.num_gates))
    assert torch.equal(nothing_attr.trace.decisions, torch.zeros(3, model.num_gates))
    assert_close(everything.logits, all_on.logits)
    assert_close(nothing.logits, zeros.logits)
    assert not torch.allclose(everything.logits, nothing.logits)
    # Gates were computed: probabilities are real, and identical whatever the threshold for gate 0.
    assert ((tr.probs > 0) & (tr.probs < 1)).all()
    assert_close(everything.trace.probs[:, 0], nothing.trace.probs[:, 0])


@pytest.mark.parametrize("name", ["tiny_rnn_gate_14", "tiny_feedforward_14", "tiny_resnet_14"])
def test_random_mode(name: str, monkeypatch) -> None:
    model = create_model(name).eval()
    n = model.num_gates
    x = _images(name, 6)
    gate_calls = []

    def counting_gate_step(*args):
        gate_calls.append(args[0])
        return GatedResNet.gate_step(model, *args)

    model.gate_step = counting_gate_step  # instance attribute shadows the method
    kernel_step = KernelRun.step  # the compiled gate path (CPU float32 inference) steps the gates itself

    def counting_kernel_step(self, i, x):
        gate_calls.append(i)
        return kernel_step(self, i, x)

    monkeypatch.setattr(KernelRun, "step", counting_kernel_step)
    with torch.no_grad():
        none = model(x, mode="random", keep=0.0)
        every = model(x, mode="random", keep=1.0)
        half = model(x, mode="random", keep=0.5)
        assert gate_calls == []  # SDV: decisions independent of the input, no gate computed
        all_on = model(x, mode="all_on")
        zeros = model(x, decisions=torch.zeros(6, n))  # forced decisions still compute the gates (real cost)
    assert gate_calls == ([] if model.gates is None else list(range(n)))
    assert torch.equal(none.trace.decisions, torch.zeros(6, n))
    assert torch.equal(every.trace.decisions, torch.ones(6, n))
    assert_close(every.logits, all_on.logits)
    assert_close(none.logits, zeros.logits)
    assert half.trace.decisions.shape == (6, n)
    assert _is01(half.trace.decisions)
    assert (half.trace.decisions == 0).any() and (half.trace.decisions == 1).any()
    assert torch.isfinite(half.logits).all()
    assert torch.equal(half.trace.log_probs, torch.zeros(6, n))
    assert torch.equal(half.trace.probs, torch.ones(6, n))
    # keep_ratio attribute is the default.
    model.keep_ratio = 0.0
    with torch.no_grad():
        assert torch.equal(model(x, mode="random").trace.decisions, torch.zeros(6, n))


def test_mode_errors() -> None:
    plain = create_model("tiny_resnet_14")
    gated = create_model("tiny_rnn_gate_14")
    x = _images("tiny", 2)
    for mode in ("hard", "soft", "sample"):
        with pytest.raises(SkipnetError, match="gated"):
            plain(x, mode=mode)
    for mode in ("hard", "soft"):
        with pytest.raises(SkipnetError, match="masked"):
            gated(x, mode=mode, execution="routed")
    with pytest.raises(SkipnetError, match="shape"):
        gated(x, decisions=torch.ones(2, gated.num_gates + 1))
    with pytest.raises(SkipnetError, match="execution"):
        gated(x, execution="lazy")
    with pytest.raises(ValueError):
        gated(x, mode="bogus")
    assert GateMode("all_on") is GateMode.ALL_ON
    assert plain.mode == GateMode.ALL_ON and gated.mode == GateMode.GREEDY


# --------------------------------------------------------------------------------------------- recurrent gate


def test_rnn_gate_parameters_are_shared() -> None:
    model = create_model("cifar10_rnn_gate_38")
    n = model.num_gates
    assert sum(isinstance(m, nn.LSTMCell) for m in model.modules()) == 1
    assert sum(isinstance(m, nn.Linear) for m in model.gates.modules()) == n + 1  # projections + shared output
    assert len(model.gates.proj) == n
    assert model.gates.fc.in_features == 10 and model.gates.fc.out_features == 1
    assert model.gates.lstm.input_size == 10 and model.gates.lstm.hidden_size == 10
    # Projection i reads the channels of gated block i's input: 16, then 32, then 64 (width 16).
    assert [p.in_features for p in model.gates.proj] == [b.conv1.in_channels for b in model.gated_blocks]
    assert {p.in_features for p in model.gates.proj} == {16, 32, 64}
    assert all(p.out_features == 10 for p in model.gates.proj)
    # ~0.04% of a block: a few hundred parameters per gate.
    gate_params = sum(p.numel() for p in model.gates.parameters())
    assert gate_params == 4 * 10 * (10 + 10) + 8 * 10 + 11 + sum(p.in_features * 10 + 10 for p in model.gates.proj)


def test_rnn_gate_state_carried_across_stages() -> None:
    model = create_model("cifar10_rnn_gate_38").double()
    x = _images("cifar", 2, torch.float64)
    _realistic_bn(model, x)
    calls: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = []
    pooled: list[torch.Tensor] = []

    def lstm_hook(module, args, output):
        calls.append((args[0], args[1], output))

    h1 = model.gates.lstm.register_forward_hook(lstm_hook)
    h2s = [p.register_forward_hook(lambda m, a, o: pooled.append(a[0])) for p in model.gates.proj]
    with torch.no_grad():
        out = model(x, mode="greedy")
    h1.remove()
    for h in h2s:
        h.remove()
    n = model.num_gates
    assert len(calls) == n and len(pooled) == n
    boundaries = [i for i in range(1, n) if model.block_stage[i] != model.block_stage[i - 1]]
    assert len(boundaries) == 2  # stage 1 -> 2 and 2 -> 3
    # Step 0 starts from zeros; step i receives exactly the (h, c) returned by step i - 1, across stages too.
    assert all(torch.equal(s, torch.zeros(2, 10, dtype=torch.float64)) for s in calls[0][1])
    for i in range(1, n):
        (h_in, c_in), (h_prev, c_prev) = calls[i][1], calls[i - 1][2]
        assert h_in is h_prev and c_in is c_prev, i

    # Recompute the logits by hand with a carried state: equal. Resetting the state at a stage boundary: differs.
    g = model.gates
    with torch.no_grad():
        state = (torch.zeros(2, 10, dtype=torch.float64),) * 2
        for i in range(n):
            state = g.lstm(g.proj[i](pooled[i]), state)
            assert_close(g.fc(state[0])[:, 0], out.trace.logits[:, i], rtol=1e-12, atol=1e-12)
        b = boundaries[0]
        fresh = g.lstm(g.proj[b](pooled[b]), None)
        assert not torch.allclose(g.fc(fresh[0])[:, 0], out.trace.logits[:, b], rtol=1e-6, atol=1e-9)


def test_rnn_gate_inference_path_equals_module_path() -> None:
    """Without autograd the RNN gate takes a folded fast path (projection and 1 / (H W) folded into the LSTM's
    input weights, one ``lstm_cell`` and one ``addmv`` per step): the same logits as the module calls, also
    after in-place parameter updates, a ``load_state_dict`` and a change of input size."""
    model = create_model("cifar10_rnn_gate_38").double()
    x = _images("cifar", 3, torch.float64)
    _realistic_bn(model, x)
    g = model.gates
    with torch.no_grad():
        assert len(g.init_state(x[:, :1])) == 3  # the fast path is taken
    with torch.enable_grad():
        assert len(g.init_state(x[:, :1])) == 2

    def check(inp: torch.Tensor) -> SkipOutput:
        with torch.no_grad():
            fast = model(inp, mode="greedy")
        slow = model(inp, mode="greedy")  # autograd on: the module path
        assert_close(fast.trace.logits, slow.trace.logits.detach(), rtol=0, atol=1e-12)
        assert torch.equal(fast.trace.decisions, slow.trace.decisions)
        assert_close(fast.logits, slow.logits.detach(), rtol=0, atol=1e-10)
        return fast

    before = check(x)
    with torch.no_grad():  # what an optimizer step does: in-place updates
        g.proj[3].weight.mul_(-2.0)
        g.lstm.weight_ih.add_(0.05)
        g.fc.bias.add_(0.5)
    after = check(x)
    assert not torch.allclose(after.trace.logits[:, 3], before.trace.logits[:, 3])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        g.proj[5].bias.add_(1.0)
    model.load_state_dict(state)
    assert_close(check(x).trace.logits, after.trace.logits, rtol=0, atol=0)
    check(torch.randn(2, 3, 40, 40, dtype=torch.float64))  # another H W per gate
    assert_close(check(x).trace.logits, after.trace.logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- Eq. 1 skipping


@pytest.mark.parametrize("name", ["tiny_rnn_gate_14", "cifar10_feedforward_38", "imagenet_rnn_gate_50"])
@pytest.mark.parametrize("execution", ["routed", "masked"])
def test_all_skipped_is_stem_first_block_shortcuts_head(name: str, execution: str) -> None:
    model = create_model(name).double()
    x = _images(name, 2, torch.float64)
    _realistic_bn(model, x)
    with torch.no_grad():
        out = model(x, decisions=torch.zeros(2, model.num_gates), execution=execution)
        h = model.first_block(model.stem(x))
        n_down = 0
        for block in model.gated_blocks:
            if block.downsample is not None:
                h = block.downsample(h)
                n_down += 1
        expected = model.head(h)
    assert n_down >= 2  # stage 2 and 3 (and 4) open with a projection shortcut, which stays when skipped
    assert_close(out.logits, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(out.trace.decisions, torch.zeros(2, model.num_gates))


@pytest.mark.parametrize("batch", [1, 4])
def test_skipped_downsampling_block_yields_projection_without_relu(batch: int) -> None:
    model = create_model("tiny_rnn_gate_14").double()
    x = _images("tiny", batch, torch.float64)
    _realistic_bn(model, x)
    h = model.first_block(model.stem(x)).detach()
    down = next(b for b in model.gated_blocks if b.downsample is not None)
    ident = model.gated_blocks[0]
    assert ident.downsample is None
    with torch.no_grad():
        h_down_in = h
        for b in model.gated_blocks:  # input of the first downsampling block
            if b is down:
                break
            h_down_in = run_block(b, h_down_in)
        proj = down.downsample(h_down_in)
        skipped = routed_block(down, h_down_in, torch.zeros(batch, dtype=torch.float64))
        executed = routed_block(down, h_down_in, torch.ones(batch, dtype=torch.float64))
        same = routed_block(ident, h, torch.zeros(batch, dtype=torch.float64))
    assert torch.equal(skipped, proj)
    assert (skipped < 0).any()  # BN(conv1x1_s2(x)) with no ReLU after it
    assert skipped.shape[2] == h_down_in.shape[2] // 2
    assert_close(executed, down(h_down_in), rtol=1e-12, atol=1e-12)  # torchvision's own block forward
    assert (executed >= 0).all()
    assert torch.equal(same, h)  # identity shortcut


# --------------------------------------------------------------------------------------------- routed vs masked


def _forced(batch: int, n: int, skip_col: int, run_col: int) -> torch.Tensor:
    d = torch.bernoulli(torch.full((batch, n), 0.5, dtype=torch.float64))
    d[:, skip_col] = 0.0  # no sample executes this block
    d[:, run_col] = 1.0  # every sample executes this one
    return d


@pytest.mark.parametrize(
    ("name", "batch"),
    [
        ("tiny_rnn_gate_14", 1),
        ("tiny_rnn_gate_14", 3),
        ("tiny_rnn_gate_14", 8),
        ("cifar10_feedforward_38", 1),
        ("cifar10_feedforward_38", 3),
        ("cifar10_feedforward_38", 8),
        ("imagenet_resnet_50", 3),
    ],
)
def test_routed_equals_masked_forced_decisions(name: str, batch: int) -> None:
    model = create_model(name).double()
    _realistic_bn(model, _images(name, 4, torch.float64))
    n = model.num_gates
    down = [i for i, b in enumerate(model.gated_blocks) if b.downsample is not None]
    x = _images(name, batch, torch.float64)
    # Downsampling blocks skipped by all, then executed by all; other columns random.
    cases = [_forced(batch, n, down[0], 0), _forced(batch, n, 0, down[0]), torch.ones(batch, n), torch.zeros(batch, n)]
    with torch.no_grad():
        for d in cases:
            routed = model(x, decisions=d, execution="routed")
            masked = model(x, decisions=d, execution="masked")
            auto = model(x, decisions=d)
            assert torch.equal(routed.trace.decisions, d.to(routed.trace.decisions.dtype))
            assert torch.equal(masked.trace.decisions, routed.trace.decisions)
            assert_close(routed.logits, masked.logits, rtol=1e-10, atol=1e-10)
            assert torch.equal(auto.logits, routed.logits)
        # Decisions matter (the test is not vacuous).
        assert not torch.allclose(model(x, decisions=cases[0]).logits, model(x, decisions=cases[1]).logits)


@pytest.mark.parametrize("name", ["tiny_rnn_gate_14", "cifar10_rnn_gate_38", "tiny_feedforward2_14"])
def test_greedy_routed_equals_masked(name: str) -> None:
    model = create_model(name).double()
    x = _images(name, 8, torch.float64)
    _realistic_bn(model, x)
    with torch.no_grad():
        # Put the threshold in the middle of the probabilities so that decisions are mixed within blocks.
        t = float(model(x, mode="greedy", execution="masked").trace.probs.median())
        routed = model(x, mode="greedy", threshold=t, execution="routed")
        masked = model(x, mode="greedy", threshold=t, execution="masked")
    d = routed.trace.decisions
    assert torch.equal(d, masked.trace.decisions)
    assert (d == 0).any() and (d == 1).any()
    assert_close(routed.logits, masked.logits, rtol=1e-10, atol=1e-10)
    assert_close(routed.trace.probs, masked.trace.probs, rtol=1e-10, atol=1e-12)


def test_routed_block_does_not_modify_its_input() -> None:
    model = create_model("tiny_resnet_14").eval()
    x = torch.randn(4, 8, 32, 32)
    before = x.clone()
    with torch.no_grad():
        y = routed_block(model.gated_blocks[0], x, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(x, before)
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])
    assert not torch.equal(y[0], x[0])


def test_channels_last_routing() -> None:
    model = create_model("tiny_rnn_gate_14").eval()
    x = _images("tiny", 4)
    d = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0]]).repeat(2, 1)
    with torch.no_grad():
        ref = model(x, decisions=d).logits
        model = model.to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last)
        out = model(xc, decisions=d, execution="routed")
        greedy = model(xc, mode="greedy")
        # The routed block keeps the memory format (no silent conversion back to NCHW).
        h = model.first_block(model.stem(xc))
        assert h.is_contiguous(memory_format=torch.channels_last)
        for i, block in enumerate(model.gated_blocks):
            h = routed_block(block, h, d[:, i])
            assert h.is_contiguous(memory_format=torch.channels_last), i
    assert torch.isfinite(out.logits).all() and torch.isfinite(greedy.logits).all()
    assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)


def test_routed_training_keeps_skipped_samples_out_of_block_bn() -> None:
    model = create_model("tiny_resnet_14").train()
    block = model.gated_blocks[0]
    x = torch.randn(4, 8, 32, 32)
    before = block.bn1.running_mean.clone()
    routed_block(block, x, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    expected = 0.9 * before + 0.1 * block.conv1(x[:2]).mean(dim=(0, 2, 3))
    assert_close(block.bn1.running_mean, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- registry / config


def test_registry_and_config() -> None:
    names = list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    assert {"cifar10_rnn_gate_110", "imagenet_rnn_gate_101", "tiny_rnn_gate_14"} <= set(names)
    with pytest.raises(ValueError, match="already registered"):
        register(get_config("tiny_rnn_gate_14"))
    # FFGate-I below 100 layers, FFGate-II from 100 on.
    assert get_config("cifar10_feedforward_74").gate == "ffgate1"
    assert get_config("cifar10_feedforward_110").gate == "ffgate2"
    # Overrides: None is dropped; the result round-trips through a dict.
    cfg = get_config("cifar10_rnn_gate_38", num_classes=7, image_size=None)
    assert cfg.num_classes == 7 and cfg.image_size == 32
    assert ArchConfig.from_dict({**cfg.to_dict(), "extra": 1}) == cfg
    assert create_model(cfg).backbone.fc.out_features == 7
    assert create_model("tiny_resnet_14", num_classes=3).config.num_classes == 3


def test_timm_style_overrides() -> None:
    """``create_model(name, in_chans=..., num_classes=...)`` as in timm; a misspelt option is one clear error."""
    model = create_model("tiny_rnn_gate_14", in_chans=1, num_classes=5).eval()
    assert model.config.in_channels == 1 and model.backbone.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 16, 16)).logits.shape == (2, 5)
    with pytest.raises(SkipnetError, match="unknown model option 'in_chan'.*in_chans"):
        create_model("tiny_rnn_gate_14", in_chan=1)


def test_which_modes_compute_gates_is_the_mode_s_own() -> None:
    """Issue 34: a mode says itself whether it runs the gates (evaluation, the policy and `skipnet eval` ask it)."""
    from skipnet.evaluate import describe_mode
    from skipnet.policy import GateMode

    assert {m for m in GateMode if not m.computes_gates} == {GateMode.ALL_ON, GateMode.RANDOM}
    assert describe_mode("greedy") == "greedy: the learned gates decide" and describe_mode("hard") == "hard"
