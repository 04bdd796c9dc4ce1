"""Fault injection: a training run killed (SIGKILL) right after each file operation of a checkpoint round, or
hitting a full disk at each write, resumes to exactly the run that never failed: same weights, optimizer,
metric rows, ``best.pt`` and ``summary.json``, and no temporary file left behind.

The kills use the writer's own hook (``SKIPNET_FAULT_AFTER=k`` kills the process after its k-th file operation)
in a forked child, so that each case costs a fraction of a second instead of a fresh interpreter.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import skipnet.fileio as fileio
from conftest import TINY_HRL
from skipnet.checkpoint import load_checkpoint
from skipnet.cli import main

ARGS = [*TINY_HRL, "--baseline", "ema", "--iters", "8", "--eval-every", "4"]


def run_args(out: Path, *extra: str) -> list[str]:
    return ["train", *ARGS, "--out", str(out), *extra]


def file_ops(monkeypatch, out: Path) -> list[str]:
    """The file operations of a whole uninterrupted run, in order (operation k is ``ops[k - 1]``)."""
    seen: list[str] = []
    monkeypatch.setattr(fileio, "fault_hook", lambda k, what: seen.append(what))
    assert main(run_args(out)) == 0
    monkeypatch.undo()
    return seen


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[str]]:
    """The uninterrupted run and the list of its file operations."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    mp = pytest.MonkeyPatch()
    ops = file_ops(mp, out)
    assert load_checkpoint(out / "best.pt")["step"] == 8, "the last round should choose best.pt (else: retune ARGS)"
    return out, ops


def rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "time_s"} for ln in lines]


def same_checkpoint(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"], (a, b)
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert ca["scheduler"] == cb["scheduler"]
    assert ca["metrics"].get("val_accuracy") == cb["metrics"].get("val_accuracy")


def same_run(straight: Path, run: Path) -> None:
    same_checkpoint(straight / "last.pt", run / "last.pt")
    same_checkpoint(straight / "best.pt", run / "best.pt")
    assert rows(straight) == rows(run)
    summary = [json.loads((p / "summary.json").read_text()) for p in (straight, run)]
    assert summary[0]["best_step"] == summary[1]["best_step"]
    assert summary[0]["test"] == summary[1]["test"]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def killed_after(k: int, out: Path) -> None:
    """Run training in a forked child that SIGKILLs itself right after its k-th file operation."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            os.environ["SKIPNET_FAULT_AFTER"] = str(k)
            fileio._file_ops = 0
            code = main(run_args(out))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at operation {k}"


def round_points(ops: list[str]) -> list[int]:
    """Every operation of the last checkpoint round (metrics row, best.pt, last.pt) and of summary.json, plus the
    first operations of the run (config.json, before any checkpoint)."""
    first_of_last_round = max(i for i, what in enumerate(ops) if what.startswith("append to metrics"))
    return [1, 5, *range(first_of_last_round + 1, len(ops) + 1)]


def test_the_round_has_the_expected_operations(reference) -> None:
    _, ops = reference
    last_round = ops[round_points(ops)[2] - 1 :]
    names = [what.split(" ")[0] + " " + what.split(" ")[-1] for what in last_round]
    assert names[:2] == ["append metrics.jsonl", "fsync metrics.jsonl"]
    assert names.index("rename best.pt") < names.index("rename last.pt") < names.index("rename summary.json")


def test_kill_at_every_file_operation_then_resume_is_exact(reference, tmp_path) -> None:
    straight, ops = reference
    points = round_points(ops)
    assert len(points) == 2 + 12 + 5  # config.json; metrics row 2, best.pt 5, last.pt 5; summary.json 5
    for k in points:
        out = tmp_path / f"k{k}"
        killed_after(k, out)
        assert main([*run_args(out), "--resume"]) == 0, f"resume after a kill at {k} ({ops[k - 1]})"
        same_run(straight, out)


@pytest.mark.parametrize("kind", ["write", "fsync", "append"])
def test_disk_full_at_each_write_then_resume_is_exact(reference, tmp_path, monkeypatch, capsys, kind) -> None:
    """A full disk at each write of the last round is one line naming the file; --resume then ends exact."""
    straight, ops = reference
    first = round_points(ops)[2]
    targets = [k for k in range(first, len(ops) + 1) if ops[k - 1].startswith(kind) and "directory" not in ops[k - 1]]
    assert targets
    for k in targets:
        out = tmp_path / f"{kind}{k}"

        def full(count: int, what: str, k=k) -> None:
            if count == k:
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(fileio, "_file_ops", 0)
        monkeypatch.setattr(fileio, "fault_hook", full)
        capsys.readouterr()
        assert main(run_args(out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        name = ops[k - 1].split(" ")[-1]
        assert err[-1].startswith("skipnet train: error: no space left on device writing") and name in err[-1]
        monkeypatch.setattr(fileio, "fault_hook", lambda count, what: None)
        assert main([*run_args(out), "--resume"]) == 0
        same_run(straight, out)


def test_torn_metrics_row_is_dropped_on_resume(reference, tmp_path) -> None:
    """A writer killed in the middle of a metrics row leaves half a JSON line; --resume drops it and ends exact."""
    straight, ops = reference
    out = tmp_path / "torn"
    killed_after(round_points(ops)[2] - 1, out)  # the first round complete, the second not begun
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "epoch": 0.8, "lr": 0.0')
    assert main([*run_args(out), "--resume"]) == 0
    same_run(straight, out)


def test_disk_full_mid_row_leaves_no_torn_row(tmp_path, monkeypatch, capsys) -> None:
    """os.write filling the disk halfway through a row: the file is cut back to its previous end at once."""
    import skipnet.rundir as rundir

    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if data.startswith(b'{"step"'):
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(rundir.os, "write", half_then_full)
    out = tmp_path / "run"
    assert main(run_args(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"skipnet train: error: no space left on device writing {out / 'metrics.jsonl'}; the row of this "
        "evaluation was not kept (free some space and continue with --resume)"
    )
    assert (out / "metrics.jsonl").read_bytes() == b""
