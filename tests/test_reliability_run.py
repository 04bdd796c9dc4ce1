"""A run directory under abuse: two writers at once, a job re-queued with --resume before its first checkpoint,
wall-clock checkpoints, a diverging run, file permissions."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import skipnet.fileio as fileio
from conftest import TINY_HRL
from skipnet.checkpoint import load_checkpoint
from skipnet.cli import main
from skipnet.fileio import atomic_save
from skipnet.rundir import run_lock
from skipnet.train import Trainer

ARGS = TINY_HRL


def run_args(out: Path, *extra: str) -> list[str]:
    return ["train", *ARGS, "--out", str(out), *extra]


def one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("skipnet train: ")]
    assert len(err) == 1, err
    return err[0]


def fork(child) -> int:
    """Run ``child()`` in a forked process that never returns into pytest; its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(0)
    return pid


# ------------------------------------------------------------------------------------------ the lock (defect 3)
def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    ready_r, ready_w = os.pipe()

    def hold() -> None:
        with run_lock(out):
            os.write(ready_w, b"x")
            signal.pause()  # until SIGKILLed

    holder = fork(hold)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert main(run_args(out, "--iters", "2")) == 2
        line = one_line_error(capsys)
        assert line == (
            f"skipnet train: error: {out} is in use by another skipnet run (pid {holder} on {socket.gethostname()}); "
            "wait for it to end or choose another --out"
        )
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written by the refused run
        assert main([*run_args(out, "--iters", "2"), "--resume"]) == 2  # --resume is refused the same way
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    # The holder died by SIGKILL and its lock file stayed: the lock went with it, the next run proceeds.
    assert (out / ".lock").exists()
    assert main(run_args(out, "--iters", "2")) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 2


def test_lock_is_released_when_the_run_fails(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(run_args(out, "--iters", "2", "--init", str(tmp_path / "missing.pt"))) == 2
    got: list[int] = []
    r, w = os.pipe()

    def probe() -> None:
        with run_lock(out):
            os.write(w, b"1")

    pid = fork(probe)
    os.waitpid(pid, 0)
    got.append(os.read(r, 1) == b"1")
    assert got == [True]
    assert not out.exists()  # the refused run left no empty run directory behind


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog) -> None:
    import errno

    import skipnet.rundir as rundir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "lockf", no_locks)
    caplog.set_level("WARNING")
    with run_lock(tmp_path / "run"):
        pass
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot lock {tmp_path / 'run'} (No locks available); make sure that no other run writes there"
    ]


def test_out_under_a_file_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(run_args(tmp_path / "afile" / "sub", "--iters", "1")) == 2
    assert "a parent of it is a file" in one_line_error(capsys)


# ------------------------------------------------------------------------------------------ restarts (defect 9)
def test_resume_refuses_a_command_line_that_changes_the_run(tmp_path, capsys) -> None:
    """--resume continues the saved run: another stage, architecture or changed option is one error line, and the
    run is left as it was (it used to train the new stage's loss under the old stage's name, or ignore --lr)."""
    out = tmp_path / "run"
    assert main(run_args(out, "--iters", "2")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    changed = [
        (["--iters", "4", "--lr", "0.5"], "has lr 0.05, not 0.5"),
        (["--iters", "4", "--batch-size", "32"], "has batch-size 16, not 32"),
        (["--iters", "4", "--stage", "sp"], "has stage 'hrl', not 'sp'"),
    ]
    for extra, needle in changed:
        assert main([*run_args(out, *extra), "--resume"]) == 2
        assert needle in one_line_error(capsys)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before
    assert main([*run_args(out, "--iters", "3", "--threads", "1"), "--resume"]) == 0  # extended: allowed


def test_resume_before_the_first_checkpoint_starts_a_new_run(tmp_path, capsys, caplog) -> None:
    """A job killed before its first checkpoint and re-queued with the same command line (--resume) just runs."""
    straight = tmp_path / "straight"
    assert main(run_args(straight, "--iters", "4", "--eval-every", "2")) == 0
    out = tmp_path / "run"
    out.mkdir()
    dead = {"arch": ARGS[0], "stage": "hrl", "out": str(out)}  # a dead attempt's (its first lines)
    (out / "config.json").write_text(json.dumps(dead))
    (out / "metrics.jsonl").write_text('{"step": 2, "val_accuracy": 99.0}\n{"step": 4, "val_')
    capsys.readouterr()
    assert main(run_args(out, "--iters", "4", "--eval-every", "2")) == 2  # without --resume: refused, untouched
    assert "already holds a run (metrics.jsonl); pass --resume" in one_line_error(capsys)
    caplog.set_level("INFO")
    assert main([*run_args(out, "--iters", "4", "--eval-every", "2"), "--resume"]) == 0
    said = [r.getMessage() for r in caplog.records if "holds no checkpoint" in r.getMessage()]
    assert said == [f"--resume: {out} holds no checkpoint yet; starting a new run"]
    strip = [
        [{k: v for k, v in json.loads(ln).items() if k != "time_s"} for ln in (p / "metrics.jsonl").open()]
        for p in (straight, out)
    ]
    assert strip[0] == strip[1]
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(out / "last.pt")
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


def test_resume_of_a_directory_that_does_not_exist_starts_a_new_run(tmp_path) -> None:
    out = tmp_path / "new"
    assert main([*run_args(out, "--iters", "2"), "--resume"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 2


# ------------------------------------------------------------------------------------------ wall-clock checkpoints
def test_wall_clock_checkpoints_between_evaluations_resume_exactly(tmp_path) -> None:
    """With --checkpoint-minutes tiny, last.pt is written before every step; a kill after the 4th such write
    (step 3, no evaluation yet) resumes to the run that never stopped and never checkpointed mid-interval."""
    extra = ("--iters", "8", "--eval-every", "8", "--baseline", "ema")
    straight = tmp_path / "straight"
    assert main(run_args(straight, *extra)) == 0
    out = tmp_path / "run"

    def child() -> None:
        os.environ["SKIPNET_FAULT_AFTER"] = str(5 + 4 * 5)  # config.json, then four times last.pt (5 operations)
        fileio._file_ops = 0
        main(run_args(out, *extra, "--checkpoint-minutes", "1e-9"))

    _, status = os.waitpid(fork(child), 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 3 and ckpt["running"]["n"] == 3 and not (out / "metrics.jsonl").exists()
    assert main([*run_args(out, *extra), "--resume"]) == 0
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(out / "last.pt")
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert (
        json.loads((straight / "summary.json").read_text())["test"]
        == json.loads((out / "summary.json").read_text())["test"]
    )


def test_checkpoint_minutes_is_checked(tmp_path, capsys) -> None:
    assert main(run_args(tmp_path / "r", "--checkpoint-minutes", "0")) == 2
    assert "--checkpoint-minutes must be positive" in one_line_error(capsys)


# ------------------------------------------------------------------------------------------ divergence (defect 6)
def test_an_exploded_but_finite_loss_stops_the_run(tmp_path, monkeypatch, capsys) -> None:
    """A cross-entropy far above a uniform guess's (finite: 6e8 was seen in a diverged HRL run) for ten steps in a
    row stops the run in one line naming the kept checkpoint; one such step alone does not."""
    real = Trainer.train_step

    def exploding(self, x, y):
        stats = real(self, x, y)
        if self.step == 1 or self.step >= 3:  # the 2nd update alone, then from the 4th on
            stats["ce"] = 6e8
        return stats

    monkeypatch.setattr(Trainer, "train_step", exploding)
    out = tmp_path / "run"
    assert main(run_args(out, "--iters", "30", "--eval-every", "4")) == 2
    line = one_line_error(capsys)
    assert "cross-entropy stayed above" in line and "for 10 steps, to step 13" in line, line
    assert f"{out / 'last.pt'} (step 12) is kept" in line, line
    assert load_checkpoint(out / "last.pt")["step"] == 12


def test_non_finite_state_is_never_checkpointed(tmp_path, monkeypatch, capsys) -> None:
    """BatchNorm statistics gone infinite at step 5 (loss still finite): the round at step 6 refuses to write,
    the step-4 checkpoints stay, and --resume (diverging again) says so in one line too."""
    real = Trainer.train_step

    def diverging(self, x, y):
        stats = real(self, x, y)
        if self.step == 4:  # the 5th update
            bn = next(m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d))
            bn.running_var.fill_(math.inf)
        return stats

    monkeypatch.setattr(Trainer, "train_step", diverging)
    out = tmp_path / "run"
    extra = ("--iters", "10", "--eval-every", "2")
    assert main(run_args(out, *extra)) == 2
    line = one_line_error(capsys)
    assert "became non-finite by step 6" in line and f"{out / 'last.pt'} (step 4) is kept" in line, line
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(out / name)
        assert ckpt["step"] <= 4
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert main([*run_args(out, *extra), "--resume"]) == 2
    assert "became non-finite by step 6" in one_line_error(capsys)


def test_resume_from_a_non_finite_checkpoint_is_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(run_args(out, "--iters", "2")) == 0
    ckpt = load_checkpoint(out / "last.pt")
    key = next(k for k in ckpt["state_dict"] if k.endswith("running_var"))
    ckpt["state_dict"][key].fill_(math.nan)
    atomic_save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert main([*run_args(out, "--iters", "4"), "--resume"]) == 2
    assert "holds non-finite weights or statistics" in one_line_error(capsys)


# ------------------------------------------------------------------------------------------ permissions (defect 10)
def test_files_get_ordinary_permissions_also_after_resume(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(run_args(out, "--iters", "4", "--eval-every", "2")) == 0
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 6, "x"')  # a torn row: resume rewrites the file
        assert main([*run_args(out, "--iters", "6", "--eval-every", "2"), "--resume"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644), modes


@pytest.mark.parametrize("device", ["cpu:7", "cpu:1"])
def test_cpu_with_an_index_is_refused(tmp_path, capsys, device) -> None:
    assert main(run_args(tmp_path / "r", "--iters", "1", "--device", device)) == 2
    assert "--device" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ the CLI's edges (defect 8)
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--epochs", "inf"], "--epochs must be finite, got inf"),
        (["--lr", "inf"], "--lr must be finite, got inf"),
        (["--seed", str(10**20)], "--seed must be in [0, 2**32)"),
    ],
)
def test_infinite_and_huge_options_are_one_line(tmp_path, capsys, extra, needle) -> None:
    assert main(run_args(tmp_path / "r", *extra)) == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_hrl_with_a_huge_alpha_is_one_line(tmp_path, capsys) -> None:
    assert main(run_args(tmp_path / "r", "--iters", "4", "--alpha", "1e30", "--lr", "0.1")) == 2
    line = one_line_error(capsys)
    assert "non-finite" in line and "Lower --lr (or --alpha" in line, line


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys) -> None:
    import skipnet.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err == "skipnet: interrupted\n"


def test_importing_the_cli_does_not_import_torch() -> None:
    """So that a Ctrl-C while torch loads reaches main(), which turns it into one line."""
    import subprocess
    import sys

    code = "import sys, skipnet.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_output_into_a_closed_pipe_is_quiet(tmp_path, monkeypatch) -> None:
    import io
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return sink.fileno()

    sink = open(tmp_path / "sink", "w")  # noqa: SIM115 - stands for the pipe's file descriptor
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert main(["models"]) == 128 + signal.SIGPIPE
    finally:
        sink.close()


# ------------------------------------------------------------------------------------------ others' files (issue 33)
USER_FILES = {
    "config.json": '{"learning_rate": 0.1}\n',
    "steps.csv": "epoch,loss\n1,0.5\n",
    "metrics.jsonl": "my notes\n",
    "summary.json": "[]",
    "best.pt": "not a checkpoint",
}


@pytest.mark.parametrize("name", list(USER_FILES))
def test_a_new_run_never_overwrites_a_users_file(tmp_path, capsys, name) -> None:
    """Issue 33: a directory holding only the user's config.json / steps.csv was taken over by a new run."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text(USER_FILES[name])
    (out / "notes.txt").write_text("other files are left alone and do not stop a run")
    for extra in ([], ["--resume"]):
        assert main(run_args(out, "--iters", "2", *extra)) == 2
        assert f"holds {name} that skipnet did not write" in one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "notes.txt"])  # not even a lock file
    assert (out / name).read_text() == USER_FILES[name]


def test_a_directory_with_other_files_and_a_finished_run_still_work(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(run_args(out, "--iters", "2")) == 0
    assert main([*run_args(out, "--iters", "4"), "--resume"]) == 0  # its own files are skipnet's
    assert load_checkpoint(out / "last.pt")["step"] == 4 and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_linked_lock_file_is_refused_and_its_target_kept(tmp_path, capsys, link) -> None:
    """Issue 33: a symbolic link OUT/.lock to a user's file truncated it (the lock wrote its holder there)."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(target) if link == "symlink" else os.link(target, out / ".lock")
    assert main(run_args(out, "--iters", "2")) == 2
    assert "run lock must be" in one_line_error(capsys)
    assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
