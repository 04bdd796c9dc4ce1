"""``skipnet sweep`` and the training options after a hostile review (round 9): a rerun reuses a run only if it
was trained with the same options (defaults included) on the same data, the start row's data is checked as
``skipnet eval`` checks it, and training options that nothing reads are refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_line_error, train_tiny_sp
from skipnet.cli import main
from skipnet.errors import SkipnetError
from skipnet.trainconfig import TrainConfig

FAST = ["--iters", "1", "--limit-test", "64", "--threads", "1"]
# the options of the first sweep, each of which a rerun drops back to its default
SET = {"--nesterov": [], "--seed": ["3"], "--limit-train": ["64"], "--lr": ["0.02"], "--batch-size": ["16"]}


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("skipnet sweep: error: "), err
    return lines[0]


def _folder(root: Path, classes: list[str], n_train: int, n_test: int, seed: int = 7) -> Path:
    """An ImageFolder of 8x8 RGB noise images: ``n_train`` and ``n_test`` per class (the same seed: the same
    images, so two folders of other ``n_test`` share their training split)."""
    for split, n in (("train", n_train), ("test", n_test)):
        rng = np.random.RandomState(seed if split == "train" else seed + 1)
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(d / f"{c}{i}.png")
    return root


@pytest.fixture(scope="module")
def sp_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RNN-gated network after a few SP steps on digits (20% validation split): its ``best.pt``."""
    out = tmp_path_factory.mktemp("sweep9") / "sp"
    return train_tiny_sp(out, iters=4, batch_size=32, limit_train=128) / "best.pt"


# --------------------------------------------------------------------------------------------- 1. options
@pytest.fixture(scope="module")
def finished(sp_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    """A finished sweep of one alpha with options set away from their defaults: ``(out, its argv, its rows)``."""
    out = tmp_path_factory.mktemp("sweep9") / "sw"
    argv = ["sweep", "--init", str(sp_ckpt), "--data", "digits", "--alphas", "1", "--out", str(out), *FAST]
    argv += [x for flag, value in SET.items() for x in (flag, *value)]
    assert main(argv) == 0
    return out, argv, (out / "alpha_1" / "metrics.jsonl").read_text()


def _without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + len(SET.get(flag, ["its value"])) :]


@pytest.mark.slow
@pytest.mark.parametrize("flag", list(SET))
def test_a_rerun_with_an_option_back_at_its_default_does_not_reuse_the_run(
    finished: tuple[Path, list[str], str], capsys: pytest.CaptureFixture, flag: str
) -> None:
    out, argv, rows = finished
    capsys.readouterr()
    code, _, err = _cli(capsys, *_without(argv, flag))
    line = _one_line(code, err)
    assert "choose another --out" in line and flag.removeprefix("--") in line, line
    assert (out / "alpha_1" / "metrics.jsonl").read_text() == rows  # neither retrained nor reused


@pytest.mark.slow
def test_a_rerun_with_the_same_options_reuses_the_run_whatever_its_threads_and_logging(
    finished: tuple[Path, list[str], str], capsys: pytest.CaptureFixture
) -> None:
    out, argv, rows = finished
    capsys.readouterr()
    more = ["--log-every", "7", "--workers", "0", "--device", "cpu", "--json"]
    code, stdout, err = _cli(capsys, *_without(argv, "--threads"), *more)
    assert code == 0, err
    assert [r["alpha"] for r in json.loads(stdout)["rows"]] == [None, 1.0]
    assert (out / "alpha_1" / "metrics.jsonl").read_text() == rows


# --------------------------------------------------------------------------------------------- 1. data, 2. channels
@pytest.mark.slow
def test_a_rerun_on_other_data_is_refused_and_on_moved_data_reuses(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    classes = ["a", "b", "c"]
    data = _folder(tmp_path / "data", classes, 12, 4)
    other = _folder(tmp_path / "other", classes, 12, 3)  # the same training images, another test split
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    sp = train_tiny_sp(tmp_path / "sp", data=str(data), iters=2, batch_size=8, val_split=0.25) / "best.pt"
    out = tmp_path / "sw"
    argv = ["sweep", "--init", str(sp), "--alphas", "1", "--out", str(out), "--iters", "1", "--batch-size", "8"]
    argv += ["--threads", "1", "--json"]
    code, stdout, err = _cli(capsys, *argv, "--data", str(data))
    assert code == 0, err
    first = json.loads(stdout)["rows"]
    rows = (out / "alpha_1" / "metrics.jsonl").read_text()
    code, _, err = _cli(capsys, *argv, "--data", str(other))
    line = _one_line(code, err)
    assert "other data" in line and "test images 9, recorded 12" in line and "choose another --out" in line, line
    code, stdout, err = _cli(capsys, *argv, "--data", str(moved))  # the same images at another path
    assert code == 0, err
    assert json.loads(stdout)["rows"][1:] == first[1:] and (out / "alpha_1" / "metrics.jsonl").read_text() == rows


@pytest.mark.slow
def test_start_data_of_other_channels_is_one_line_before_anything_trains(
    finished: tuple[Path, list[str], str], sp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rgb = _folder(tmp_path / "rgb", [str(i) for i in range(10)], 3, 2)  # the digits' classes, 3 channels
    out, argv, rows = finished
    for where in (out, tmp_path / "fresh"):
        args = ["sweep", "--init", str(sp_ckpt), "--data", str(rgb), "--alphas", "1", "--out", str(where), *FAST]
        capsys.readouterr()
        code, _, err = _cli(capsys, *args)
        line = _one_line(code, err)
        assert "takes 1-channel images" in line and "3-channel" in line, line
    assert not (tmp_path / "fresh").exists() and (out / "alpha_1" / "metrics.jsonl").read_text() == rows


# --------------------------------------------------------------------------------------------- 3. unused options
REFUSED = [
    ("sp", {"alpha": 3.0}, "--alpha 3 has no effect here"),
    ("sp", {"beta": 3.0}, "--beta 3 has no effect here"),
    ("sp", {"skip_target": 0.3}, "--skip-target 0.3 has no effect here"),
    ("sp", {"rl_weight": 0.5}, "--rl-weight 0.5 has no effect here: it scales the REINFORCE term"),
    ("sp", {"baseline": "ema"}, "--baseline ema has no effect here"),
    ("soft", {"alpha": 3.0}, "--alpha 3 has no effect here"),
    ("sp", {"select": "reward", "val_split": 0.0}, "--select reward has no effect here: with --val-split 0"),
    ("hrl", {"select": "accuracy", "val_split": 0.0}, "(as --select last)"),
    ("sp", {"beta": 1.5}, "--beta 1.5 has no effect here"),
    ("sp", {"alpha": 0.01}, "--alpha 0.01 has no effect here"),  # ImageNet's default, not CIFAR's
    ("base", {"threshold": 0.7}, "--threshold 0.7 has no effect here"),
    ("base", {"gate_lr_mult": 5.0}, "--gate-lr-mult 5 has no effect here: stage base trains no gate"),
    ("sdv", {"gate_lr_mult": 5.0}, "stage sdv trains no gate"),
]


@pytest.mark.parametrize(("stage", "options", "says"), REFUSED)
def test_an_option_nothing_reads_is_refused(stage: str, options: dict, says: str) -> None:
    cfg = TrainConfig("tiny_rnn_gate_14", stage, "digits", "o", **options)
    with pytest.raises(SkipnetError, match=None) as info:
        cfg.validate()
    assert says in str(info.value) and "\n" not in str(info.value), str(info.value)


ACCEPTED = [
    ("sp", {"alpha": 3.0, "beta": 2.0, "skip_target": 0.3, "select": "reward"}),  # --select reward scores by them
    ("hrl", {"alpha": 3.0, "beta": 3.0, "rl_weight": 0.5, "baseline": "ema", "skip_target": 0.3}),
    ("rl", {"rl_weight": 0.5, "baseline": "batch"}),
    ("sp", {"select": "last", "val_split": 0.0}),
    ("sp", {"val_split": 0.0}),
    ("sp", {"threshold": 0.7, "gate_lr_mult": 5.0}),
    ("base", {}),
    # every option at its default, as a replayed config.json gives it
    ("base", {k: v for k, v in TrainConfig.defaults().items() if v is not None}),
    ("sp", {k: v for k, v in TrainConfig.defaults().items() if v is not None}),
    # the value the run fills in where it is unset: what an older config.json (no 'derived') or a restatement gives
    ("base", {"alpha": 0.1, "beta": 1.0, "select": "accuracy", "threshold": 0.5}),
    ("sp", {"alpha": 0.1, "beta": 1.0}),
    ("sp", {"select": "accuracy", "val_split": 0.0}),  # an older run's command line, resumed
    ("hrl", {"select": "reward", "val_split": 0.0}),
    ("sdv", {"threshold": 0.5, "alpha": 0.1, "beta": 1.0}),
]


@pytest.mark.parametrize(("stage", "options"), ACCEPTED)
def test_an_option_that_is_read_is_accepted(stage: str, options: dict) -> None:
    TrainConfig("tiny_rnn_gate_14", stage, "digits", "o", **options).validate()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"alpha": 0.01, "beta": 0.01 / 15}, None),
        ({"beta": 1.0}, "--beta 1 has no effect here"),
        ({"alpha": 0.1}, "--alpha 0.1 has no effect here"),
    ],
)
def test_an_unused_option_is_compared_with_the_default_of_its_data(options: dict, says: str | None) -> None:
    """ImageNet's defaults: alpha 0.01, beta alpha / N (15 gated blocks of ResNet-34)."""
    cfg = TrainConfig("imagenet_rnn_gate_34", "sp", "imagenet", "o", **options)
    if says is None:
        cfg.validate()
        return
    with pytest.raises(SkipnetError, match="has no effect here") as info:
        cfg.validate()
    assert says in str(info.value)


def test_an_older_config_json_replays_and_an_older_run_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """config.json written before 'derived' was (every filled value recorded as if given) replays; a run started
    with --val-split 0 --select accuracy (sp's own) resumes with its command line."""
    short = ["--iters", "1", "--limit-train", "32", "--limit-test", "32", "--threads", "1", "--batch-size", "16"]
    base = ["train", "tiny_rnn_gate_14", "--stage", "base", "--data", "digits", *short]
    assert main([*base, "--out", str(tmp_path / "base")]) == 0
    record = json.loads((tmp_path / "base" / "config.json").read_text())
    record.pop("derived")
    (tmp_path / "old.json").write_text(json.dumps(record))
    assert main(["train", "--config", str(tmp_path / "old.json"), "--out", str(tmp_path / "replay")]) == 0
    sp = ["train", "tiny_rnn_gate_14", "--stage", "sp", "--data", "digits", "--out", str(tmp_path / "sp"), *short]
    sp += ["--val-split", "0", "--select", "accuracy", "--beta", "1.0"]
    assert main(sp) == 0
    assert main([*sp, "--resume", "--iters", "2"]) == 0
    capsys.readouterr()
    assert main([*sp, "--resume", "--iters", "3", "--alpha", "3"]) == 2
    assert "--alpha 3 has no effect here" in one_line_error(capsys, "train")


def test_freeze_gates_refuses_gate_lr_mult() -> None:
    cfg = TrainConfig("tiny_rnn_gate_14", "sp", "digits", "o", init="x.pt", freeze="gates", gate_lr_mult=5.0)
    with pytest.raises(SkipnetError, match="--gate-lr-mult 5 has no effect here: --freeze gates keeps the gates"):
        cfg.validate()


def test_cli_train_refuses_an_unused_option_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["train", "tiny_rnn_gate_14", "--stage", "sp", "--data", "digits", "--out", str(out), "--baseline", "ema"]
    argv += ["--iters", "1", "--limit-train", "32", "--limit-test", "32", "--threads", "1"]  # short, where accepted
    assert main(argv) == 2
    assert "--baseline ema has no effect here" in one_line_error(capsys, "train") and not out.exists()


# --------------------------------------------------------------------------------------------- 4. older sweeps
@pytest.mark.slow
def test_a_rerun_over_an_older_sweep_compares_the_values_its_runs_would_train_with(
    sp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run whose config.json does not say which values were defaults (written before 'derived' was) is reused
    only if the new run would train with its values: an option left unset is compared at its default."""
    out = tmp_path / "sw"
    argv = ["sweep", "--init", str(sp_ckpt), "--data", "digits", "--alphas", "0.3", "--out", str(out), *FAST]
    assert main([*argv, "--lr", "0.001"]) == 0
    rows = (out / "alpha_0.3" / "metrics.jsonl").read_text()
    config = out / "alpha_0.3" / "config.json"
    record = json.loads(config.read_text())
    assert "eval_every" in record.pop("derived")  # a default that depends on the data: compared as well
    config.write_text(json.dumps(record))
    capsys.readouterr()
    code, _, err = _cli(capsys, *argv)  # trains at lr 1e-4: not the run there
    line = _one_line(code, err)
    assert "lr 0.001, left to its default (0.0001)" in line and "choose another --out" in line, line
    code, _, err = _cli(capsys, *argv, "--lr", "0.001")  # the same run: reused
    assert code == 0, err
    assert (out / "alpha_0.3" / "metrics.jsonl").read_text() == rows
