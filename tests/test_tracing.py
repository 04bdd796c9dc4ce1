"""Graph-capturing tools on a gated network whose decisions vary by input: each either captures a graph that
answers like the eager model on fresh inputs, or refuses with one line naming what to use instead; none of
them ever runs the compiled C++ kernels (skipnet.fastgate), which no tracer can see into."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
from torch.testing import assert_close

from conftest import trained_like
from skipnet import capture, fastgate
from skipnet.errors import SkipnetError

B = 6


class _Deployed(torch.nn.Module):
    """What a user captures: greedy inference returning the logits and the decisions taken."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x, "greedy")
        return out.logits, out.trace.decisions


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A tiny gated network whose decisions differ between samples (see ``conftest.trained_like``)."""
    return trained_like("tiny_rnn_gate_14", seed=3)


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _kernels_forbidden(monkeypatch):
    """Any call of the compiled kernels while this is active fails the test."""

    class Forbidden:
        def __getattr__(self, name):
            raise AssertionError(f"compiled kernel {name} used during graph capture")

    with monkeypatch.context() as m:
        m.setattr(fastgate, "load", lambda: Forbidden())
        m.setattr(fastgate, "applies", lambda x: True)  # as on a float32 CPU input: the kernel would be taken
        yield


def _check_fresh(model, run) -> None:
    """``run(x) -> (logits, decisions)`` of a captured graph equals the eager model on inputs it never saw, and
    those inputs take other decisions than the capture input (so frozen decisions would be caught)."""
    with torch.inference_mode():
        seen = model(_inputs(0), "greedy").trace.decisions
    changed = False
    for seed in (1, 2, 3):
        x = _inputs(seed)
        with torch.inference_mode():
            ref = model(x, "greedy")
        logits, decisions = run(x)
        logits, decisions = torch.as_tensor(logits), torch.as_tensor(decisions)
        assert torch.equal(decisions.float(), ref.trace.decisions)
        assert_close(logits.float(), ref.logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(logits.argmax(1), ref.logits.argmax(1))
        changed |= not torch.equal(ref.trace.decisions, seen)
        assert 0.0 < float(ref.trace.decisions.mean()) < 1.0  # decisions vary between samples
    assert changed


def test_jit_trace_answers_fresh_inputs(model, monkeypatch) -> None:
    with _kernels_forbidden(monkeypatch), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        traced = torch.jit.trace(_Deployed(model).eval(), _inputs(0), check_trace=False)
    assert any("masked execution" in str(w.message) for w in seen)  # says that it saves no compute

    def run(x):
        with torch.no_grad():
            return traced(x)

    _check_fresh(model, run)


def test_jit_script_refuses_in_one_line(model) -> None:
    with pytest.raises(SkipnetError, match="torch.jit.script cannot compile a SkipNet.*torch.export") as err:
        torch.jit.script(model)
    assert "\n" not in str(err.value)


def test_fx_symbolic_trace_refuses_in_one_line(model) -> None:
    with pytest.raises(SkipnetError, match="torch.fx.symbolic_trace cannot follow.*torch.export") as err:
        torch.fx.symbolic_trace(model)
    assert "\n" not in str(err.value)


def test_routed_execution_refused_under_capture(model) -> None:
    def routed(x):
        return model(x, "greedy", execution="routed").logits

    with pytest.raises(SkipnetError, match="routed execution cannot be captured by torch.jit.trace"):
        torch.jit.trace(routed, _inputs(0))


def test_torch_export_answers_fresh_inputs(model, monkeypatch) -> None:
    with _kernels_forbidden(monkeypatch), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(_Deployed(model).eval(), (_inputs(0),))
    module = program.module()

    def run(x):
        with torch.no_grad():
            return module(x)

    _check_fresh(model, run)


def test_torch_compile_answers_fresh_inputs(model, monkeypatch) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_Deployed(model).eval(), backend="aot_eager", dynamic=False)
    calls = []
    real = fastgate.load

    def load():  # record whether a kernel was asked for while dynamo traced
        calls.append(capture.active())
        return real()

    monkeypatch.setattr(fastgate, "load", load)

    def run(x):
        with torch.no_grad():
            return compiled(x)

    _check_fresh(model, run)
    assert not any(calls)
    torch._dynamo.reset()


def _onnx_run(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def test_onnx_torchscript_exporter_answers_fresh_inputs(model, monkeypatch, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    with _kernels_forbidden(monkeypatch), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_Deployed(model).eval(), (_inputs(0),), str(path), dynamo=False)
    _check_fresh(model, _onnx_run(path))


def test_onnx_dynamo_exporter_answers_fresh_inputs(model, monkeypatch, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    with _kernels_forbidden(monkeypatch), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_Deployed(model).eval(), (_inputs(0),), str(path), dynamo=True)
    _check_fresh(model, _onnx_run(path))


@pytest.mark.parametrize("arch", ["tiny_rnn_gate_14", "tiny_aig_gate_14"])
@pytest.mark.parametrize("execution", ["routed", "masked"])
def test_the_fast_paths_are_decided_once_per_forward(monkeypatch, arch, execution) -> None:
    """Issue 34: whether a tracer is capturing (and so whether the compiled kernels and custom autograd functions
    may run) is asked once per inference forward, not again per gate and block."""
    from skipnet import capture, create_model

    model = create_model(arch).eval()
    x = torch.rand(4, 3, 32, 32)
    calls = []
    real = capture.tool
    monkeypatch.setattr(capture, "tool", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        model(x, "greedy", execution=execution)
    assert len(calls) == 1
