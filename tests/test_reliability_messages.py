"""Messages and bounds (issue 33): JSON output stays valid JSON with non-finite numbers (``null``), ``--config``
mistakes (a directory, deep nesting), an index entry without a SHA-256, a pickle naming the refused object, and
``skipnet train`` options bounded before anything is written."""

from __future__ import annotations

import json
import math
import pickle
import shutil

import pytest

import skipnet.commands.eval as eval_command
from conftest import one_line_error
from skipnet.checkpoint import load_checkpoint
from skipnet.cli import main
from skipnet.errors import SkipnetError
from skipnet.pretrained import read_index, sha256_of, zoo_dir
from skipnet.rundir import append_row, read_rows
from skipnet.train import Trainer

TINY = [
    "tiny_rnn_gate_14",
    "--stage",
    "sp",
    "--data",
    "digits",
    "--batch-size",
    "16",
    "--threads",
    "1",
    "--limit-train",
    "64",
    "--limit-test",
    "16",
    "--log-every",
    "100",
]


def strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity, as strict JSON parsers (JavaScript, jq) do."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------------ JSON output
def test_a_metrics_row_with_non_finite_numbers_is_valid_json(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_row(path, {"step": 1, "val_loss": math.nan, "per_block": [1.0, math.inf], "nested": {"x": -math.inf}})
    line = path.read_text().strip()
    assert strict_json(line) == {"step": 1, "val_loss": None, "per_block": [1.0, None], "nested": {"x": None}}
    assert read_rows(path) == ([strict_json(line)], 0)


def test_train_and_eval_json_write_null_for_a_nan(tmp_path, monkeypatch, capsys) -> None:
    """A validation loss that is NaN (overflowing logits) reaches metrics.jsonl and summary.json as null, and
    ``skipnet eval --json`` prints null: it used to print a bare NaN, which no strict parser reads."""
    real = Trainer.evaluate_split
    monkeypatch.setattr(Trainer, "evaluate_split", lambda self, split: real(self, split) | {"loss": math.nan})
    out = tmp_path / "run"
    assert main(["train", *TINY, "--iters", "2", "--eval-every", "2", "--json", "--out", str(out)]) == 0
    printed = strict_json(capsys.readouterr().out)
    rows = [strict_json(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] is None and "val_accuracy" in rows[-1]
    assert strict_json((out / "summary.json").read_text())["steps"] == printed["steps"] == 2
    real_eval = eval_command.evaluate
    monkeypatch.setattr(eval_command, "evaluate", lambda *a, **k: real_eval(*a, **k) | {"loss": math.nan})
    assert main(["eval", str(out / "best.pt"), "--data", "digits", "--limit", "16", "--json"]) == 0
    result = strict_json(capsys.readouterr().out)
    assert result["loss"] is None and 0 <= result["accuracy"] <= 100


# ------------------------------------------------------------------------------------------ --config
def test_config_mistakes_are_one_line(tmp_path, capsys) -> None:
    (tmp_path / "adir").mkdir()
    deep = 100_000
    (tmp_path / "deep.json").write_text('{"lr": ' + "[" * deep + "]" * deep + "}")
    (tmp_path / "deep.yaml").write_text("lr: " + "[" * deep + "]" * deep + "\n")
    (tmp_path / "long.json").write_text('{"lr": ' + "[" * 500 + "]" * 500 + "}")  # parses; its value is no lr
    cases = [
        ("adir", "--config {} is a directory; give a JSON or YAML file"),
        ("deep.json", "--config {} is nested too deeply"),
        ("deep.yaml", "--config {} is nested too deeply"),
        ("long.json", "--config {}: lr = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[... is not a valid"),
    ]
    for name, needle in cases:
        path = tmp_path / name
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
        line = one_line_error(capsys, "train")
        assert needle.format(path) in line, line
        assert len(line) < 300
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ files
def test_an_index_entry_without_sha256_is_refused(tmp_path, monkeypatch, capsys) -> None:
    name, entry = next(iter(read_index().items()))
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(zoo_dir() / entry["file"], zoo / entry["file"])
    monkeypatch.setenv("SKIPNET_PRETRAINED_DIR", str(zoo))
    for digest in (None, "", "abc"):
        record = {k: v for k, v in entry.items() if k != "sha256"} | ({} if digest is None else {"sha256": digest})
        (zoo / "index.json").write_text(json.dumps({"format": 1, "models": {name: record}}))
        with pytest.raises(SkipnetError, match=f"pretrained model '{name}': its index entry has no valid SHA-256"):
            load_checkpoint(f"pretrained:{name}")
        assert main(["eval", f"pretrained:{name}", "--data", "digits"]) == 2
        assert "has no valid SHA-256" in one_line_error(capsys, "eval")
    entry_ok = entry | {"sha256": sha256_of(zoo / entry["file"])}
    (zoo / "index.json").write_text(json.dumps({"format": 1, "models": {name: entry_ok}}))
    assert load_checkpoint(f"pretrained:{name}")["arch"]["name"] == entry["arch"]


class Plain:
    pass


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_a_plain_pickle_is_refused_naming_its_object(tmp_path, capsys, protocol) -> None:
    """A pickle written by pickle.dump (no zip) with an object in it: the line names the object (it used to say
    "UnpicklingError" after a warning about the protocol, three lines in all)."""
    path = tmp_path / "p.pt"
    with open(path, "wb") as f:
        pickle.dump({"kind": "skipnet", "x": Plain()}, f, protocol=protocol)
    assert main(["eval", str(path), "--data", "digits"]) == 2
    line = one_line_error(capsys, "eval")
    named = "copy_reg._reconstructor" if protocol == 0 else f"{__name__}.Plain"
    assert f"refused to load {path}: it contains the Python object {named}" in line, line


# ------------------------------------------------------------------------------------------ bounds
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--threads", "100000"], "--threads must be in [1, 256], got 100000"),
        (["--workers", "100000"], "--workers must be in [0, 64], got 100000"),
        (["--batch-size", "1000000000"], "--batch-size must be in [1, 65536], got 1000000000"),
        (["--image-size", "100000"], "--image-size must be in [1, 1024], got 100000"),
        (["--image-size", "16"], "--image-size 16: the built-in data set digits has 8x8 images and is not resized"),
    ],
)
def test_train_options_are_bounded(tmp_path, capsys, extra, needle) -> None:
    out = tmp_path / "out"
    assert main(["train", *TINY, "--iters", "1", "--out", str(out), *extra]) == 2
    assert needle in one_line_error(capsys, "train")
    assert not out.exists()
