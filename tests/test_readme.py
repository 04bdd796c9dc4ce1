"""The README's "Train a SkipNet in your own loop" runs as written (issue 17): the tensor-first API."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import skipnet

README = Path(__file__).resolve().parents[1] / "README.md"


def own_loop_code() -> str:
    text = README.read_text()
    section = text.split("### Train a SkipNet in your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_own_loop_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the example passes its modes: no default-mode warning
        exec(compile(own_loop_code(), str(README), "exec"), scope)
    assert "executed" in capsys.readouterr().out
    restored, model = scope["restored"], scope["model"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x).logits, model(x).logits)
    assert scope["logits"].shape == (16, 10)


def test_training_in_the_default_greedy_mode_warns_once() -> None:
    model = skipnet.create_model("tiny_rnn_gate_14").train()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="gives the gates no gradient"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once per model
        model(x, mode="hard")
        skipnet.create_model("tiny_rnn_gate_14").eval()(x)  # inference: no warning
        with torch.no_grad():
            skipnet.create_model("tiny_rnn_gate_14").train()(x)  # no autograd: nothing to train


def test_logits_only_is_a_classifier() -> None:
    model = skipnet.create_model("tiny_rnn_gate_14").eval()
    net = skipnet.LogitsOnly(model, "greedy")
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    logits = net(x)
    assert torch.equal(logits, model(x, "greedy").logits)
    assert F.cross_entropy(logits, y).ndim == 0
    assert net.last_trace.decisions.shape == (3, model.num_gates)
    assert set(net.state_dict()) == {f"model.{k}" for k in model.state_dict()}
