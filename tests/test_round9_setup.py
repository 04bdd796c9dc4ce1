"""Round 9, setting a run up from ``--init`` (skipnet.runsetup): whether its gates are learned ones is the one rule of
``require_learned_gates`` (a gated base stage's gates, mode ``all_on``, and SDV's, ``random``, were never trained),
and a gated ``--init`` with learned gates brings its (calibrated) threshold unless ``--threshold`` is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import one_line_error, train_tiny_sp
from skipnet.checkpoint import atomic_save, load_checkpoint
from skipnet.cli import main
from skipnet.train import TrainConfig, train

TINY = ["--data", "digits", "--batch-size", "32", "--limit-train", "128", "--limit-test", "64", "--threads", "1"]
TINY += ["--val-split", "0.2", "--log-every", "1000"]


def _train(out: Path, *args: str) -> int:
    return main(["train", "tiny_rnn_gate_14", *args, *TINY, "--out", str(out)])


def _edited(src: Path, dst: Path, **fields) -> Path:
    atomic_save(load_checkpoint(src) | fields, dst)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``base``: a gated architecture trained in stage base (mode all_on, gates never trained); ``sdv``: the same
    recorded as SDV's (mode random); ``sp``: a few SP steps (learned gates); ``cal``: ``sp`` calibrated to 0.42."""
    root = tmp_path_factory.mktemp("round9_setup")
    assert _train(root / "base", "--stage", "base", "--iters", "2") == 0
    base = root / "base" / "best.pt"
    sp = train_tiny_sp(root / "sp", iters=2, batch_size=32, limit_train=128, limit_test=64) / "best.pt"
    sdv = _edited(base, root / "sdv.pt", mode="random", stage="sdv")
    return {"base": base, "sdv": sdv, "sp": sp, "cal": _edited(sp, root / "cal.pt", threshold=0.42)}


# ------------------------------------------------------------------------------- 1. --freeze gates: trained gates
@pytest.mark.parametrize(("init", "freeze", "mode"), [("base", "gates", "all_on"), ("sdv", "policy", "random")])
def test_freeze_gates_refuses_a_gated_init_whose_gates_were_never_trained(
    runs, tmp_path, capsys, init: str, freeze: str, mode: str
) -> None:
    out = tmp_path / "refused"
    assert _train(out, "--stage", "sp", "--init", str(runs[init]), "--freeze", freeze, "--iters", "1") == 2
    err = one_line_error(capsys, "train")
    assert "has no trained rnn gates" in err and f"mode {mode}" in err and "would stay at random" in err
    assert not (out / "last.pt").exists()


# ------------------------------------------------------------------------------- 2. --gate-bias: untrained gates
def test_gate_bias_sets_the_untrained_gates_of_a_gated_base_init(runs, tmp_path) -> None:
    out = tmp_path / "bias"
    assert _train(out, "--stage", "sp", "--init", str(runs["base"]), "--gate-bias", "2", "--iters", "1") == 0
    heads = [v for k, v in load_checkpoint(out / "last.pt")["state_dict"].items() if k.startswith("gates.fc.bias")]
    assert heads and all(torch.allclose(v, torch.full_like(v, 2.0), atol=0.05) for v in heads)  # one step moved


def test_gate_bias_still_refuses_an_init_with_trained_gates(runs, tmp_path, capsys) -> None:
    out = tmp_path / "refused"
    assert _train(out, "--stage", "hrl", "--init", str(runs["sp"]), "--gate-bias", "2", "--iters", "1") == 2
    assert "brings its gates' own" in one_line_error(capsys, "train")


# ------------------------------------------------------------------------------- 3. the calibrated threshold
def _thresholds(out: Path) -> list[float]:
    """The threshold of ``out``'s best checkpoint, its recorded config, config.json and summary.json."""
    best = load_checkpoint(out / "best.pt")
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return [
        best["threshold"],
        best["train_config"]["threshold"],
        config["threshold"],
        summary["train_config"]["threshold"],
    ]


def test_a_calibrated_init_brings_its_threshold_and_resume_keeps_it(runs, tmp_path, capsys) -> None:
    out = tmp_path / "hrl"
    assert _train(out, "--stage", "hrl", "--init", str(runs["cal"]), "--iters", "1") == 0
    assert _thresholds(out) == [0.42] * 4
    assert _train(out, "--stage", "hrl", "--init", str(runs["cal"]), "--iters", "2", "--resume") == 0
    assert _thresholds(out) == [0.42] * 4 and load_checkpoint(out / "last.pt")["step"] == 2
    capsys.readouterr()
    assert _train(out, "--stage", "hrl", "--init", str(runs["cal"]), "--iters", "3", "--resume", "--threshold", "0.5")
    assert "threshold" in one_line_error(capsys, "train")


def test_an_explicit_threshold_wins_over_the_init_s(runs, tmp_path) -> None:
    out = tmp_path / "explicit"
    assert _train(out, "--stage", "hrl", "--init", str(runs["cal"]), "--iters", "1", "--threshold", "0.5") == 0
    assert _thresholds(out) == [0.5] * 4


def test_the_python_api_takes_the_init_s_threshold_unless_set(runs, tmp_path) -> None:
    common = {"arch": "tiny_rnn_gate_14", "stage": "hrl", "data": "digits", "init": str(runs["cal"]), "iters": 1}
    common |= {"batch_size": 32, "limit_train": 128, "limit_test": 64, "threads": 1, "val_split": 0.2}
    assert train(TrainConfig(out=str(tmp_path / "a"), **common))["train_config"]["threshold"] == 0.42
    assert train(TrainConfig(out=str(tmp_path / "b"), threshold=0.6, **common))["train_config"]["threshold"] == 0.6


def test_untrained_gates_bring_no_threshold(runs, tmp_path) -> None:
    """A gated base checkpoint's threshold is no calibration: the run keeps --threshold's default."""
    base = _edited(runs["base"], tmp_path / "base.pt", threshold=0.42)
    assert _train(tmp_path / "sp", "--stage", "sp", "--init", str(base), "--iters", "1") == 0
    assert _thresholds(tmp_path / "sp") == [0.5] * 4


def test_an_init_calibrated_to_skip_every_block_needs_a_threshold(runs, tmp_path, capsys) -> None:
    init = _edited(runs["sp"], tmp_path / "all_skip.pt", threshold=1.01)
    assert _train(tmp_path / "refused", "--stage", "hrl", "--init", str(init), "--iters", "1") == 2
    assert "skip every gated block" in one_line_error(capsys, "train")
    assert not (tmp_path / "refused" / "last.pt").exists()
    args = ("--stage", "hrl", "--init", str(init), "--iters", "1", "--threshold", "0.5")
    assert _train(tmp_path / "given", *args) == 0


# ------------------------------------------------------------------------------- 4. --config replays (round 10)
def _replay(config: Path, out: Path, *args: str) -> int:
    return main(["train", "--config", str(config), *args, "--out", str(out)])


def test_a_replay_with_another_init_takes_that_init_s_threshold(runs, tmp_path, capsys) -> None:
    """The threshold --init brought is recorded as derived: a --config replay takes its own --init's (as the same
    command with that --init would), not the recorded run's calibrated one."""
    assert _train(tmp_path / "cal", "--stage", "hrl", "--init", str(runs["cal"]), "--iters", "1") == 0
    recorded = json.loads((tmp_path / "cal" / "config.json").read_text())
    assert recorded["threshold"] == 0.42 and recorded["derived"]["threshold"] == 0.42
    assert _replay(tmp_path / "cal" / "config.json", tmp_path / "sp", "--init", str(runs["sp"])) == 0
    assert _thresholds(tmp_path / "sp") == [0.5] * 4  # as `--stage hrl --init sp` trains
    assert _replay(tmp_path / "sp" / "config.json", tmp_path / "again", "--init", str(runs["cal"])) == 0
    assert _thresholds(tmp_path / "again") == [0.42] * 4  # sp's 0.5 was no choice either
    assert _replay(tmp_path / "cal" / "config.json", tmp_path / "same") == 0
    assert _thresholds(tmp_path / "same") == [0.42] * 4


def test_a_replay_keeps_a_threshold_that_was_given(runs, tmp_path) -> None:
    for given in ("0.6", "0.5"):  # 0.5, the default, given: the calibrated --init does not replace it either
        out = tmp_path / given
        assert _train(out, "--stage", "hrl", "--init", str(runs["sp"]), "--iters", "1", "--threshold", given) == 0
        assert "threshold" not in json.loads((out / "config.json").read_text())["derived"]
        assert _replay(out / "config.json", tmp_path / f"replay{given}", "--init", str(runs["cal"])) == 0
        assert _thresholds(tmp_path / f"replay{given}") == [float(given)] * 4


def test_the_python_api_keeps_a_threshold_of_0_5_that_is_set(runs, tmp_path) -> None:
    common = {"arch": "tiny_rnn_gate_14", "stage": "hrl", "data": "digits", "init": str(runs["cal"]), "iters": 1}
    common |= {"batch_size": 32, "limit_train": 128, "limit_test": 64, "threads": 1, "val_split": 0.2}
    assert train(TrainConfig(out=str(tmp_path / "a"), threshold=0.5, **common))["train_config"]["threshold"] == 0.5


def test_gated_blocks_is_the_models_own_count() -> None:
    """``trainconfig.gated_blocks`` (N for ImageNet's beta = alpha / N, without building the model) is the count a
    built model has, for every registered gated architecture."""
    from skipnet.registry import create_model, get_config, list_models
    from skipnet.trainconfig import gated_blocks

    names = [n for n in list_models() if get_config(n).gate != "none"]
    assert any(n.startswith("imagenet") for n in names) and any(n.startswith("cifar10_") for n in names)
    for name in names:
        config = get_config(name)
        if config.family == "imagenet" and config.depth > 50:
            continue  # building ResNet-101/152 takes seconds each; 18, 34 and 50 cover both block kinds
        assert gated_blocks(config) == create_model(name).num_gates, name
