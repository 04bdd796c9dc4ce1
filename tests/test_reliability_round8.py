"""Faults found in the eighth hostile round, each fixed: a validation split carved again from other data, a
calibrated threshold on a gate probability's edge, the all-skip export advice, bench's --data and --images, and
class names in another Unicode normal form."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import one_line_error, trained_like
from skipnet.analysis import calibrate_threshold
from skipnet.checkpoint import load_checkpoint, save_checkpoint
from skipnet.cli import main
from skipnet.cost import cost_model
from skipnet.data import load_data
from skipnet.errors import SkipnetError
from skipnet.evaluate import run_eval
from skipnet.gated import GateMode
from skipnet.registry import create_model
from skipnet.rundir import data_fingerprint

CLASSES = ["apple", "zebra", "éclair"]  # NFC, in folder order (by code point); decomposed (NFD) é sorts first
SIZE = 16


def _images(folder: Path, label: int, count: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        colour = (40 + 70 * label, (37 * i) % 256, 200 - 60 * label)
        Image.new("RGB", (SIZE, SIZE), colour).save(folder / f"{i:03d}.png")


def _folder(root: Path, classes: list[str] = CLASSES, train: int = 8, test: int = 3) -> Path:
    for c, name in enumerate(classes):
        _images(root / "train" / name, c, train)
        _images(root / "test" / name, c, test)
    return root


def _checkpoint(path: Path, folder: Path, fingerprint: str = "new", val_split: float = 0.25) -> Path:
    """A tiny AIG-gated SkipNet as if trained on ``folder`` with a ``val_split`` validation split, recording the
    data fingerprint of that run (``new``: as this version records it, ``old``: before the training and validation
    labels had a digest of their own, ``none``: no fingerprint)."""
    model = create_model("tiny_aig_gate_14", num_classes=len(CLASSES), image_size=SIZE).eval()
    bundle = load_data(str(folder), val_split=val_split)
    extra = {}
    if fingerprint != "none":
        record = data_fingerprint(bundle)
        if fingerprint == "old":
            record.pop("train_val_labels_sha256")
        extra["data_fingerprint"] = record
    cfg = {"stage": "sp", "val_split": val_split, "limit_train": None, "limit_test": None}
    save_checkpoint(path, model, data=bundle.meta() | {"val_split": val_split}, train_config=cfg, extra=extra, step=1)
    return path


@pytest.fixture
def trained(tmp_path, monkeypatch) -> dict[str, Path]:
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    folder = _folder(tmp_path / "A")
    more = tmp_path / "D2"  # the training folder with a few images added
    shutil.copytree(folder, more)
    for c, name in enumerate(CLASSES):
        _images(more / "train" / name, c, 2, start=50)
    return {"A": folder, "D2": more, "ckpt": _checkpoint(tmp_path / "sp.pt", folder)}


# ------------------------------------------------------------------------ 1. the validation split of other data
def test_the_validation_split_of_other_training_images_is_refused_everywhere(trained, tmp_path, capsys) -> None:
    ckpt, d2 = str(trained["ckpt"]), str(trained["D2"])
    assert main(["eval", ckpt, "--data", str(trained["A"]), "--split", "val", "--json"]) == 0
    capsys.readouterr()
    runs = {
        "eval": ["eval", ckpt, "--data", d2, "--split", "val"],
        "calibrate": ["calibrate", ckpt, "--data", d2, "--target-reduction", "10", "--out", str(tmp_path / "c.pt")],
        "analyze": ["analyze", ckpt, "--data", d2, "--split", "val", "--out", str(tmp_path / "an")],
    }
    for command, argv in runs.items():
        assert main(argv) == 2, command
        err = one_line_error(capsys, command)
        assert f"--data {d2} is not the data {ckpt} was trained on" in err
        assert "train images 22, recorded 18" in err and "may include images the checkpoint trained on" in err
        assert ("--split train" if command == "calibrate" else "--split test") in err
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "an").exists()
    assert main(["eval", ckpt, "--data", d2, "--split", "test", "--json"]) == 0  # its test split is its own
    # a seeded subset of the validation split (--limit) is compared as the run took its data
    assert main(["eval", ckpt, "--data", str(trained["A"]), "--split", "val", "--limit", "2", "--json"]) == 0
    assert main(["eval", ckpt, "--data", d2, "--split", "val", "--limit", "2"]) == 2
    assert "train images 22, recorded 18" in one_line_error(capsys, "eval")


def test_analyze_scores_each_compared_checkpoint_on_its_own_validation_split(trained, tmp_path, capsys) -> None:
    """``analyze --split val --compare/--base``: a checkpoint trained without a validation split (or with another)
    is not scored on the analysed checkpoint's validation images, which it may have trained on."""
    ckpt, data = str(trained["ckpt"]), str(trained["A"])
    no_val = str(_checkpoint(tmp_path / "no_val.pt", trained["A"], val_split=0.0))
    other = str(_checkpoint(tmp_path / "other.pt", trained["A"], val_split=0.5))
    for flag, path in [("--compare", no_val), ("--base", no_val)]:
        argv = ["analyze", ckpt, "--data", data, "--split", "val", flag, path, "--out", str(tmp_path / "an")]
        assert main(argv) == 2, flag
        assert "validation" in one_line_error(capsys, "analyze") and not (tmp_path / "an").exists()
    argv = ["analyze", ckpt, "--data", data, "--split", "val", "--compare", other, "--out", str(tmp_path / "an2")]
    assert main([*argv, "--json"]) == 0
    capsys.readouterr()
    numbers = json.loads((tmp_path / "an2" / "analysis.json").read_text())
    assert numbers["main"]["images"] == 6 and numbers["others"][0]["images"] == 12  # 25% and 50% of 24


def test_relabelled_training_images_are_refused_and_another_test_set_is_not(trained, tmp_path, capsys) -> None:
    swapped = tmp_path / "swapped"  # as many training images, one of them in another class
    shutil.copytree(trained["A"], swapped)
    (swapped / "train" / CLASSES[0] / "000.png").rename(swapped / "train" / CLASSES[2] / "100.png")
    old = _checkpoint(tmp_path / "old.pt", trained["A"], fingerprint="old")
    for ckpt in (trained["ckpt"], old):
        assert main(["eval", str(ckpt), "--data", str(swapped), "--split", "val"]) == 2
        assert "labels of its" in one_line_error(capsys, "eval")
    other_test = tmp_path / "other_test"  # another test set (other size) beside the same training images
    shutil.copytree(trained["A"], other_test)
    for c, name in enumerate(CLASSES):
        _images(other_test / "test" / name, c, 2, start=80)
    for ckpt in (trained["ckpt"], old):
        assert main(["eval", str(ckpt), "--data", str(other_test), "--split", "val", "--json"]) == 0
    capsys.readouterr()


def test_checkpoints_without_a_fingerprint_and_exports_of_one(trained, tmp_path, capsys) -> None:
    bare = _checkpoint(tmp_path / "bare.pt", trained["A"], fingerprint="none")
    assert main(["eval", str(bare), "--data", str(trained["D2"]), "--split", "val", "--json"]) == 0
    # a safetensors export (and calibrate's) carries the fingerprint and the subsets it was taken of
    exported = tmp_path / "sp.safetensors"
    assert main(["export", str(trained["ckpt"]), str(exported)]) == 0
    loaded = load_checkpoint(exported)
    assert loaded["data_fingerprint"] == load_checkpoint(trained["ckpt"])["data_fingerprint"]
    assert main(["eval", str(exported), "--data", str(trained["D2"]), "--split", "val"]) == 2
    assert "train images 22, recorded 18" in one_line_error(capsys, "eval")
    assert main(["eval", str(exported), "--data", str(trained["A"]), "--split", "val", "--json"]) == 0


# ------------------------------------------------------------------------ 2. a calibrated threshold in its gap
def _constant_gates(probs: list[float]):
    """tiny_feedforward_14 whose gate ``i`` gives probability ``probs[i]`` to every image (zero weights)."""
    model = trained_like("tiny_feedforward_14")
    with torch.no_grad():
        for gate, p in zip(model.gates.gates, probs, strict=True):
            gate.fc.weight.zero_()
            gate.fc.bias.fill_(math.log(p / (1 - p)))
    return model


def test_calibration_with_fine_bisection_puts_the_threshold_in_the_middle_of_its_gap() -> None:
    probs = [0.88, 0.66, 0.45, 0.33, 0.12]
    model = _constant_gates(probs)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(2)]
    cost = cost_model(model)
    # labelled as the model classifies them when gates 0 and 1 run: the most accurate routes meet the budget
    loader = [(x, model(x, "greedy", threshold=0.5).logits.argmax(1)) for x in images]
    target = float(cost.macs_per_image(torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]), include_gates=True))
    result = calibrate_threshold(model, loader, cost, target, grid=[0.0, 0.25, 0.5, 0.75, 1.0], refine=20)
    middle = 1 / (1 + math.exp(-0.5 * (math.log(0.45 / 0.55) + math.log(0.66 / 0.34))))
    assert result.threshold == pytest.approx(middle, abs=1e-6)  # before: 0.45 + 2e-7, on gate 2's probability
    assert min(abs(result.threshold - p) for p in probs) > 0.05
    edge = min(p["threshold"] for p in result.points if p["macs_mean"] <= target)  # where bisection stopped
    assert edge - 0.45 < 1e-5
    at_edge, at_t = (run_eval(model, loader, cost, mode=GateMode.GREEDY, threshold=t) for t in (edge, result.threshold))
    assert torch.equal(at_edge.decisions, at_t.decisions) and torch.equal(at_edge.macs, at_t.macs)
    assert torch.equal(at_edge.preds, at_t.preds) and result.macs_mean == pytest.approx(float(at_t.macs.mean()))


def test_a_recurrent_gate_calibrated_finely_decides_alike_at_every_batch_size() -> None:
    model = trained_like("tiny_rnn_gate_14", seed=3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    y = model(x, "greedy", threshold=0.53).logits.argmax(1)  # the routes near 0.53 are the most accurate
    cost = cost_model(model)
    target = cost.min_macs + 0.5 * (cost.total_macs_all_on - cost.min_macs)
    result = calibrate_threshold(model, [(x, y)], cost, target, grid=[0.0, 0.25, 0.5, 0.75, 1.0], refine=20)
    t = result.threshold
    p = run_eval(model, [(x, y)], cost, mode=GateMode.GREEDY, threshold=t).probs.flatten()
    lo, hi = float(p[p < t].max()), float(p[p >= t].min())
    logit = lambda v: math.log(v / (1 - v))  # noqa: E731
    assert logit(t) == pytest.approx(0.5 * (logit(lo) + logit(hi)), abs=1e-4)  # before: within 1e-7 of lo
    ones = run_eval(model, [(x[i : i + 1], y[i : i + 1]) for i in range(16)], cost, mode="greedy", threshold=t)
    whole = run_eval(model, [(x, y)], cost, mode=GateMode.GREEDY, threshold=t)
    assert torch.equal(ones.decisions, whole.decisions) and torch.equal(ones.preds, whole.preds)


def test_a_budget_above_the_grid_is_bisected_towards_one_before_all_skip() -> None:
    """``--grid 0.5`` and a budget met only above 0.5: a threshold below 1 that meets it, not the all-skip point (0%
    of the gated blocks, no export)."""
    probs = [0.88, 0.66, 0.45, 0.33, 0.12]
    model = _constant_gates(probs)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loader = [(x, model(x, "greedy", threshold=0.8).logits.argmax(1))]
    cost = cost_model(model)
    target = float(cost.macs_per_image(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]]), include_gates=True))
    result = calibrate_threshold(model, loader, cost, target, grid=[0.5], refine=8)
    assert 0.66 < result.threshold < 1.0 and result.macs_mean <= target  # before: 1.01, the all-skip point
    assert 1.0 in [p["threshold"] for p in result.points]


def test_the_all_skip_threshold_read_back_as_float32_is_taken() -> None:
    import numpy as np

    model = create_model("tiny_rnn_gate_14").eval()
    x = torch.randn(2, 3, 32, 32)
    for t in (np.float32(1.01), torch.tensor(1.01), float(torch.tensor(1.01))):  # 1.0099999904632568
        assert model(x, threshold=t).trace.decisions.sum() == 0
    with pytest.raises(SkipnetError, match="threshold"):
        model(x, threshold=1.02)


def test_gap_threshold_at_the_edges() -> None:
    from skipnet.analysis import gap_threshold

    probs = torch.tensor([0.2, 0.3, 0.6])
    assert gap_threshold(probs, 0.45) == pytest.approx(1 / (1 + math.exp(-0.5 * (math.log(3 / 7) + math.log(1.5)))))
    assert 0.0 <= gap_threshold(probs, 0.1) < 0.2 and 0.6 < gap_threshold(probs, 0.9) <= 1.0  # one-sided gaps
    assert gap_threshold(probs, 1.01) == 1.01  # the all-skip point stays
    a = torch.tensor(0.5)
    b = torch.nextafter(a, torch.tensor(1.0))  # no float32 between them: only b itself separates them
    assert gap_threshold(torch.stack([a, b]), float(b)) == float(b)
    assert gap_threshold(torch.tensor([0.0, 1.0]), 0.5) == pytest.approx(0.5)


# ------------------------------------------------------------------------ 3. exporting the all-skip point
@pytest.mark.parametrize("graph", [[], ["--graph", "plain"]])
def test_an_all_skip_checkpoint_export_advises_what_works(graph, tmp_path, capsys) -> None:
    model = create_model("tiny_rnn_gate_14")
    model.threshold = 1.01
    save_checkpoint(tmp_path / "all_skip.pt", model, data={"mean": [0.5] * 3, "std": [0.25] * 3})
    assert main(["export", str(tmp_path / "all_skip.pt"), str(tmp_path / "x.pt2"), *graph]) == 2
    err = one_line_error(capsys, "export")
    assert "all-skip point" in err and "--threshold T <= 1" in err and "calibrate again" in err
    assert "--graph plain would run every block instead" in err and "; export --graph plain" not in err
    assert not (tmp_path / "x.pt2").exists()


# ------------------------------------------------------------------------ 4. bench --data and --images
def test_bench_refuses_data_of_other_class_names_as_its_onnx_twin_does(trained, tmp_path, capsys) -> None:
    other = _folder(tmp_path / "other", ["car", "dog", "fox"])
    ckpt = str(trained["ckpt"])
    argv = ["bench", ckpt, "--data", str(other), "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
    assert main(argv) == 2
    err = one_line_error(capsys, "bench")
    assert "class 0 named 'apple' but other names it 'car'" in err
    from skipnet.bench_onnx import data_images

    loaded = load_checkpoint(ckpt)
    meta = {"arch": loaded["arch"], "image_size": SIZE, "classes": loaded["data"]["classes"], "prepare": "resize"}
    with pytest.raises(SkipnetError) as onnx_side:
        data_images(ckpt, meta, str(other), None, 2)
    assert err == f"skipnet bench: error: {onnx_side.value}"


def test_bench_images_counts_batches_as_its_help_and_errors_say(capsys) -> None:
    from skipnet.cli import build_parser
    from skipnet.commands import bench

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    shown = " ".join(sub.choices["bench"].format_help().split())
    assert "BATCHES of --batch-size distinct images per round" in shown
    args = argparse.Namespace(images=None, batch_size=16, data="A")
    assert bench._whole_batches(args, 60, 128) == 48  # the default fits the test split: 3 batches of 16
    with pytest.raises(SkipnetError, match=r"--images 32 batches x --batch-size 16 = 512; pass --images 3"):
        bench._whole_batches(argparse.Namespace(images=32, batch_size=16, data="A"), 60, 512)
    with pytest.raises(SkipnetError, match="fewer than one batch of --batch-size 100; pass --batch-size 60"):
        bench._whole_batches(argparse.Namespace(images=None, batch_size=100, data="A"), 60, 800)
    assert main(["bench", "tiny_rnn_gate_14", "--images", "4"]) == 2
    assert "--images applies to --runtime onnxruntime" in one_line_error(capsys, "bench")


# ------------------------------------------------------------------------ 5. class names in another normal form
def test_class_names_in_another_unicode_normal_form_are_named_so(trained, tmp_path, capsys) -> None:
    nfd = _folder(tmp_path / "A_nfd", [unicodedata.normalize("NFD", c) for c in CLASSES])
    assert main(["eval", str(trained["ckpt"]), "--data", str(nfd)]) == 2
    err = one_line_error(capsys, "eval")
    assert "differing only in Unicode normal form (NFD" in err and "checkpoint's NFC" in err
    assert "rename A_nfd's class folders to NFC" in err
    other = _folder(tmp_path / "other", ["apple", "eclair", "zebra"])  # another name still reads as one
    assert main(["eval", str(trained["ckpt"]), "--data", str(other)]) == 2
    err = one_line_error(capsys, "eval")  # class folders sort by code point: é after z
    assert "class 1 named 'zebra' but other names it 'eclair'" in err and "Unicode" not in err
