"""Runs users can watch and repeat (issue 20): steps.csv and TensorBoard event files with per-step scalars, the
progress bar, config.json's record of versions and command, and ``skipnet train --config FILE``."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipnet.checkpoint import load_checkpoint
from skipnet.cli import main
from skipnet.runlog import STEP_FIELDS, Progress, load_config_file

TINY = ["--batch-size", "4", "--threads", "1", "--val-split", "0.2", "--log-every", "2", "--eval-every", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("runlog")
    mp = pytest.MonkeyPatch()
    mp.setenv("SKIPNET_CACHE", str(root / "cache"))
    rng = np.random.RandomState(0)
    for split, n in (("train", 8), ("test", 3)):
        for c in range(3):
            d = root / "data" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(d / f"{i}.png")
    yield str(root / "data")
    mp.undo()


def hrl(data: str, out: Path, *extra: str) -> list[str]:
    return ["train", "tiny_rnn_gate_14", "--stage", "hrl", "--data", data, "--out", str(out), *TINY, *extra]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metric_rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k != "time_s"} for ln in (run / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "x"
    assert main(hrl(data, out, "--iters", "6", "--tensorboard")) == 0
    return out


def test_steps_csv_has_per_step_scalars(run) -> None:
    rows = csv_rows(run / "steps.csv")
    assert list(rows[0]) == list(STEP_FIELDS)
    assert [int(r["step"]) for r in rows] == [2, 4, 6]  # every --log-every steps
    for r in rows:
        values = {k: float(v) for k, v in r.items()}  # every field is a number
        assert 0.0 <= values["exec"] <= 1.0 and 0.0 <= values["acc"] <= 1.0
        assert values["loss"] == pytest.approx(values["ce"] + values["rl"], rel=1e-4, abs=1e-5)  # rl_weight 1
        assert values["reward"] < 0 and values["lr"] > 0
    try:
        import pandas
    except ImportError:
        return
    frame = pandas.read_csv(run / "steps.csv")
    assert list(frame.columns) == list(STEP_FIELDS) and len(frame) == 3


def test_tensorboard_event_files_hold_the_scalars(run) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/ce", "train/rl", "train/reward", "train/exec", "val/accuracy", "val/cp"):
        assert tag in tags, tag
    assert {f"val_skip_ratio/block_{i:02d}" for i in range(1, 6)} <= tags
    rows = csv_rows(run / "steps.csv")
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    val = [json.loads(ln) for ln in (run / "metrics.jsonl").open()]
    assert [e.value for e in events.Scalars("val/accuracy")] == pytest.approx([r["val_accuracy"] for r in val])
    per_block = [e.value for e in events.Scalars("val_skip_ratio/block_03")]  # also in each metrics.jsonl row
    assert per_block == pytest.approx([r["val_skip_ratio_per_block"][2] for r in val], abs=1e-5)
    assert all(len(r["val_skip_ratio_per_block"]) == 5 for r in val)


def test_config_json_records_versions_and_command(run) -> None:
    import skipnet

    env = json.loads((run / "config.json").read_text())["environment"]
    assert env["skipnet_version"] == skipnet.__version__ and env["torch_version"] == torch.__version__
    assert env["device"] == "cpu" and env["cpu"] and env["world_size"] == 1 and "command_line" in env
    assert env["git"] is None or len(env["git"]["commit"]) == 40


def test_config_file_repeats_a_run_bit_identically(run, data, tmp_path, capsys) -> None:
    again = tmp_path / "y"
    assert main(["train", "--config", str(run / "config.json"), "--out", str(again)]) == 0
    assert same_weights(run / "last.pt", again / "last.pt") and same_weights(run / "best.pt", again / "best.pt")
    assert metric_rows(run) == metric_rows(again)
    cfg = json.loads((again / "config.json").read_text())
    assert cfg["out"] == str(again) and cfg["tensorboard"] is True
    # the command line wins over the file: a shorter run, and a YAML file with dashed names works too
    (tmp_path / "c.yaml").write_text(f"arch: tiny_rnn_gate_14\nstage: hrl\ndata: {data}\nbatch-size: 4\nthreads: 1\n")
    short = tmp_path / "z"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(short), "--iters", "2"]) == 0
    cfg = json.loads((short / "config.json").read_text())
    assert cfg["iters"] == 2 and cfg["batch_size"] == 4 and load_checkpoint(short / "last.pt")["step"] == 2


def test_config_file_mistakes_are_one_line(run, tmp_path, capsys) -> None:
    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("skipnet train: error: "), err
        return err

    (tmp_path / "bad.json").write_text(json.dumps({"arch": "tiny_rnn_gate_14", "learning_rate": 0.1}))
    assert "unknown option(s) learning_rate" in error(["train", "--config", str(tmp_path / "bad.json")])
    (tmp_path / "stage.json").write_text(json.dumps({"stage": "warp"}))
    assert "stage = 'warp'; expected one of base" in error(["train", "--config", str(tmp_path / "stage.json")])
    assert "--config nope.json does not exist" in error(["train", "--config", "nope.json"])
    assert "required: ARCH, --stage, --data, --out" in error(["train"])
    (tmp_path / "broken.json").write_text("{")
    assert "is not valid JSON" in error(["train", "--config", str(tmp_path / "broken.json")])
    wrong_types = [  # JSON values of the wrong type: refused, not misread (true as lr 1, "false" as a flag on)
        ({"arch": 5}, "arch = 5; expected text"),
        ({"lr": True}, "lr = True is not a valid value"),
        ({"iters": 64.7}, "iters = 64.7 is not a valid value"),
        ({"threshold": [0.5]}, "threshold = [0.5] is not a valid value"),
        ({"nesterov": "false"}, "nesterov = 'false'; expected true or false"),
        ({"epochs": 1, "iters": 2}, "gives both epochs and iters"),
    ]
    for k, (content, needle) in enumerate(wrong_types):
        (tmp_path / f"t{k}.json").write_text(json.dumps(content))
        assert needle in error(["train", "--config", str(tmp_path / f"t{k}.json")])
    twice = [  # an option given twice: refused, not the last one taken silently
        ("d1.json", '{"lr": 0.1, "lr": 0.2}', "'lr' is given twice"),
        ("d2.json", '{"batch-size": 8, "batch_size": 16}', "'batch-size' and 'batch_size' are the same option"),
        ("d3.yaml", "lr: 0.1\n'lr': 0.2\n", "'lr' is given twice"),
        ("d4.yml", "lr: 0.1\nbatch_size: 8\nbatch-size: 16\n", "'batch_size' and 'batch-size' are the same"),
    ]
    twice += [  # and two more mistakes of a file's form
        ("t.toml", "lr = 0.1\n", "is not JSON (nor YAML, by its name)"),
        ("n.yaml", "no-channels-last: true\n", "unknown option(s) no_channels_last (a file names the option a --no-"),
    ]
    for name, text, needle in twice:
        (tmp_path / name).write_text(text)
        assert needle in error(["train", "--config", str(tmp_path / name)])
    assert not (tmp_path / "runs").exists()


def test_a_yaml_merge_key_may_override_what_it_merges(tmp_path) -> None:
    (tmp_path / "m.yaml").write_text("common: &c {lr: 0.1, seed: 3}\noptions:\n  <<: *c\n  lr: 0.2\n")
    data = load_config_file(tmp_path / "m.yaml")[0]
    assert data["options"] == {"lr": 0.2, "seed": 3}
    (tmp_path / "s.yaml").write_text("<<: {batch_size: 8, lr: 0.1}\nbatch-size: 16\n")  # the other spelling
    assert load_config_file(tmp_path / "s.yaml")[0] == {"batch_size": 16, "lr": 0.1}


def test_resumed_run_logs_like_an_uninterrupted_one(data, tmp_path) -> None:
    """Stop at step 4, leave a row from 'after the checkpoint', resume: steps.csv ends as the uninterrupted run's."""
    whole, out = tmp_path / "whole", tmp_path / "r"
    assert main(hrl(data, whole, "--iters", "6", "--schedule", "constant")) == 0
    assert main(hrl(data, out, "--iters", "4", "--schedule", "constant")) == 0
    with open(out / "steps.csv", "a") as f:
        f.write("5,1.25,0.1,9,9,9,9,9,9,9\n6,1.5,0")  # written after the checkpoint, and a torn row
    assert main(hrl(data, out, "--iters", "6", "--resume")) == 0
    assert same_weights(whole / "last.pt", out / "last.pt")
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in csv_rows(out / "steps.csv")]
    assert [r["step"] for r in strip] == ["2", "4", "6"]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in csv_rows(whole / "steps.csv")]


def test_progress_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, caplog) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    quiet = Progress(total=10, enabled=True, log_every=5)  # the library's default: no bar, even on a terminal
    quiet.update(5, {"loss": 1.5})
    assert quiet.bar is None and screen.getvalue() == ""
    bar = Progress(total=10, enabled=True, log_every=5, bar=True)  # the CLI's choice
    with bar.logging_above():
        for step in range(1, 5):
            bar.update(step, {"loss": 1.5, "acc": 0.25})
        logging.getLogger("skipnet.train").warning("an evaluation line")
    text = screen.getvalue()
    assert "4/10" in text and "step/s" in text and "<" in text and "loss=1.5" in text  # rate, ETA, stats
    assert "an evaluation line" in text and bar.bar is None  # printed above the bar; bar closed on the way out
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: plain lines every log_every steps
    lines = Progress(total=10, enabled=True, log_every=5, bar=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="skipnet.train"):
        for step in range(1, 11):
            lines.update(step, {"loss": 1.5})
    logged = [r.getMessage() for r in caplog.records if r.name == "skipnet.train"]
    assert len(logged) == 2 and logged[0].startswith("step 5/10 loss 1.5 |") and "steps/s" in logged[0]
    assert "ETA" in logged[0] and lines.bar is None
