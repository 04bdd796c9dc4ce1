"""``--resume`` with a new command line (issue 33): the options that may change (the data's path, log and checkpoint
frequency, threads, a new length) are applied, the others refused in one line naming them, none ignored; and a run
stopped during its first checkpoint (``best.pt`` written, ``last.pt`` not yet) resumes exactly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import skipnet.fileio as fileio
from conftest import TINY_HRL
from skipnet.checkpoint import load_checkpoint
from skipnet.cli import main

FOLDER_ARGS = ["tiny_resnet_14", "--stage", "base", "--batch-size", "8", "--threads", "1", "--eval-every", "2"]


def make_folder(root: Path, classes: list[str], per_class: int = 8, seed: int = 0) -> Path:
    """A tiny ImageFolder of 8x8 grayscale PNGs: ``per_class`` training and 2 test images per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / c / f"{i}.png")
    return root


def train(out: Path, data: Path | str, *extra: str) -> int:
    return main(["train", *FOLDER_ARGS, "--data", str(data), "--out", str(out), *extra])


def one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err and err[-1].startswith("skipnet train: error: "), err
    assert not any("Traceback" in ln for ln in err), err
    return err[-1]


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.fixture
def folder_run(tmp_path) -> tuple[Path, Path]:
    data = make_folder(tmp_path / "digits_a", ["a", "b", "c"])
    out = tmp_path / "run"
    assert train(out, data, "--iters", "2") == 0
    return out, data


# ------------------------------------------------------------------------------------------ options that may change
def test_moved_data_and_new_frequencies_are_applied(folder_run, tmp_path) -> None:
    """The data moved: --resume --data NEWPATH continues there (it used to fail on the old path), and a new
    --log-every / --checkpoint-minutes are what the resumed run uses and records."""
    out, data = folder_run
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    assert train(out, moved, "--iters", "4", "--log-every", "1", "--checkpoint-minutes", "7", "--resume") == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["data"], config["log_every"], config["checkpoint_minutes"]) == (str(moved), 1, 7.0)
    assert load_checkpoint(out / "last.pt")["train_config"]["data"] == str(moved)
    steps = [ln.split(",")[0] for ln in (out / "steps.csv").read_text().splitlines()[1:]]
    assert steps[-2:] == ["3", "4"]  # every step logged after the resume (the first run logged every 50)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_another_data_set_is_refused(folder_run, tmp_path, capsys) -> None:
    """Another data set under --data is refused naming what differs (it used to continue silently on the old one):
    other classes, or the same classes with other images (the recorded split sizes and labels)."""
    out, _ = folder_run
    before = files(out)
    other_classes = make_folder(tmp_path / "other", ["x", "y", "z"])
    more_images = make_folder(tmp_path / "more", ["a", "b", "c"], per_class=9)
    capsys.readouterr()
    for data, needle in (
        (other_classes, "classes ['x', 'y', 'z'], recorded ['a', 'b', 'c']"),
        (more_images, "train images"),
    ):
        assert train(out, data, "--iters", "4", "--resume") == 2
        line = one_line_error(capsys)
        assert f"--data {data} is not the data the run in {out} trained on" in line and needle in line, line
    assert files(out) == before


def test_options_that_change_the_run_are_refused_even_at_their_default(tmp_path, capsys) -> None:
    """An option given on the command line is compared with the run's even when it is the default value (--momentum
    0.9 on a --momentum 0.8 run used to be ignored); the error names the option."""
    out = tmp_path / "run"
    argv = ["train", *FOLDER_ARGS, "--data", "digits", "--limit-train", "64", "--limit-test", "16", "--out", str(out)]
    assert main([*argv, "--iters", "2", "--momentum", "0.8"]) == 0
    before = files(out)
    capsys.readouterr()
    for extra, needle in (
        (["--momentum", "0.9"], "has momentum 0.8, not 0.9"),
        (["--seed", "0", "--val-split", "0.2"], "has val-split 0.1, not 0.2"),
    ):
        assert main([*argv, *extra, "--resume"]) == 2
        assert needle in one_line_error(capsys)
    assert files(out) == before


def test_a_length_in_the_other_unit_extends_the_run(folder_run, capsys) -> None:
    """--epochs on an --iters run is the new length (it used to say "already finished"); a length below the step
    reached is refused."""
    out, data = folder_run  # 24 images less a 10% validation split, batch 8: 2 steps per epoch
    assert train(out, data, "--epochs", "3", "--resume") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert load_checkpoint(out / "last.pt")["train_config"]["iters"] is None
    before = files(out)
    capsys.readouterr()
    assert train(out, data, "--iters", "5", "--resume") == 2
    assert "--iters 5 is 5 steps, but the run in" in one_line_error(capsys)
    assert files(out) == before


# ------------------------------------------------------------------------------------------ the first checkpoint
HRL = [*TINY_HRL, "--baseline", "ema", "--iters", "4", "--eval-every", "2"]


def hrl_args(out: Path, *extra: str) -> list[str]:
    return ["train", *HRL, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run that never stopped, and its file operations in order."""
    out = tmp_path_factory.mktemp("first") / "straight"
    seen: list[str] = []
    mp = pytest.MonkeyPatch()
    mp.setattr(fileio, "fault_hook", lambda k, what: seen.append(what))
    assert main(hrl_args(out)) == 0
    mp.undo()
    return out, seen


def first_round_window(ops: list[str]) -> list[int]:
    """The operations (1-based) after which best.pt of the first round exists and its last.pt does not yet."""
    best, last = ops.index("rename best.pt") + 1, ops.index("rename last.pt") + 1
    return list(range(best, last))


def same_run(a: Path, b: Path) -> None:
    for name in ("last.pt", "best.pt"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        assert ca["step"] == cb["step"]
        assert all(torch.equal(v, cb["state_dict"][k]) for k, v in ca["state_dict"].items()), name
    rows = [
        [{k: v for k, v in json.loads(ln).items() if k != "time_s"} for ln in (p / "metrics.jsonl").open()]
        for p in (a, b)
    ]
    assert rows[0] == rows[1]
    assert json.loads((a / "summary.json").read_text())["test"] == json.loads((b / "summary.json").read_text())["test"]


def test_a_kill_between_best_and_last_of_the_first_checkpoint_resumes_exactly(straight, tmp_path, caplog) -> None:
    """SIGKILL after each operation between best.pt's rename and last.pt's in the first round (the run used to be
    refused for ever: "holds a best.pt but no last.pt"); --resume continues from best.pt, the same state."""
    ref, ops = straight
    window = first_round_window(ops)
    assert len(window) == 5  # fsync of the directory; last.pt's temp, write, fsync, rename... up to its rename
    for k in window:
        out = tmp_path / f"k{k}"
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.environ["SKIPNET_FAULT_AFTER"] = str(k)
                fileio._file_ops = 0
                code = main(hrl_args(out))
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert (out / "best.pt").exists() and not (out / "last.pt").exists()
        caplog.clear()
        assert main([*hrl_args(out), "--resume"]) == 0, f"resume after a kill at {k} ({ops[k - 1]})"
        assert any("continuing from best.pt (step 2)" in r.getMessage() for r in caplog.records)
        same_run(ref, out)


def test_a_full_disk_writing_the_first_last_pt_names_it_and_resumes(straight, tmp_path, monkeypatch, capsys) -> None:
    """The disk fills while the first last.pt is written (best.pt is there): the line names last.pt without
    claiming that nothing was written, and --resume then ends as the run that never failed."""
    ref, ops = straight
    k = ops.index("write last.pt") + 1

    def full(count: int, what: str) -> None:
        if count == k:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_file_ops", 0)
    monkeypatch.setattr(fileio, "fault_hook", full)
    out = tmp_path / "full"
    assert main(hrl_args(out)) == 2
    line = one_line_error(capsys)
    assert line == (
        f"skipnet train: error: no space left on device writing {out / 'last.pt'}; last.pt was not created "
        "(free some space and retry)"
    )
    monkeypatch.setattr(fileio, "fault_hook", lambda count, what: None)
    assert main([*hrl_args(out), "--resume"]) == 0
    same_run(ref, out)
