"""``skipnet analyze`` writes its output directory whole or not at all (issue 33: on a full disk it replaced an
existing figure with a truncated PNG, and the message named no path; an interrupted run left a partial
directory)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

import skipnet.commands.analyze as analyze_cmd
from skipnet import plots
from skipnet.checkpoint import make_checkpoint
from skipnet.cli import main
from skipnet.registry import create_model

WRITES = [
    "plot_tradeoff",
    "plot_skip_ratio_per_block",
    "plot_easy_hard",
    "plot_per_class",
    "plot_multiscale",
    "plot_executed_hist",
    "analysis.json",
    "report.md",
]
FAST = ["--thresholds", "0.3", "0.6", "--scales", "1", "--images", "2", "--limit", "60"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A greedy SkipNet for the 1-channel 8-px digits, gates spread so that they decide per image."""
    torch.manual_seed(0)
    model = create_model("tiny_rnn_gate_14", num_classes=10, in_channels=1, image_size=8).eval()
    with torch.no_grad():
        for p in model.gates.parameters():
            p.normal_(0, 0.5)
    classes = [str(i) for i in range(10)]
    path = tmp_path_factory.mktemp("an") / "sp.pt"
    torch.save(make_checkpoint(model, data={"mean": [0.3], "std": [0.37], "classes": classes}), path)
    return path


@pytest.fixture(scope="module")
def earlier(ckpt) -> Path:
    """An analysis written by an earlier run."""
    out = ckpt.parent / "earlier"
    assert main(["analyze", str(ckpt), "--data", "digits", "--out", str(out), *FAST]) == 0
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.exists() else {}


def siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p.name != directory.name and p.suffix != ".pt")


def _full_disk_at(monkeypatch, point: str) -> None:
    """The write ``point`` fails as a full disk does, after a few bytes of its file are on disk."""

    def fail(path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    if point.startswith("plot_"):
        monkeypatch.setattr(plots, point, fail)
    else:
        real = analyze_cmd.write_text
        monkeypatch.setattr(analyze_cmd, "write_text", lambda p, t: fail(p) if p.name == point else real(p, t))


@pytest.mark.parametrize("point", WRITES)
def test_a_full_disk_keeps_the_earlier_analysis_and_names_the_path(
    ckpt, earlier, tmp_path, capsys, monkeypatch, point
) -> None:
    out = tmp_path / "an"
    shutil.copytree(earlier, out)
    before = snapshot(out)
    assert set(before) == set(analyze_cmd.OWNED)
    capsys.readouterr()
    _full_disk_at(monkeypatch, point)
    assert main(["analyze", str(ckpt), "--data", "digits", "--out", str(out), *FAST, "--thresholds", "0.4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device writing" in err[0] and str(out) in err[0], err
    assert snapshot(out) == before  # every file as it was: no truncated figure
    assert siblings(out) == []  # no staging directory left behind


def test_a_failure_of_the_first_analysis_leaves_no_directory(ckpt, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "an"
    _full_disk_at(monkeypatch, "plot_multiscale")
    assert main(["analyze", str(ckpt), "--data", "digits", "--out", str(out), *FAST]) == 2
    assert not out.exists() and siblings(out) == []


def test_an_interrupted_analysis_leaves_nothing(ckpt, tmp_path, monkeypatch) -> None:
    out = tmp_path / "an"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_per_class", interrupt)
    assert main(["analyze", str(ckpt), "--data", "digits", "--out", str(out), *FAST]) == 130
    assert not out.exists() and siblings(out) == []


def test_a_new_analysis_replaces_the_directory_whole_and_never_others_files(ckpt, earlier, tmp_path, capsys) -> None:
    out = tmp_path / "an"
    shutil.copytree(earlier, out)
    argv = ["analyze", str(ckpt), "--data", "digits", "--out", str(out), *FAST]
    assert main([*argv, "--thresholds", "0.2", "0.5", "0.8"]) == 0
    sweep = json.loads((out / "analysis.json").read_text())["threshold_sweep"]
    assert [p["threshold"] for p in sweep] == [0.2, 0.5, 0.8] and siblings(out) == []
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds files analyze did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
