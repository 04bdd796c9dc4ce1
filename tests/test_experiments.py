"""The experiment runner: dependency order, resuming, one way of failing, cached calibration and evaluation."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

from conftest import patience
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


# A stand-in for ``python -m skipnet train KIND:SECONDS ... --out DIR [--resume]``: records its pid and the times
# it started and ended, sleeps (not on --resume), then writes summary.json. KIND "fail" exits 3 instead; "stop"
# answers SIGTERM as training does (a checkpoint, exit 143); "stubborn" ignores SIGTERM. The tests' durations are
# in units of TICK, a second on an idle machine stretched by the load (conftest.patience): an interpreter's start
# under a CPU hog takes a good part of a second, and the runs must keep their order.
FAKE = """
import os, signal, sys, time
from pathlib import Path

args = sys.argv[3:]
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
kind, seconds = args[1].split(":")
if kind == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if kind == "stop":
    signal.signal(signal.SIGTERM, lambda *_: ((out / "checkpoint").write_text(""), sys.exit(143)))
(out / "pid").write_text(str(os.getpid()))
(out / "started").write_text(repr(time.time()))
if "--resume" not in args:
    time.sleep(float(seconds))
if kind == "fail":
    print("skipnet train: error: it failed as asked", file=sys.stderr)
    sys.exit(3)
(out / "ended").write_text(repr(time.time()))
(out / "summary.json").write_text("{}")
"""


def fake_runner(tmp_path) -> tuple[Runner, float]:
    """The runner on the stand-in interpreter, and TICK."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n{FAKE}")
    fake.chmod(0o755)
    tick = patience(1.0)
    return Runner(tmp_path / "runs", "digits", python=str(fake), grace=tick / 2, poll=0.05), tick


def span(runner: Runner, name: str) -> tuple[float, float]:
    d = runner.dir(name)
    return float((d / "started").read_text()), float((d / "ended").read_text())


def gone(runner: Runner, name: str) -> bool:
    try:
        os.kill(int((runner.dir(name) / "pid").read_text()), 0)
    except ProcessLookupError:
        return True
    return False


def test_runner_trains_side_by_side_up_to_parallel_after_needs(tmp_path) -> None:
    runner, tick = fake_runner(tmp_path)
    a, b = Run("a", (f"run:{0.8 * tick}",)), Run("b", (f"run:{0.8 * tick}",))
    runs = [a, b, Run("c", (f"run:{0.3 * tick}",), needs=("a",)), Run("d", (f"run:{0.3 * tick}",))]
    t = time.time()
    assert runner.train(runs, parallel=2) == []
    assert all(runner.finished(r) for r in runs)
    spans = {r.name: span(runner, r.name) for r in runs}
    assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1]  # a and b overlap
    assert spans["c"][0] >= spans["a"][1]  # c after the run it needs
    assert all(sum(s <= start < e for s, e in spans.values()) <= 2 for start, _ in spans.values())
    assert time.time() - t < 2 * (0.8 + 0.3) * tick  # not one after the other
    runner.commands.clear()
    assert runner.train(runs, parallel=2) == [] and runner.commands == []  # finished: nothing runs again


def test_runner_stops_runs_at_the_deadline_and_resumes_them(tmp_path) -> None:
    runner, tick = fake_runner(tmp_path)
    runs = [
        Run("long", ("stop:300",)),
        Run("quick", ("run:0.1",)),
        Run("stubborn", ("stubborn:300",)),
        Run("later", ("run:0.1",), needs=("long",)),
    ]
    t = time.time()
    stop_at = t + 1.5 * tick
    assert runner.train(runs, parallel=3, deadline=stop_at) == ["long", "stubborn", "later"]
    assert time.time() - t < (1.5 + 0.5 + 1.5) * tick  # the deadline, the grace, some slack
    assert runner.finished(runs[1]) and not runner.finished(runs[0]) and not runner.dir("later").exists()
    assert (runner.dir("long") / "checkpoint").exists()  # stopped by SIGTERM; "stubborn" by SIGKILL
    assert gone(runner, "long") and gone(runner, "stubborn")
    runner.commands.clear()
    assert runner.train(runs, parallel=3) == []
    assert [c.split()[2] for c in runner.commands] == ["stop:300", "stubborn:300", "run:0.1"]
    assert all(c.endswith("--resume") for c in runner.commands[:2]) and not runner.commands[2].endswith("--resume")


def test_runner_restarts_a_run_killed_before_its_first_checkpoint(tmp_path) -> None:
    """A run killed after its first metrics row but before any last.pt is started again (--resume), not refused."""
    runner, _ = fake_runner(tmp_path)
    early = Run("early", ("run:0.1",))
    runner.dir("early").mkdir(parents=True)
    (runner.dir("early") / "metrics.jsonl").write_text('{"step": 2, "val_accuracy": 9.0}\n')
    runner.train([early])
    assert runner.commands[0].endswith("--resume") and runner.finished(early)


def test_runner_failure_in_a_group_waits_for_the_others_and_raises(tmp_path) -> None:
    runner, tick = fake_runner(tmp_path)
    runs = [Run("bad", ("fail:0.1",)), Run("slow", (f"run:{tick}",)), Run("next", ("run:0.1",))]
    with pytest.raises(RunFailed, match=r"exited 3 \(it failed as asked\); see .*bad\.log"):
        runner.train(runs, parallel=2)  # the reason, from the log's last one-line error
    assert runner.finished(runs[1]) and gone(runner, "slow")  # the run going finished first
    assert not runner.dir("next").exists()  # nothing started after the failure
    # a run going at the deadline is stopped before the failure is raised
    runs = [Run("bad2", ("fail:0.1",)), Run("long", ("stop:300",))]
    stop_at = time.time() + 1.5 * tick
    with pytest.raises(RunFailed, match="bad2.log"):
        runner.train(runs, parallel=2, deadline=stop_at)
    assert (runner.dir("long") / "checkpoint").exists() and gone(runner, "long")


def test_runner_calibrates_a_budget_once_when_two_runners_collect_at_once(tmp_path) -> None:
    """Two drivers collecting the same finished run both want its budget: the second waits for the first's
    calibration and reuses its file instead of calibrating again (and never reads a half-made one)."""

    run = Run("a", ("cifar10_resnet_20",), budgets=(30.0,))
    calls: list[str] = []

    def fake_call(self, cmd, logfile):
        calls.append(" ".join(cmd))
        time.sleep(0.3)  # long enough for the other runner to arrive while this one calibrates
        self.calibrated_path(run, 30.0).write_text("calibrated")
        return ""

    runners = [Runner(tmp_path / "runs", "digits") for _ in range(2)]
    runners[0].dir("a").mkdir(parents=True)
    got: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Runner, "_call", fake_call)
        calibrate = [lambda r=r: got.append(r.calibrated(run, 30.0).read_text()) for r in runners]
        threads = [threading.Thread(target=c) for c in calibrate]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(calls) == 1 and "--target-reduction 30" in calls[0]
    assert got == ["calibrated", "calibrated"]
