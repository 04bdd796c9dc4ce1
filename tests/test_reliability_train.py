"""Training runs survive faults: SIGKILL + --resume is exact, SIGINT/SIGTERM stop with a resumable checkpoint,
a non-finite loss stops the run before it spoils the weights, and a fixed seed gives identical runs."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import patience
from skipnet.checkpoint import load_checkpoint
from skipnet.cli import main
from skipnet.stages import STAGES, Stage

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "tiny_rnn_gate_14",
    "--data",
    "digits",
    "--batch-size",
    "32",
    "--threads",
    "1",
    "--val-split",
    "0.2",
    "--lr",
    "0.01",
    "--schedule",
    "constant",
    "--log-every",
    "1",
]


def train_args(out: Path, stage: str = "hrl", *extra: str) -> list[str]:
    return ["train", *ARGS, "--stage", stage, "--out", str(out), *extra]


def spawn(args: list[str]) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "skipnet", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field, which is the one thing allowed to differ."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def assert_same_state(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"]
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k  # bit-identical on the CPU
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert ca["scheduler"] == cb["scheduler"]
    assert ca["baseline"].keys() == cb["baseline"].keys()
    for k, v in ca["baseline"].items():
        w = cb["baseline"][k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, k


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + patience(timeout)
    while not pred():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() > end:
            pytest.fail("timed out waiting for the training run")
        time.sleep(0.02)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path) -> None:
    """HRL (gate sampling, EMA baseline, shuffling, augmentation, momentum): a run killed with SIGKILL at an
    arbitrary step and resumed ends with the same weights, optimizer state and metrics as one that never stopped."""
    extra = ("--iters", "240", "--eval-every", "8", "--baseline", "ema")
    assert main(train_args(tmp_path / "straight", "hrl", *extra)) == 0

    killed = tmp_path / "killed"
    proc = spawn(train_args(killed, "hrl", *extra))
    metrics = killed / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 120, proc)
    time.sleep(random.Random(0).uniform(0.0, 0.2))  # somewhere between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint(killed / "last.pt")["step"]
    assert 0 < stopped_at < 240, "the kill should land mid-run"

    assert main([*train_args(killed, "hrl", *extra), "--resume"]) == 0
    assert_same_state(tmp_path / "straight" / "last.pt", killed / "last.pt")
    assert metric_rows(tmp_path / "straight") == metric_rows(killed)
    summary = [json.loads((p / "summary.json").read_text()) for p in (tmp_path / "straight", killed)]
    assert summary[0]["test"] == summary[1]["test"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_resumable_checkpoint_and_exits_cleanly(tmp_path, sig) -> None:
    run = tmp_path / "run"
    extra = ("--eval-every", "100000", "--baseline", "ema")
    proc = spawn([*train_args(run, "hrl", *extra), "--iters", "100000"])
    seen: list[str] = []

    def progressed() -> bool:
        line = proc.stderr.readline()
        seen.append(line)
        return " step 5/" in line

    wait_for(progressed, 120, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=patience(60))
    err_lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    assert err_lines[-1].startswith("skipnet train: ") and "--resume" in err_lines[-1], err_lines[-1]
    ckpt = load_checkpoint(run / "last.pt")
    k = ckpt["step"]
    assert 5 <= k < 100000 and ckpt["running"]["n"] == k  # mid-interval: the running statistics are kept

    # Resuming (extended to k + 6 steps) gives exactly a run that was never interrupted.
    total = str(k + 6)
    assert main([*train_args(run, "hrl", *extra), "--iters", total, "--resume"]) == 0
    assert main([*train_args(tmp_path / "straight", "hrl", *extra), "--iters", total]) == 0
    assert_same_state(tmp_path / "straight" / "last.pt", run / "last.pt")
    assert metric_rows(tmp_path / "straight") == metric_rows(run)


class _NanAt(Stage):
    """The SP stage, whose loss turns NaN (or inf) at one step."""

    def loss(self, ce, trace, **kw):
        loss, stats = super().loss(ce, trace, **kw)
        type(self).calls += 1
        if type(self).calls == type(self).bad_step:
            loss = loss * type(self).value
        return loss, stats


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys, value) -> None:
    sp = STAGES["sp"]
    bad = type("Bad", (_NanAt,), {"calls": 0, "bad_step": 7, "value": value})
    monkeypatch.setitem(STAGES, "sp", bad(**{f: getattr(sp, f) for f in sp.__dataclass_fields__}))
    run = tmp_path / "run"
    assert main(train_args(run, "sp", "--iters", "20", "--eval-every", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 7" in err[0] and ("nan" in err[0] or "inf" in err[0]), err
    assert "last good checkpoint" in err[0] and "step 6" in err[0]
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (run / "summary.json").exists()


class _NanGradientAt(_NanAt):
    """The SP stage whose loss stays finite at one step while its gradient is not (``sqrt`` at 0 times 0: what a
    skipped block that overflowed gives masked training, 0 x inf)."""

    def loss(self, ce, trace, **kw):
        loss, stats = super().loss(ce, trace, **kw)
        if type(self).calls == type(self).bad_step:
            loss = loss + (trace.probs.sum() * 0.0).sqrt()
        return loss, stats


def test_a_non_finite_gradient_under_a_finite_loss_stops_before_the_update(tmp_path, monkeypatch, capsys) -> None:
    sp = STAGES["sp"]
    bad = type("Bad", (_NanGradientAt,), {"calls": 0, "bad_step": 7, "value": 1.0})
    monkeypatch.setitem(STAGES, "sp", bad(**{f: getattr(sp, f) for f in sp.__dataclass_fields__}))
    run = tmp_path / "run"
    assert main(train_args(run, "sp", "--iters", "20", "--eval-every", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gradient became non-finite at step 7" in err[0], err
    assert "last good checkpoint" in err[0] and "step 6" in err[0]
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("alpha", ["0", "100"])
def test_hrl_extreme_alpha_stays_finite(tmp_path, alpha) -> None:
    run = tmp_path / f"a{alpha}"
    assert main(train_args(run, "hrl", "--iters", "30", "--eval-every", "10", "--alpha", alpha, "--lr", "0.1")) == 0
    rows = metric_rows(run)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_accuracy"]) for r in rows)
    ckpt = load_checkpoint(run / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["test"]["accuracy"]) and math.isfinite(summary["test"]["macs_mean"])


def test_same_seed_same_run_and_other_seed_differs(tmp_path) -> None:
    extra = ("--iters", "12", "--eval-every", "4")
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main([*train_args(tmp_path / name, "hrl", *extra), "--seed", seed]) == 0
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")
    assert_same_state(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert metric_rows(tmp_path / "a") != metric_rows(tmp_path / "c")


def test_resume_forgets_metric_rows_written_after_the_checkpoint(tmp_path) -> None:
    """A run killed between appending a metrics row and writing last.pt leaves a row the checkpoint never saw."""
    run = tmp_path / "run"
    extra = ("--eval-every", "4")
    assert main([*train_args(run, "hrl", *extra), "--iters", "8"]) == 0
    rows = metric_rows(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 12, "train_loss": 1.0}) + "\n")  # as if killed before last.pt at step 12
    assert main([*train_args(run, "hrl", *extra), "--iters", "12", "--resume"]) == 0
    after = metric_rows(run)
    assert after[: len(rows)] == rows and [r["step"] for r in after] == [4, 8, 12]
    assert "val_accuracy" in after[-1]


@pytest.mark.parametrize("channels_last", [True, False])
def test_no_channels_last_reaches_the_network(tmp_path, monkeypatch, channels_last) -> None:
    """``--no-channels-last`` trains and evaluates on NCHW batches (the loaders yield channels_last, and a
    convolution given a channels_last input runs channels_last whatever its weights: the option was ignored)."""
    import torch

    from skipnet.cli import main

    seen: set[bool] = set()
    real = torch.nn.Conv2d._conv_forward

    def record(self, x, weight, bias):
        if min(x.shape[0], x.shape[1], x.shape[-1]) > 1:  # batches (not the cost model's probe), told apart
            seen.add(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return real(self, x, weight, bias)

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", record)
    argv = ["train", "cifar10_resnet_20", "--stage", "base", "--data", "digits", "--iters", "2", "--eval-every", "1"]
    argv += ["--batch-size", "16", "--limit-test", "32", "--val-split", "0.1", "--threads", "1"]
    argv += ["--out", str(tmp_path / "run"), *([] if channels_last else ["--no-channels-last"])]
    assert main(argv) == 0
    assert seen == {channels_last}
