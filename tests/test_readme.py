"""The README says nothing that goes stale silently (issues 17, 35): its quick start is CI's, its Python snippet
runs, its table of shipped models is ``pretrained/index.json``, its cheat-sheet names every command, its links
lead somewhere, and it stays short."""

from __future__ import annotations

import argparse
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import skipnet

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INDEX = ROOT / "src" / "skipnet" / "pretrained" / "index.json"


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a markdown text."""
    body = text.split(f"\n## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def code_block(text: str, lang: str) -> str:
    return re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)


def shipped_model_rows() -> list[str]:
    """The table rows of the shipped models, as the README and benchmarks/RESULTS.md show them."""
    rows = []
    for name, e in json.loads(INDEX.read_text())["models"].items():
        latency = f"{e['latency_ratio']:.2f}" if e.get("latency_ratio") else "–"
        rows.append(
            f"| `{name}` | {e['stage']} | {e['accuracy']:.2f} | {e['macs_mean']:.4g} | {e['macs_reduction']:.1f} "
            f"| {e['computation_percentage']:.1f} | {latency} |"
        )
    return rows


def table_rows(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("| `")]


def test_readme_is_short_and_states_no_test_count() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\b\d[\d,]* tests\b", text), "a test count goes stale: leave it out"


def test_quick_start_is_what_ci_runs() -> None:
    commands = [
        ln.split("#", 1)[0].strip()
        for ln in code_block(section(README.read_text(), "Quick start"), "bash").splitlines()
    ]
    assert [c for c in commands if c] == [
        "pip install -e . && skipnet quickstart",
        "pip install -e '.[dev]' && python -m pytest -q",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[dev]'" in ci and "\npython -m pytest -q\n" in ci


@pytest.mark.slow
def test_quickstart_is_quiet(tmp_path, capsys) -> None:
    """``skipnet quickstart``: a line per stage (a bar on a terminal) and one table, at most 25 lines; per-epoch
    lines go to OUT/quickstart.log; no word about --resume, which the user did not give (issue 35)."""
    from skipnet.cli import main
    from skipnet.commands.quickstart import claim_out

    out = tmp_path / "qs"
    claim_out(out, {"epochs": 0.05, "alpha": 2.0, "seed": 0, "threads": 1})  # an earlier attempt's record, then its
    (out / "sp").mkdir(parents=True)  # SP run, killed before its checkpoint
    (out / "sp" / "metrics.jsonl").write_text('{"step": 3}\n')
    assert main(["quickstart", "--out", str(out), "--epochs", "0.05", "--threads", "1"]) == 0
    stdout, stderr = capsys.readouterr()
    shown = (stdout + stderr).strip().splitlines()
    assert len(shown) <= 25, "\n".join(shown)
    assert "resume" not in stdout + stderr and "step 19" not in stdout + stderr
    assert [ln.split()[0] for ln in shown if ln.split() and ln.split()[0] in ("base", "sp", "hrl")] == [
        "base",
        "sp",
        "hrl",
    ]
    log = (out / "quickstart.log").read_text()
    assert "step 19:" in log and "holds no checkpoint yet" in log and "finished: test accuracy" in log
    assert logging.getLogger("skipnet").propagate and not logging.getLogger("skipnet").handlers  # restored

    assert main(["quickstart", "--out", str(out), "--epochs", "0.05", "--threads", "1"]) == 0
    again = capsys.readouterr()
    assert again.err.count("finished earlier: reused") == 3 and "resume" not in again.out + again.err


def test_shipped_models_table_is_the_index() -> None:
    assert table_rows(section(README.read_text(), "Shipped models")) == shipped_model_rows()


def test_python_api_snippet_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    code = code_block(section(README.read_text(), "Python API"), "python")
    assert len(code.strip().splitlines()) <= 14
    with torch.no_grad():
        exec(compile(code, str(README), "exec"), scope)
    assert scope["out"].logits.shape == (8, 10) and scope["out"].trace.decisions.shape == (8, 17)
    assert isinstance(scope["out"], skipnet.SkipOutput) and isinstance(scope["out"].trace, skipnet.GateTrace)
    assert isinstance(scope["net"], skipnet.LogitsOnly)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        shipped = skipnet.create_model("cifar10_rnn_gate_38", pretrained=True)
        assert torch.equal(scope["model"](x).logits, shipped(x).logits)  # the save_pretrained round trip
    assert scope["fresh"].num_gates == 53


def test_cheat_sheet_names_every_command() -> None:
    from skipnet.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    sheet = code_block(section(README.read_text(), "Command line"), "bash")
    listed = {ln.split()[1] for ln in sheet.splitlines() if ln.startswith("skipnet ")}
    assert listed == set(sub.choices)


def test_per_image_routing_section_is_kept() -> None:
    assert section(README.read_text(), "Per-image routing").strip()


def test_readme_links_lead_somewhere() -> None:
    text = README.read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", t)]
    assert targets
    missing = [t for t in targets if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"


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
