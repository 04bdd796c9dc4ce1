"""Options that set a network's first weights, against --init and --distill checkpoints that bring their own: each
combination the run would silently ignore or crash on is refused in one line before anything is written, or said."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from skipnet.checkpoint import save_checkpoint
from skipnet.cli import main
from skipnet.gated import GatedResNet
from skipnet.registry import get_config

DIGITS = {"mean": [0.5], "std": [0.25]}
RUN = ["--data", "digits", "--iters", "1", "--batch-size", "16", "--limit-test", "16", "--threads", "1"]


def _digits_model(arch: str) -> GatedResNet:
    torch.manual_seed(0)
    return GatedResNet(get_config(arch).replace(in_channels=1, image_size=8, num_classes=10))


def _train(tmp_path: Path, capsys, *argv: str) -> tuple[int, str, Path]:
    out = tmp_path / "run"
    rc = main(["train", *argv, *RUN, "--out", str(out)])
    return rc, capsys.readouterr().err, out


def test_a_teacher_of_other_channels_is_refused_before_anything_is_written(tmp_path, capsys) -> None:
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, GatedResNet(get_config("tiny_resnet_14")), data={"mean": [0.5] * 3, "std": [0.2] * 3})
    rc, err, out = _train(tmp_path, capsys, "tiny_rnn_gate_14", "--stage", "sp", "--distill", str(teacher))
    assert rc == 2 and "takes 3-channel images; the data has 1-channel ones" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--gate-bias", "3"], "--gate-bias sets the bias of gates that start untrained"),
        (["--zero-init-residual"], "--zero-init-residual zeroes .* --init .* replaces them"),
    ],
)
def test_options_that_init_would_overwrite_are_refused(tmp_path, capsys, argv, match) -> None:
    """--gate-bias with a gated --init was recorded in config.json and never applied (the checkpoint's gates
    replaced it); --zero-init-residual likewise."""
    init = tmp_path / "sp.pt"
    save_checkpoint(init, _digits_model("tiny_rnn_gate_14"), data=DIGITS)
    rc, err, out = _train(tmp_path, capsys, "tiny_rnn_gate_14", "--stage", "sp", "--init", str(init), *argv)
    assert rc == 2 and re.search(match, err), err
    assert not out.exists() or not any(out.iterdir())


def test_paper_gate_init_and_a_gate_bias_are_alternatives(tmp_path, capsys) -> None:
    rc, err, _ = _train(tmp_path, capsys, "tiny_rnn_gate_14", "--stage", "sp", "--paper-gate-init", "--gate-bias", "2")
    assert rc == 2 and "are alternatives" in err


@pytest.mark.parametrize("design", ["tiny_feedforward_14", "tiny_rnn_gate_14"])
def test_a_gated_init_of_another_gate_design_says_its_gates_start_untrained(tmp_path, capsys, caplog, design) -> None:
    """The gates of another design are not loaded (only the backbone is): a warning says so; the same design's
    gates load, and nothing is said."""
    init = tmp_path / "init.pt"
    save_checkpoint(init, _digits_model(design), data=DIGITS)
    with caplog.at_level(logging.WARNING):
        rc, err, _ = _train(tmp_path, capsys, "tiny_rnn_gate_14", "--stage", "sp", "--init", str(init))
    assert rc == 0, err
    assert ("its backbone is loaded, the gates start untrained" in caplog.text + err) == (design != "tiny_rnn_gate_14")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--stage", "sp", "--explore", "0.3"], "--explore 0.3"),
        (["--stage", "hrl", "--alpha-lr", "5"], "--alpha-lr 5"),
        (["--stage", "hrl", "--wrong-penalty", "5"], "--wrong-penalty 5"),
        (["--stage", "sp", "--distill-weight", "0.9"], "--distill-weight 0.9"),
        (["--stage", "sp", "--distill-temperature", "2"], "--distill-temperature 2"),
        (["--stage", "sp", "--keep", "0.7"], "--keep 0.7"),
        (["--stage", "hrl", "--paper-gate-init"], "--paper-gate-init"),
    ],
)
def test_an_option_nothing_reads_is_refused(tmp_path, capsys, argv, flag) -> None:
    """Each of these ran to the end with the option ignored (exit 0): now one line, before anything is written."""
    rc, err, out = _train(tmp_path, capsys, "tiny_rnn_gate_14", *argv)
    assert rc == 2 and f"{flag} has no effect here" in err, err
    assert not out.exists()


def test_the_same_options_where_they_are_read_still_run(tmp_path, capsys) -> None:
    argv = ["--stage", "hrl", "--explore", "0.1", "--skip-budget", "0.3", "--alpha-lr", "0.02", "--gate-bias", "1"]
    rc, err, _ = _train(tmp_path, capsys, "tiny_rnn_gate_14", *argv)
    assert rc == 0, err


def test_a_config_replay_derives_the_defaults_again(tmp_path, capsys) -> None:
    """config.json lists the options the run's defaults filled ('derived'); a --config replay derives those again,
    so a changed option is not overruled by a default the first run derived (SP from scratch records gate bias 2,
    which --paper-gate-init then contradicted); every other value, edited or not, is taken from the file."""
    import json

    rc, err, first = _train(tmp_path, capsys, "tiny_rnn_gate_14", "--stage", "sp", "--lr", "0.05")
    assert rc == 0, err
    record = json.loads((first / "config.json").read_text())
    assert record["gate_bias"] == 2.0 and "gate_bias" in record["derived"] and "lr" not in record["derived"]
    again = tmp_path / "again"
    argv = ["train", "--config", str(first / "config.json"), "--paper-gate-init", "--out", str(again)]
    assert main(argv) == 0, capsys.readouterr().err
    replay = json.loads((again / "config.json").read_text())
    assert replay["gate_bias"] is None and replay["paper_gate_init"] and replay["lr"] == 0.05
    same = ("out", "paper_gate_init", "gate_bias", "environment", "derived")
    assert {k: v for k, v in replay.items() if k not in same} == {k: v for k, v in record.items() if k not in same}
    assert set(replay["derived"]) == set(record["derived"]) - {"gate_bias"}
    # an edited value is taken (seed is not derived); a hyphenated name in the list is one
    edited = {**record, "seed": 7, "derived": [d.replace("_", "-") for d in record["derived"]]}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert main(["train", "--config", str(tmp_path / "edited.json"), "--out", str(tmp_path / "e")]) == 0
    taken = json.loads((tmp_path / "e" / "config.json").read_text())
    assert taken["seed"] == 7 and taken["gate_bias"] == 2.0 and set(taken["derived"]) == set(record["derived"])
    (tmp_path / "bad.json").write_text(json.dumps({**record, "derived": ["learning_rate"]}))
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")]) == 2
    assert "unknown option(s) learning_rate" in capsys.readouterr().err


def test_a_resumed_run_keeps_its_derived_list(tmp_path, capsys) -> None:
    """A run stopped (here after its first checkpoint) and resumed by a shorter command keeps the list its first
    command recorded, not one made from the resume command's unset options."""
    import json

    rc, err, out = _train(tmp_path, capsys, "tiny_rnn_gate_14", "--stage", "sp", "--lr", "0.05", "--seed", "3")
    assert rc == 0, err
    first = json.loads((out / "config.json").read_text())["derived"]
    argv = ["train", "tiny_rnn_gate_14", "--stage", "sp", "--data", "digits", "--out", str(out), "--resume"]
    assert main([*argv, "--iters", "2"]) == 0, capsys.readouterr().err
    assert list(json.loads((out / "config.json").read_text())["derived"]) == [d for d in first if d != "iters"]


def test_a_derived_value_edited_in_config_json_is_taken(tmp_path, capsys) -> None:
    """config.json records each derived option's value: one the user edited is taken from the file (it was derived
    again, silently), one left alone is derived again; a file listing names only is read as before."""
    import json

    rc, err, out = _train(tmp_path, capsys, "tiny_rnn_gate_14", "--stage", "sp")
    assert rc == 0, err
    record = json.loads((out / "config.json").read_text())
    assert record["derived"]["lr"] == record["lr"] and record["derived"]["weight_decay"] == record["weight_decay"]
    edited = {**record, "lr": 0.0123, "iters": 2}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert main(["train", "--config", str(tmp_path / "edited.json"), "--out", str(tmp_path / "e")]) == 0
    taken = json.loads((tmp_path / "e" / "config.json").read_text())
    assert taken["lr"] == 0.0123 and "lr" not in taken["derived"]
    assert taken["weight_decay"] == record["weight_decay"] and "weight_decay" in taken["derived"]
    length = {**record, "iters": 64000, "epochs": 0.05, "derived": {**record["derived"], "iters": 64000}}
    (tmp_path / "length.json").write_text(json.dumps(length))  # the run derived its length; the user gave epochs
    assert main(["train", "--config", str(tmp_path / "length.json"), "--out", str(tmp_path / "l")]) == 0
    replayed = json.loads((tmp_path / "l" / "config.json").read_text())
    assert replayed["epochs"] == 0.05 and replayed["iters"] is None
    names_only = {**edited, "derived": list(record["derived"])}  # as written before the values were
    (tmp_path / "old.json").write_text(json.dumps(names_only))
    assert main(["train", "--config", str(tmp_path / "old.json"), "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["lr"] == record["lr"]


def test_a_gate_bias_for_gates_that_do_not_load_is_applied(tmp_path, capsys) -> None:
    """--gate-bias with a gated --init of another design: its gates are not loaded, so the bias is the one given
    (it was refused, while the warning said the gates start untrained)."""
    from skipnet.checkpoint import load_model

    init = tmp_path / "ff.pt"
    save_checkpoint(init, _digits_model("tiny_feedforward_14"), data=DIGITS)
    argv = ["tiny_rnn_gate_14", "--stage", "sp", "--init", str(init), "--gate-bias", "3", "--lr", "1e-12"]
    rc, err, out = _train(tmp_path, capsys, *argv)
    assert rc == 0, err
    model, _ = load_model(out / "last.pt")
    assert model.gates.fc.bias.item() == pytest.approx(3.0, abs=1e-6)
