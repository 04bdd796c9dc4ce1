"""Hostile round 6 (new data sets): a tiny network on 64-px images trains (oneDNN's channels_last kernel for narrow
1x1 stride-2 convolutions crashed the process), ``--init`` and ``--distill`` refuse a checkpoint whose classes have
other names, hidden folders are no classes, ``eval --split train --limit`` limits, and ``--split val`` without a
validation split names the option that carves one."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import patience
from skipnet.cli import main
from skipnet.data.folders import list_folder
from skipnet.gated import GatedResNet
from skipnet.registry import get_config
from skipnet.runsetup import narrow_strided_1x1, safe_layout
from skipnet.trainconfig import TrainConfig

ARGS = ["--stage", "base", "--batch-size", "8", "--threads", "1", "--iters", "2", "--eval-every", "2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))


def make_folder(root: Path, classes: list[str], side: int = 8, per_class: int = 8) -> Path:
    """An ImageFolder of random RGB PNGs: ``per_class`` training and 2 test images per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png"
                )
    return root


def one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("skipnet "), err
    return err[0]


def test_narrow_shortcuts_train_in_nchw_and_wide_ones_in_channels_last(caplog) -> None:
    cfg = TrainConfig(arch="tiny_aig_gate_14", stage="sp", data="digits", out="o")
    tiny = GatedResNet(get_config("tiny_aig_gate_14"))
    assert narrow_strided_1x1(tiny) == ["backbone.layer2.0.downsample.0"]  # layer3's reads 16 channels
    with caplog.at_level(logging.INFO):
        assert safe_layout(cfg, tiny, torch.device("cpu")).channels_last is False
    assert "trains in NCHW" in caplog.text
    wide = GatedResNet(get_config("cifar10_aig_gate_20"))
    assert narrow_strided_1x1(wide) == []
    assert safe_layout(cfg, wide, torch.device("cpu")) is cfg


def test_a_tiny_network_trains_on_64_px_images(tmp_path) -> None:
    """In a subprocess: before the fix the weight gradient of its 8-channel shortcut killed the process (SIGSEGV)."""
    data = make_folder(tmp_path / "big", ["a", "b"], side=64, per_class=8)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "skipnet", "train", "tiny_resnet_14", *ARGS, "--data", str(data), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=patience(300))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trains in NCHW" in done.stderr and (out / "best.pt").exists()


@pytest.fixture(scope="module")
def named_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("named")
    data = make_folder(root / "cats", ["cat", "dog"])
    args = ["train", "tiny_resnet_14", *ARGS, "--val-split", "0", "--data", str(data), "--out", str(root / "run")]
    assert main(args) == 0
    return root


@pytest.mark.parametrize("option", ["--init", "--distill"])
def test_init_and_distill_refuse_a_checkpoint_whose_classes_have_other_names(named_run, tmp_path, capsys, option):
    renamed = make_folder(tmp_path / "insects", ["ant", "bee"])
    ckpt = str(named_run / "run" / "best.pt")
    args = ["train", "tiny_resnet_14", *ARGS, "--data", str(renamed), "--out", str(tmp_path / "r"), option, ckpt]
    assert main(args) == 2
    assert "class 0 named 'cat' but insects names it 'ant'" in one_line_error(capsys)
    assert not (tmp_path / "r" / "last.pt").exists()
    same = ["train", "tiny_resnet_14", *ARGS, "--data", str(named_run / "cats"), "--out", str(tmp_path / "ok")]
    assert main([*same, option, ckpt]) == 0  # the same names in the same order: accepted


def test_hidden_folders_and_files_are_no_classes_and_no_images(tmp_path) -> None:
    data = make_folder(tmp_path / "d", ["a", "b"])
    (data / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(data / "train" / ".ipynb_checkpoints" / "x.png")
    (data / "train" / "a" / "._0.png").write_bytes(b"AppleDouble, not a PNG")
    files, labels, classes = list_folder(data / "train")
    assert classes == ["a", "b"] and len(files) == 16 and labels.count(0) == 8


def test_eval_limits_the_train_split_as_calibrate_does(named_run, capsys) -> None:
    ckpt, data = str(named_run / "run" / "best.pt"), str(named_run / "cats")
    capsys.readouterr()
    assert main(["eval", ckpt, "--data", data, "--split", "train", "--limit", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 5


def test_eval_of_a_missing_validation_split_names_the_option_that_carves_one(named_run, capsys) -> None:
    ckpt, data = str(named_run / "run" / "best.pt"), str(named_run / "cats")
    capsys.readouterr()
    assert main(["eval", ckpt, "--data", data, "--split", "val"]) == 2
    line = one_line_error(capsys)
    assert "no validation split" in line and "skipnet train --val-split" in line


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_16_bit_photo_for_a_large_network_is_scaled_not_clipped_to_white(tmp_path) -> None:
    """``convert("RGB")`` clips 16-bit gray to 255: the large-image path (predict, and the ImageFolder loader
    of training and evaluation) read such a photo as white."""
    from skipnet.data.decode import pil_loader
    from skipnet.predict import load_image

    gray8 = np.random.default_rng(0).integers(0, 256, (90, 120), dtype=np.uint8)
    gray16 = Image.fromarray(gray8.astype(np.uint16) * 257)
    assert gray16.mode.startswith("I")
    eight, sixteen = load_image(_png(Image.fromarray(gray8)), 3, 72), load_image(_png(gray16), 3, 72)
    assert torch.equal(eight, sixteen) and sixteen.min() < 0.5
    (tmp_path / "g16.png").write_bytes(_png(gray16))
    assert np.array_equal(np.asarray(pil_loader(str(tmp_path / "g16.png")))[..., 0], gray8)


def test_an_image_far_longer_than_wide_is_unreadable_not_gigabytes(tmp_path) -> None:
    """Resizing its short side to ~82 px made a 300,000 x 1 PNG of a few hundred bytes gigabytes long."""
    from skipnet.data.decode import pil_loader
    from skipnet.predict import Unreadable, load_image

    thin = Image.new("RGB", (100_000, 1))
    with pytest.raises(Unreadable, match="long side over 64 times its short side"):
        load_image(_png(thin), 3, 72)
    (tmp_path / "thin.png").write_bytes(_png(thin))
    with pytest.raises(ValueError, match="long side over"):
        pil_loader(str(tmp_path / "thin.png"))
    assert load_image(_png(Image.new("RGB", (640, 90))), 3, 72).shape == (3, 72, 72)  # 7:1 is a photo


def test_a_library_warning_reaches_a_command_line_user_as_one_line(capsys, monkeypatch) -> None:
    """Not Python's ``/abs/path/x.py:12: UserWarning: ...`` and the source line under it."""
    import warnings

    def run(args) -> int:
        warnings.warn("the rewrite does not apply\nrunning it as written", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr("skipnet.commands.eval.run", run)
    assert main(["eval", "x.pt", "--data", "digits"]) == 0
    assert capsys.readouterr().err == "skipnet eval: warning: the rewrite does not apply running it as written\n"


# ---------------------------------------------------------------------------------------------- round 7
def test_a_val_split_of_no_image_an_empty_data_and_several_data_sets_are_refused(tmp_path) -> None:
    from skipnet.data import load_data
    from skipnet.data.bundle import _carve_val
    from skipnet.errors import SkipnetError

    assert len(_carve_val(240, 0.001)[1]) == 0 and len(_carve_val(240, 0.005)[1]) == 1
    with pytest.raises(SkipnetError, match="--data is empty"):
        load_data("")
    make_folder(tmp_path / "multi" / ".Trash-1000", ["x", "y"])  # hidden: no data set
    make_folder(tmp_path / "multi" / "a", ["x", "y"])
    make_folder(tmp_path / "multi" / "b", ["x", "y"])
    with pytest.raises(SkipnetError, match=r"holds 2 ImageFolder roots \(a, b\)"):
        load_data(str(tmp_path / "multi"))
    assert load_data(str(tmp_path / "multi" / "b")).num_classes == 2


def test_training_refuses_a_val_split_of_no_image(named_run, tmp_path, capsys) -> None:
    """round(16 * 0.01) = 0: validation was silently off and best.pt the last step (a checkpoint so trained
    earlier is still evaluated: only training refuses)."""
    args = ["train", "tiny_resnet_14", *ARGS, "--data", str(named_run / "cats"), "--out", str(tmp_path / "r")]
    assert main([*args, "--val-split", "0.01"]) == 2
    assert "--val-split 0.01 of 16 training images is no image" in one_line_error(capsys)


def test_resume_without_the_chosen_best_checkpoint_is_refused_before_training(named_run, tmp_path, capsys) -> None:
    """It trained the whole schedule, then failed testing best.pt, on every rerun."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(named_run / "run", run)
    (run / "summary.json").unlink()
    (run / "best.pt").unlink()
    args = ["train", "tiny_resnet_14", *ARGS, "--val-split", "0", "--data", str(named_run / "cats"), "--out", str(run)]
    assert main([*args, "--resume", "--iters", "6"]) == 2
    assert "best.pt, the checkpoint this run chose so far, cannot be read" in one_line_error(capsys)
    assert not (run / "summary.json").exists()


def test_checkpoints_and_exports_refuse_a_threshold_no_reader_takes(tmp_path) -> None:
    from skipnet.checkpoint import load_model, save_checkpoint
    from skipnet.errors import SkipnetError
    from skipnet.export import export_model

    model = GatedResNet(get_config("tiny_aig_gate_14")).eval()
    model.threshold = 1.5
    with pytest.raises(SkipnetError, match="must lie in"):
        save_checkpoint(tmp_path / "t.pt", model)
    model.threshold = 1.01  # calibrate's all-skip point: a checkpoint may hold it, an exported graph not
    save_checkpoint(tmp_path / "all_skip.pt", model)
    with pytest.raises(SkipnetError, match="all-skip point"):
        export_model(model, "onnx")
    model.threshold = 0.5
    with pytest.raises(SkipnetError, match="threshold nan must lie in"):
        export_model(model, "onnx", threshold=float("nan"))
    save_checkpoint(tmp_path / "m.safetensors", model, data={"mean": [0.5] * 3, "std": [0.25] * 3})
    loaded, ckpt = load_model(tmp_path / "m.safetensors")  # a real safetensors file, not a torch zip so named
    assert ckpt["threshold"] == 0.5 and all(
        torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items()
    )
    with pytest.raises(SkipnetError, match="is a directory"):
        save_checkpoint(tmp_path, model)


def test_a_large_image_epoch_is_the_same_however_the_run_got_to_it(tmp_path) -> None:
    """A run resumed inside an epoch replays its batches: the random crops drew from the process's stream (and the
    order from a generator the DataLoader also drew from), so the resumed run trained on other images."""
    from skipnet.data import load_data

    data = make_folder(tmp_path / "big", ["a", "b"], side=80, per_class=6)
    batches = []
    for warm in (True, False):  # a run that went through epoch 0, and one that starts at epoch 1 (resumed)
        train = load_data(str(data), batch_size=4, image_size=72, workers=0, val_split=0).train
        if warm:
            train.set_epoch(0)
            list(train)
        torch.manual_seed(123 if warm else 456)  # the training step's stream must not matter
        train.set_epoch(1)
        batches.append(list(train))
    assert len(batches[0]) == 3
    for (x0, y0), (x1, y1) in zip(*batches, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    train.set_epoch(2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches[1], list(train), strict=True))  # epochs differ


def test_init_of_another_class_count_is_one_line_not_a_traceback(named_run, tmp_path, capsys) -> None:
    """One class list a prefix of the other: the name check found no differing name (StopIteration)."""
    more = make_folder(tmp_path / "more", ["cat", "dog", "fox"])
    args = ["train", "tiny_resnet_14", *ARGS, "--data", str(more), "--out", str(tmp_path / "r")]
    assert main([*args, "--init", str(named_run / "run" / "best.pt")]) == 2
    assert "was trained for 2 classes but more has 3" in one_line_error(capsys)


def test_a_hidden_folder_inside_a_class_folder_is_no_image_on_the_large_path(tmp_path) -> None:
    from skipnet.data.loaders import image_folder

    data = make_folder(tmp_path / "big", ["a", "b"], side=72, per_class=3)
    (data / "train" / "a" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (72, 72)).save(data / "train" / "a" / ".ipynb_checkpoints" / "0-checkpoint.png")
    assert len(image_folder(data / "train", None, ["a", "b"]).folder.samples) == 6


def test_eval_of_a_large_image_training_split_smaller_than_a_batch(tmp_path, capsys) -> None:
    """The training loader drops its last partial batch and crops at random: eval --split train crashed on a split
    under one batch (torch.cat of nothing) and scored random crops."""
    data = make_folder(tmp_path / "big", ["a", "b"], side=72, per_class=5)
    out = tmp_path / "run"
    args = ["train", "tiny_resnet_14", *ARGS, "--val-split", "0", "--batch-size", "8", "--workers", "0"]
    assert main([*args, "--data", str(data), "--out", str(out)]) == 0
    capsys.readouterr()
    runs = []
    for _ in range(2):
        assert (
            main(
                ["eval", str(out / "best.pt"), "--data", str(data), "--split", "train", "--batch-size", "64", "--json"]
            )
            == 0
        )
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["images"] == 10 and runs[0]["loss"] == runs[1]["loss"]  # every image, no random crop
