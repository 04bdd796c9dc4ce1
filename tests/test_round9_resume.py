"""Round 9 resume findings: a resume at the step already reached runs that step's checkpoint round (A); every rank
updates its wall-clock checkpoint timer (B); a resume under another number of processes is refused (C); a torchrun
resume of a sampling stage is exact (D); the trainer evaluates as ``skipnet eval`` does (E); a resume refuses a
``--distill`` teacher whose contents changed (F); config.json records a command that can be run again (G)."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import one_line_error, torchrun, train_tiny_sp
from skipnet.checkpoint import load_checkpoint
from skipnet.cli import main
from skipnet.errors import Interrupted
from skipnet.train import Trainer

TINY = ["tiny_rnn_gate_14", "--data", "digits", "--threads", "1", "--val-split", "0.2", "--log-every", "1000"]


def stop_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The next run stops as on SIGINT once it has taken ``step`` steps (deterministic, in-process)."""
    original = Trainer.train_step

    def train_step(self, x, y):
        stats = original(self, x, y)
        if self.step + 1 == step:  # this was step ``step``; the loop sees the request before the next one
            self.stop.signum = signal.SIGINT
        return stats

    monkeypatch.setattr(Trainer, "train_step", train_step)


def rows(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock field."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "time_s"} for ln in lines if ln.strip()]


def differing_tensors(a: Path, b: Path) -> list[str]:
    """The names of the tensors that differ between two checkpoints' weights."""
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


# --------------------------------------------------------------------------------------------- A
SP = {"batch_size": 16, "schedule": "constant", "lr": 0.02, "select": "last", "limit_train": 320}


def test_resume_at_the_step_reached_runs_its_checkpoint_round(tmp_path, monkeypatch) -> None:
    """Stopped at step 6 (rounds every 4) and resumed with --iters 6: the step-6 round runs (its row, best.pt chosen
    under --select last, tested), as in a run of 6 steps that never stopped."""
    straight = train_tiny_sp(tmp_path / "straight", iters=6, eval_every=4, **SP)
    stop_after(monkeypatch, 6)
    with pytest.raises(Interrupted):
        train_tiny_sp(tmp_path / "run", iters=20, eval_every=4, **SP)
    monkeypatch.undo()
    run = train_tiny_sp(tmp_path / "run", iters=6, resume=True)
    assert [r["step"] for r in rows(run)] == [4, 6]
    assert rows(run) == rows(straight)
    summary = [json.loads((p / "summary.json").read_text()) for p in (straight, run)]
    assert summary[1]["steps"] == 6 and summary[1]["best_step"] == 6
    assert summary[0]["test"] == summary[1]["test"]
    assert not differing_tensors(straight / "best.pt", run / "best.pt")


def test_resume_at_the_step_reached_before_any_round_finishes(tmp_path, monkeypatch) -> None:
    """Stopped at step 3 before any evaluation, resumed with --iters 3: it evaluates step 3 and finishes (it said
    that best.pt does not exist)."""
    stop_after(monkeypatch, 3)
    with pytest.raises(Interrupted):
        train_tiny_sp(tmp_path / "run", iters=20, eval_every=100, **SP)
    monkeypatch.undo()
    run = train_tiny_sp(tmp_path / "run", iters=3, resume=True)
    assert [r["step"] for r in rows(run)] == [3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["best_step"] == 3
    # finished: the same command again does nothing more
    assert train_tiny_sp(run, iters=3, resume=True) == run and [r["step"] for r in rows(run)] == [3]


def test_resume_shorter_than_the_step_reached_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    stop_after(monkeypatch, 5)
    with pytest.raises(Interrupted):
        train_tiny_sp(tmp_path / "run", iters=20, eval_every=100, **SP)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["train", *TINY, "--stage", "sp", "--out", str(tmp_path / "run"), "--iters", "4", "--resume"]) == 2
    assert "already reached step 5" in one_line_error(capsys, "train")


# --------------------------------------------------------------------------------------------- B
class _Rank1:
    """A DistContext of rank 1 of 2, without a process group."""

    rank, world, device = 1, 2, torch.device("cpu")

    def gather_object(self, obj):
        return None


def test_every_rank_restarts_its_wall_clock_checkpoint_timer(tmp_path) -> None:
    """A rank other than 0 writes nothing but restarts its --checkpoint-minutes timer: else ``dist.any`` of the
    timers asks every rank to write last.pt at every step once the first interval has passed."""
    from skipnet import create_model
    from skipnet.losses import Baseline
    from skipnet.runstate import RunState

    cfg = SimpleNamespace(out=str(tmp_path / "run"), stage="sp")
    setup = SimpleNamespace(cfg=cfg, dist=_Rank1(), model=create_model("tiny_rnn_gate_14"))
    state = RunState(setup, Baseline("none"), None)
    state.last_saved = time.monotonic() - 3600.0
    state.save({})
    assert time.monotonic() - state.last_saved < 60.0
    assert not (tmp_path / "run").exists()  # rank 1 writes nothing


# --------------------------------------------------------------------------------------------- C, D
HRL = [*TINY, "--stage", "hrl", "--batch-size", "16", "--lr", "0.01", "--schedule", "constant", "--alpha", "2"]
HRL += ["--limit-train", "320", "--limit-test", "64", "--eval-every", "3", "--device", "cpu"]


def test_torchrun_resume_of_a_sampling_stage_is_exact_and_only_under_the_same_world(tmp_path, capsys) -> None:
    """HRL under 2 processes, stopped at step 6 and resumed to 9, ends bit-identical to one that never stopped: each
    rank's sampling stream is saved and put back (rank 0's went to every rank, then all were re-seeded). The same
    checkpoint resumed by one process is refused in one line: each rank's shard of the epoch, its augmentation and
    sampling streams and the steps per epoch depend on the number of processes, so no resume under another number
    (mid-epoch or at an epoch boundary) would continue the run exactly."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    torchrun(["-m", "skipnet", "train", *HRL, "--iters", "9", "--out", str(straight)], tmp_path)
    torchrun(["-m", "skipnet", "train", *HRL, "--iters", "6", "--out", str(run)], tmp_path)
    torchrun(["-m", "skipnet", "train", *HRL, "--iters", "9", "--out", str(run), "--resume"], tmp_path)
    assert not differing_tensors(straight / "last.pt", run / "last.pt")
    assert rows(straight) == rows(run)

    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *HRL, "--iters", "12", "--out", str(run), "--resume"]) == 2
    line = one_line_error(capsys, "train")
    assert "2 process(es) and this run has 1" in line and "--nproc_per_node 2" in line, line
    assert (run / "last.pt").read_bytes() == before


# --------------------------------------------------------------------------------------------- E
def test_sdv_run_reports_the_test_accuracy_eval_reproduces(tmp_path, capsys) -> None:
    """An SDV run with --seed 3 reports the test figures of ``skipnet eval`` (seed 0 for its random decisions)."""
    base = train_tiny_sp(tmp_path / "base", stage="base", iters=4, batch_size=32, limit_train=320)
    run = tmp_path / "sdv"
    args = ["train", *TINY, "--stage", "sdv", "--init", str(base / "best.pt"), "--seed", "3", "--iters", "4"]
    assert main([*args, "--batch-size", "32", "--limit-train", "320", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run / "best.pt"), "--data", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "random"
    assert (summary["test"]["accuracy"], summary["test"]["macs_mean"]) == (result["accuracy"], result["macs_mean"])


# --------------------------------------------------------------------------------------------- F
def test_resume_refuses_a_distill_teacher_with_other_contents(tmp_path, monkeypatch, capsys) -> None:
    teacher, other = tmp_path / "T.pt", tmp_path / "other.pt"
    shutil.copy(train_tiny_sp(tmp_path / "t1", stage="base", iters=3, batch_size=32) / "best.pt", teacher)
    shutil.copy(train_tiny_sp(tmp_path / "t2", stage="base", iters=4, batch_size=32) / "best.pt", other)
    run = tmp_path / "run"
    stop_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train_tiny_sp(run, iters=6, eval_every=100, distill=str(teacher), **SP)
    monkeypatch.undo()
    original = teacher.read_bytes()
    teacher.write_bytes(other.read_bytes())  # another compatible checkpoint under the same name
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY, "--stage", "sp", "--out", str(run), "--resume"]) == 2
    line = one_line_error(capsys, "train")
    assert "--distill teacher" in line and "other contents" in line, line
    assert (run / "last.pt").read_bytes() == before
    (tmp_path / "moved").mkdir()
    teacher.rename(tmp_path / "moved" / "T.pt")  # moved: the resume names the new path
    (tmp_path / "moved" / "T.pt").write_bytes(original)  # the original contents at the new path: the run continues
    assert main(["train", *TINY, "--stage", "sp", "--out", str(run), "--resume"]) == 2  # the old path is gone
    assert "--distill " in one_line_error(capsys, "train")
    moved = ["--distill", str(tmp_path / "moved" / "T.pt")]
    assert main(["train", *TINY, "--stage", "sp", "--out", str(run), "--resume", *moved]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


# --------------------------------------------------------------------------------------------- G
@pytest.mark.parametrize(
    ("argv0", "program"),
    [("/env/lib/python3/site-packages/skipnet/__main__.py", "skipnet"), ("/env/bin/skipnet", "skipnet")],
)
def test_config_records_a_command_line_that_runs(monkeypatch, argv0, program) -> None:
    """``python -m skipnet`` and ``torchrun -m skipnet`` run skipnet/__main__.py: recorded as ``skipnet``."""
    from skipnet.runlog import environment

    monkeypatch.setattr(sys, "argv", [argv0, "train", "tiny_rnn_gate_14", "--out", "a b"])
    assert environment()["command_line"] == f"{program} train tiny_rnn_gate_14 --out 'a b'"


def test_an_older_checkpoint_resumed_under_torchrun_is_said_not_exact(caplog) -> None:
    """A checkpoint without per-rank random states (written before they were saved) resumed by several processes:
    one warning from rank 0 that the run is not bit-identical; one process, or saved states, say nothing."""
    import logging

    from skipnet.runstate import RunState

    def resumed(world: int, rank: int, ckpt: dict) -> list[str]:
        caplog.clear()
        fake = SimpleNamespace(setup=SimpleNamespace(dist=SimpleNamespace(world=world, rank=rank)))
        with caplog.at_level(logging.WARNING, logger="skipnet.runstate"):
            RunState.restore_rank_rng(fake, ckpt)
        return [r.getMessage() for r in caplog.records]

    assert "not bit-identical" in " ".join(resumed(2, 0, {}))
    assert resumed(2, 1, {}) == [] and resumed(1, 0, {}) == []
    state = {"torch": torch.get_rng_state()}  # as saved (checkpoint.get_rng_state), the same stream put back
    assert resumed(2, 0, {"rng_ranks": [state, state]}) == []
