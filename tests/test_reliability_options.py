"""Option bounds (issue 33, "known open items"): every option that sizes work or names an output is checked
before anything is loaded or written: one line, exit 2, nothing written, never a traceback or a long run."""

from __future__ import annotations

import os

import pytest

from skipnet.cli import main

CKPT = "missing.pt"  # the options are checked before the checkpoint is read
CAL = ["calibrate", CKPT, "--data", "digits"]
ANALYZE = ["analyze", CKPT, "--data", "digits"]

CASES = [
    (["flops", "tiny_rnn_gate_14", "--image-size", "100000"], "--image-size must be in [1, 1024]"),
    (["quickstart", "--epochs", "inf", "--out", "{tmp}/q"], "--epochs must be in (0, 100]"),
    (["quickstart", "--epochs", "nan", "--out", "{tmp}/q"], "--epochs must be in (0, 100]"),
    (["quickstart", "--alpha", "inf", "--out", "{tmp}/q"], "--alpha must be finite"),
    (["quickstart", "--threads", "100000", "--out", "{tmp}/q"], "--threads must be in [1, 256]"),
    (["quickstart", "--seed", "-1", "--out", "{tmp}/q"], "--seed must be in [0, 4294967295]"),
    (["quickstart", "--out", ""], "--out is empty"),
    ([*ANALYZE, "--out", "{tmp}/a", "--scales", "nan"], "--scales must be in (0, 4]"),
    ([*ANALYZE, "--out", "{tmp}/a", "--scales", "1000"], "--scales must be in (0, 4]"),
    ([*ANALYZE, "--out", "{tmp}/a", "--images", "100000"], "--images must be in [1, 64]"),
    ([*ANALYZE, "--out", "{tmp}/a", "--thresholds", "nan"], "--thresholds must be in [0, 1]"),
    ([*ANALYZE, "--out", ""], "--out is empty"),
    ([*ANALYZE, "--out", " "], "--out is empty"),
    (["export", CKPT, "{tmp}/x.onnx", "--probes", "100000"], "--probes must be in [1, 64]"),
    (["export", CKPT, ""], "OUT is empty"),
    (["export", "{tmp}/../given.onnx", "{tmp}/x.onnx"], "is an export already"),
    (["export", CKPT, "/proc/x.onnx"], "OUT /proc/x.onnx: cannot write in /proc"),
    ([*CAL, "--target-macs", "inf", "--out", "{tmp}/c.pt"], "--target-macs must be finite"),
    ([*CAL, "--target-macs", "nan", "--out", "{tmp}/c.pt"], "--target-macs must be positive"),
    ([*CAL, "--target-reduction", "nan", "--out", "{tmp}/c.pt"], "--target-reduction must be a percentage"),
    ([*CAL, "--target-reduction", "10", "--margin", "nan", "--out", "{tmp}/c.pt"], "--margin must be in [0, 100)"),
    ([*CAL, "--target-reduction", "10", "--margin", "inf", "--out", "{tmp}/c.pt"], "--margin must be in [0, 100)"),
    ([*CAL, "--target-reduction", "10", "--refine", "100000", "--out", "{tmp}/c.pt"], "--refine must be in [0, 20]"),
    ([*CAL, "--target-reduction", "10", "--out", "{tmp}/c.onnx"], "must end in .pt (a checkpoint) or .safetensors"),
    ([*CAL, "--target-reduction", "10", "--out", "{tmp}/c"], "must end in .pt (a checkpoint) or .safetensors"),
    ([*CAL, "--target-reduction", "10", "--out", ""], "--out is empty"),
]


@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[f"{a[0]}: {n}" for a, n in CASES])
def test_an_option_out_of_bounds_is_one_line(tmp_path, capsys, monkeypatch, argv, needle) -> None:
    monkeypatch.chdir(tmp_path)  # an empty --out must not write into the current directory
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"skipnet {argv[0]}: error: "), err
    assert needle in err[0]
    assert not os.listdir(tmp_path)  # nothing written
