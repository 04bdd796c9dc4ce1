"""The experiment runner: dependency order, resuming, one way of failing, cached calibration and evaluation."""

from __future__ import annotations

import json
import os

import pytest

from skipnet.errors import SkipnetError
from skipnet.experiments import Run, RunFailed, Runner, order, select

FAST = ("--iters", "4", "--batch-size", "32", "--threads", "1", "--val-split", "0.2", "--limit-test", "64")


def test_order_puts_needs_first_and_refuses_cycles() -> None:
    a, b, c = Run("a", (), needs=("b",)), Run("b", (), needs=("c",)), Run("c", ())
    assert [r.name for r in order([a, b, c])] == ["c", "b", "a"]
    with pytest.raises(SkipnetError, match="not declared"):
        order([Run("x", (), needs=("y",))])
    with pytest.raises(SkipnetError, match="depends on itself"):
        order([Run("x", (), needs=("y",)), Run("y", (), needs=("x",))])


def test_select_adds_what_the_named_runs_need_and_refuses_unknown_names() -> None:
    runs = [Run("a", ()), Run("b", (), needs=("a",)), Run("c", (), needs=("b",)), Run("d", ())]
    assert [r.name for r in select(runs, ["c"])] == ["a", "b", "c"]
    assert [r.name for r in select(runs, ["d", "a"])] == ["a", "d"]
    with pytest.raises(SkipnetError, match="no run named e"):
        select(runs, ["e"])


def test_runner_trains_in_order_resumes_collects_and_fails_one_way(tmp_path) -> None:
    runner = Runner(tmp_path / "runs", "digits")
    base = Run("base", ("tiny_resnet_14", "--stage", "base", *FAST))
    hrl = Run(
        "hrl",
        ("tiny_rnn_gate_14", "--stage", "hrl", "--init", "{runs}/base/best.pt", "--gate-bias", "1", *FAST),
        needs=("base",),
        budgets=(30,),
    )
    runner.train([hrl, base])
    assert [c.split()[2] for c in runner.commands] == ["tiny_resnet_14", "tiny_rnn_gate_14"]
    assert f"--init {tmp_path}/runs/base/best.pt" in runner.commands[1]
    runner.commands.clear()
    runner.train([base, hrl])  # finished: nothing runs again
    assert runner.commands == []
    rows = runner.rows([base, hrl])
    assert set(rows) == {"base", "hrl", "hrl@30%"}
    assert rows["hrl@30%"]["macs_reduction"] >= 30 - 1e-6 or rows["hrl@30%"]["threshold"] > 1.0
    assert "routes" in rows["hrl"]
    n = len(runner.commands)
    assert runner.rows([base, hrl]) == rows and len(runner.commands) == n  # cached: no command again
    assert json.loads((tmp_path / "runs" / "hrl" / "best.test.json").read_text())["accuracy"] == rows["hrl"]["accuracy"]
    # a replaced best.pt (a run still training) is evaluated again, never answered from the stale cache
    best = tmp_path / "runs" / "hrl" / "best.pt"
    best.write_bytes(best.read_bytes())
    os.utime(best, ns=(1, 1))
    runner.commands.clear()
    assert runner.rows([hrl])["hrl"]["accuracy"] == rows["hrl"]["accuracy"]
    assert [c.split()[1] for c in runner.commands] == ["eval"]
    # a run killed after its last checkpoint resumes; until then its best.pt is a row marked unfinished
    (tmp_path / "runs" / "base" / "summary.json").unlink()
    assert runner.rows([base])["base"]["finished"] is False
    runner.commands.clear()
    runner.train([base])
    assert runner.commands[0].endswith("--resume")
    # a run killed after its first metrics row but before any last.pt is started again, not refused
    early = Run("early", ("tiny_resnet_14", "--stage", "base", *FAST))
    (tmp_path / "runs" / "early").mkdir()
    (tmp_path / "runs" / "early" / "metrics.jsonl").write_text('{"step": 2, "val_accuracy": 9.0}\n')
    runner.commands.clear()
    runner.train([early])
    assert runner.commands[0].endswith("--resume") and runner.finished(early)
    bad = Run("bad", ("tiny_resnet_14", "--stage", "base", "--lr", "-1", *FAST))
    with pytest.raises(RunFailed, match="bad.log"):
        runner.train([bad])
