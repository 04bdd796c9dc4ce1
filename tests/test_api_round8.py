"""Round 8 of the Python API's silent-wrong-answer bugs: inference always runs the module tree's current modules and
weights (no cache that an update can miss, nothing shared between concurrent forwards), forced decisions,
thresholds and keep ratios outside their ranges are refused, and the compiled kernel ignores the default dtype."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.nn.utils.parametrizations import weight_norm

from skipnet import create_model, executors, fastgate
from skipnet.backbones import stages
from skipnet.errors import SkipnetError
from skipnet.gates import KernelRun
from skipnet.policy import ALL_SKIP_THRESHOLD

NAME = "tiny_rnn_gate_14"


def routing_model(name: str = NAME, seed: int = 0) -> nn.Module:
    """A tiny model whose greedy decisions differ from image to image, with gate logits far from the threshold
    (large output weights, the bias at the median logit), so float rounding never flips a decision."""
    torch.manual_seed(seed)
    model = create_model(name).eval()
    with torch.no_grad():
        model.gates.fc.weight.mul_(50.0)
        z = model(torch.randn(64, 3, 32, 32), execution="masked").trace.logits
        model.gates.fc.bias.sub_(z.median())
    return model


def reference(model: nn.Module, x: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 written out with every module of the tree *called* as it is now (the blocks' own forward, the gate's
    projection, LSTM cell and output layer): (logits, gate logits). Independent of skipnet's forward."""
    b, g = model.backbone, model.gates
    blocks = [block for layer in stages(b) for block in layer]
    h = blocks[0](b.maxpool(b.relu(b.bn1(b.conv1(x)))))
    state, zs = None, []
    for i, block in enumerate(blocks[1:]):
        state = g.lstm(g.proj[i](h.mean(dim=(2, 3))), state)
        z = g.fc(state[0])[:, 0]
        zs.append(z)
        d = (torch.sigmoid(z) >= threshold).to(h.dtype).view(-1, 1, 1, 1)
        skipped = block.downsample(h) if block.downsample is not None else h
        h = d * block(h) + (1 - d) * skipped
    return b.fc(torch.flatten(b.avgpool(h), 1)), torch.stack(zs, 1)


def fresh_copy(model: nn.Module) -> nn.Module:
    copy = create_model(model.config.name).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def gate_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).trace.logits


@pytest.fixture(params=["kernel", "eager"])
def gate_path(request, monkeypatch):
    """Both fast inference paths of the recurrent gate: the compiled step, and eager PyTorch (no kernel)."""
    if request.param == "eager":
        monkeypatch.setenv("SKIPNET_FAST_GATE", "0")
    else:
        assert fastgate.load() is not None
    return request.param


def _hard_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model.train()
    out = model(x, mode="hard")
    loss = F.cross_entropy(out.logits, torch.arange(x.shape[0]) % 10) + 5 * out.trace.probs.mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()


def _update(model: nn.Module, how: str, x: torch.Tensor) -> None:
    """Change the gate's weights in a way that leaves PyTorch's version counters alone (or, for the control, not)."""
    if how == "data_fill":  # EMA / weight-surgery code
        model.gates.fc.bias.data.fill_(-3.0)
    elif how == "numpy_write":  # what another process writing a share_memory() model looks like from here
        model.gates.lstm.weight_ih.detach().numpy()[:] *= -2.0
    elif how == "vector_to_parameters":  # a flat buffer reused in place (evolution strategies)
        vec = parameters_to_vector(model.parameters()).detach().clone()
        vector_to_parameters(vec, model.parameters())
        gate_logits(model, x)
        vec.add_(0.3 * torch.randn_like(vec))
        vector_to_parameters(vec, model.parameters())
    elif how == "fused_adam":
        _hard_step(model, torch.optim.Adam(model.parameters(), lr=0.3, fused=True), x)
    elif how == "fused_sgd":
        _hard_step(model, torch.optim.SGD(model.parameters(), lr=0.5, fused=True), x)
    else:  # in place under no_grad: bumps the version counter (the case a version-keyed cache caught)
        with torch.no_grad():
            model.gates.proj[2].weight.mul_(-3.0)


UPDATES = ["data_fill", "numpy_write", "vector_to_parameters", "fused_adam", "fused_sgd", "no_grad"]


@pytest.mark.parametrize("how", UPDATES)
def test_inference_uses_the_weights_as_they_are_now(how: str, gate_path: str) -> None:
    model = routing_model()
    x = torch.randn(8, 3, 32, 32)
    before = gate_logits(model, x)  # a forward before the update (a cache would be filled here)
    _update(model, how, x)
    after = gate_logits(model, x)
    want = gate_logits(fresh_copy(model), x)
    assert (want - before).abs().max() > 1e-2  # the update really changed the gates
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_parametrized_gate_module_uses_its_current_weight(gate_path: str) -> None:
    """weight_norm on the LSTM cell: its weight is computed from the parametrization's own parameters."""
    model = routing_model()
    x = torch.randn(8, 3, 32, 32)
    weight_norm(model.gates.lstm, "weight_ih")
    gate_logits(model, x)
    with torch.no_grad():
        model.gates.lstm.parametrizations.weight_ih.original1.mul_(-3.0)
        _, want = reference(model, x)
    torch.testing.assert_close(gate_logits(model, x), want, rtol=1e-5, atol=1e-5)


def test_replaced_modules_are_the_ones_that_run(gate_path: str) -> None:
    model = routing_model()
    x = torch.randn(8, 3, 32, 32)
    gate_logits(model, x)
    torch.manual_seed(5)
    model.gates.fc = nn.Linear(10, 1)  # a new gate head, closed
    nn.init.constant_(model.gates.fc.bias, -10.0)
    model.gates.proj[1] = nn.Linear(model.gates.proj[1].in_features, 10)
    old = model.backbone.layer3[1]
    model.backbone.layer3[1] = type(old)(old.conv1.in_channels, old.conv1.out_channels).eval()
    with torch.no_grad():
        out = model(x)
        want_logits, want_z = reference(model, x)
    assert model.gated_blocks[-1] is model.backbone.layer3[1]
    assert float(out.trace.probs.max()) < 1e-3  # every gate closed by the new head
    torch.testing.assert_close(out.trace.logits, want_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-5, atol=1e-5)


def test_replaced_block_of_a_plain_resnet_runs() -> None:
    model = create_model("tiny_resnet_14").eval()
    x = torch.randn(4, 3, 32, 32)
    old = model.backbone.layer3[1]
    model.backbone.layer3[1] = type(old)(old.conv1.in_channels, old.conv1.out_channels).eval()
    with torch.no_grad():
        got = model(x).logits
        want = fresh_copy(model)(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_backbone_with_another_number_of_blocks_is_refused() -> None:
    model = create_model(NAME).eval()
    model.backbone.layer3.append(type(model.backbone.layer3[1])(32, 32))
    with pytest.raises(SkipnetError, match="residual blocks"):
        model(torch.randn(1, 3, 32, 32))


def test_dynamically_quantized_gates_run_quantized() -> None:
    model = routing_model()
    x = torch.randn(8, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTMCell}, dtype=torch.qint8)
        with torch.no_grad():
            out = q(x)
            want_logits, want_z = reference(q, x)
    assert type(q.gates.fc) is not nn.Linear and type(q.gates.lstm) is not nn.LSTMCell
    assert (out.trace.logits - gate_logits(model, x)).abs().max() > 1e-4  # quantization changes the gates
    torch.testing.assert_close(out.trace.logits, want_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-5, atol=1e-5)


def test_plain_models_still_take_the_compiled_gate_step(monkeypatch) -> None:
    """Correct by reading the weights at each forward, not by giving up the fast path."""
    model = routing_model()
    x = torch.randn(8, 3, 32, 32)
    calls = []
    step = KernelRun.step
    monkeypatch.setattr(KernelRun, "step", lambda self, i, x: calls.append(i) or step(self, i, x))
    with torch.no_grad():
        out = model(x)
    assert calls == list(range(model.num_gates))
    _, want = reference(model, x)
    torch.testing.assert_close(out.trace.logits, want, rtol=1e-5, atol=1e-5)


class _Reenter(torch.Tensor):
    """A tensor that runs ``nested`` (once) when a spatial sum or mean is taken of it: another forward on the same
    model started in the middle of this one's gate step, as a second thread can."""

    nested = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.sum, torch.Tensor.mean) and cls.nested is not None and args[0].dim() == 4:
            nested, cls.nested = cls.nested, None
            nested()
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_forward_inside_another_does_not_change_its_answer() -> None:
    model = routing_model().double()
    x32, x20 = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 3, 20, 20, dtype=torch.float64)
    with torch.no_grad():
        want = model(x32).trace.logits
        other = model(x20).trace.logits
        seen = []
        _Reenter.nested = lambda: seen.append(model(x20).trace.logits)
        got = model(x32.as_subclass(_Reenter)).trace.logits.as_subclass(torch.Tensor)
    assert len(seen) == 1 and torch.equal(seen[0], other)
    assert torch.equal(got, want)


@pytest.mark.parametrize("path", ["kernel", "eager"])
def test_one_model_served_from_two_threads_with_other_input_sizes(path: str, monkeypatch) -> None:
    if path == "eager":
        monkeypatch.setenv("SKIPNET_FAST_GATE", "0")
    model = routing_model()
    xs = {32: torch.randn(4, 3, 32, 32), 20: torch.randn(4, 3, 20, 20)}
    with torch.no_grad():
        want = {s: model(x).trace.logits for s, x in xs.items()}
    wrong, errors, start = [], [], threading.Barrier(2)

    def serve(s: int) -> None:
        try:
            start.wait()
            for _ in range(60):
                with torch.no_grad():
                    got = model(xs[s]).trace.logits
                wrong.extend([] if torch.allclose(got, want[s], rtol=1e-5, atol=1e-5) else [s])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=serve, args=(s,)) for s in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong


# ------------------------------------------------------------------------------------------ argument checks


@pytest.mark.parametrize("value", [0.7, 0.3, 2.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("execution", ["routed", "masked"])
def test_forced_decisions_outside_0_1_are_refused(value: float, execution: str) -> None:
    model = routing_model()
    d = torch.ones(4, model.num_gates)
    d[1, 2] = value
    with pytest.raises(SkipnetError, match="decisions"), torch.no_grad():
        model(torch.randn(4, 3, 32, 32), decisions=d, execution=execution)


def test_forced_decisions_of_0_and_1_in_any_dtype_are_taken() -> None:
    model = routing_model()
    x = torch.randn(4, 3, 32, 32)
    d = (torch.arange(4 * model.num_gates).view(4, -1) % 3 == 0).float()
    with torch.no_grad():
        routed = model(x, decisions=d, execution="routed")
        masked = model(x, decisions=d, execution="masked")
        for other in (d.bool(), d.long(), d.double()):
            assert torch.equal(model(x, decisions=other).logits, routed.logits)
    assert torch.equal(routed.trace.decisions, d)
    torch.testing.assert_close(routed.logits, masked.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), -0.5, 1.5, float("inf"), 1.0000001, "0.5", None])
def test_thresholds_outside_the_checkpoint_range_are_refused(value) -> None:
    model = routing_model()
    x = torch.randn(2, 3, 32, 32)
    if value is not None:
        with pytest.raises(SkipnetError, match="threshold"), torch.no_grad():
            model(x, threshold=value)
    model.threshold = value  # the default of every forward, as a checkpoint would carry it
    for mode in ("greedy", "hard"):
        with pytest.raises(SkipnetError, match="threshold"), torch.no_grad():
            model(x, mode)


def test_thresholds_in_range_and_the_all_skip_value_are_taken() -> None:
    model = routing_model()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        assert float(model(x, threshold=ALL_SKIP_THRESHOLD).trace.decisions.sum()) == 0
        assert float(model(x, threshold=0.0).trace.decisions.mean()) == 1
        p = model(x).trace.probs
        assert torch.equal(model(x, threshold=torch.tensor(0.5)).trace.decisions, (p >= 0.5).float())
        model.threshold = 1.0
        assert torch.equal(model(x).trace.decisions, (p >= 1.0).float())


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), "1"])
def test_keep_ratios_outside_0_1_are_refused(value) -> None:
    model = create_model(NAME).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(SkipnetError, match="keep"), torch.no_grad():
        model(x, mode="random", keep=value)
    model.keep_ratio = value
    with pytest.raises(SkipnetError, match="keep"), torch.no_grad():
        model(x, mode="random")


# ------------------------------------------------------------------------------------------------- dtypes


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_float32_inference_under_a_float64_default_dtype(monkeypatch) -> None:
    model = routing_model()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    calls = []
    step = KernelRun.step
    monkeypatch.setattr(KernelRun, "step", lambda self, i, x: calls.append(i) or step(self, i, x))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            got = model(x)
    finally:
        torch.set_default_dtype(before)
    assert calls  # the compiled step ran, on float32 buffers
    assert got.trace.probs.dtype == torch.float32 and got.logits.dtype == torch.float32
    assert torch.equal(got.trace.decisions, want.trace.decisions)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.trace.logits, want.trace.logits)


# ----------------------------------------------------------------------------------- features (docs recipe)


def test_per_block_features_recipe_of_the_docs() -> None:
    """docs/python-api.md: block outputs through executors.masked_block, which never writes into its input or a
    projection shortcut, with the decisions the model took: the same logits as the model's routed forward."""
    model = routing_model()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        d = out.trace.decisions
        h = model.first_block(model.stem(x))
        features = [h]
        for i, block in enumerate(model.gated_blocks):
            h = executors.masked_block(block, h, d[:, i])
            features.append(h)
        logits = model.head(h)
    assert 0 < float(d.mean()) < 1
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
    with torch.no_grad():  # no feature was written into by a later block
        again = [model.first_block(model.stem(x))]
        for i, block in enumerate(model.gated_blocks):
            again.append(executors.masked_block(block, again[-1], d[:, i]))
    assert all(torch.equal(a, b) for a, b in zip(features, again, strict=True))
