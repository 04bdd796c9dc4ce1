"""Faults of the eighth hostile round in how a folder becomes images, each fixed: one listing of a split for both
paths (recursive, linked folders followed, loops skipped, hidden skipped), which ``skipnet predict`` walks alike;
corrupt large images skipped, never counted twice; class folders not named in UTF-8 refused; image names that are
not UTF-8 written; zip names of Info-ZIP read as UTF-8."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from skipnet.checkpoint import save_checkpoint
from skipnet.cli import main
from skipnet.data import FolderLoader, TensorLoader, load_data
from skipnet.data.folders import list_folder
from skipnet.errors import SkipnetError
from skipnet.predict import expand_inputs, iter_inputs
from skipnet.registry import create_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))  # decoded splits of this test's folders only


def _image(path: Path, side: int, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (shade, 255 - shade, 90)).save(path)
    return path


def _folder(root: Path, side: int, per_class: int = 3, classes=("a", "b", "c")) -> Path:
    for split in ("train", "test"):
        for k, c in enumerate(classes):
            for i in range(per_class):
                _image(root / split / c / f"{i}.png", side, 40 * k + 10 * i)
    return root


def _names(loader: FolderLoader) -> list[str]:
    folder = loader.dataset.dataset.folder
    return [Path(folder.samples[i][0]).relative_to(folder.root).as_posix() for i in loader.dataset.indices]


# ------------------------------------------------------------------------------- 1. one listing of a split
def test_a_small_image_split_holds_the_images_of_its_class_folders_sub_folders(tmp_path, caplog) -> None:
    root = _folder(tmp_path / "F", side=12)
    (root / "train" / "b" / "batch2").mkdir()
    os.rename(root / "train" / "b" / "0.png", root / "train" / "b" / "batch2" / "0.png")
    for i in range(3):  # every test image of class c nested: the class folder does hold images
        _image(root / "test" / "c" / "sub" / "deeper" / f"{i}.png", 12, 200)
        (root / "test" / "c" / f"{i}.png").unlink()
    with caplog.at_level(logging.WARNING, logger="skipnet.data"):
        bundle = load_data(str(root), batch_size=2)
    assert isinstance(bundle.test, TensorLoader)
    assert bundle.info == {"train_images": 9, "val_images": 0, "test_images": 9}
    assert bundle.test.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert "hold no images" not in caplog.text


def test_both_paths_read_the_same_images_and_a_link_loop_is_skipped(tmp_path, caplog) -> None:
    root = _folder(tmp_path / "GL", side=72)
    (root / "test" / "a" / "loop").symlink_to("..")  # test/a/loop/a/loop/...: every class's images as class a
    (root / "train" / "b" / "batch2").mkdir()
    os.rename(root / "train" / "b" / "0.png", root / "train" / "b" / "batch2" / "0.png")
    _image(root / "train" / "a" / ".ipynb_checkpoints" / "0-checkpoint.png", 72, 0)  # hidden: no image
    _image(root / "train" / "c" / "._0.png", 72, 0)
    os.mkfifo(root / "train" / "c" / "batch2.png")  # not a regular file: a worker would block on it for ever
    elsewhere = _image(tmp_path / "elsewhere" / "d" / "0.png", 72, 30).parent
    (root / "test" / "c" / "more").symlink_to(elsewhere)  # a linked sub-folder is followed
    with caplog.at_level(logging.WARNING, logger="skipnet.data"):
        crop = load_data(str(root), batch_size=2, workers=0, image_size=72)
    assert isinstance(crop.test, FolderLoader)
    assert _names(crop.test) == ["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png"] + [
        "c/0.png",
        "c/1.png",
        "c/2.png",
        "c/more/0.png",
    ]
    assert sorted(_names(crop.train.evaluation)) == sorted(
        ["a/0.png", "a/1.png", "a/2.png", "b/1.png", "b/2.png", "b/batch2/0.png", "c/0.png", "c/1.png", "c/2.png"]
    )
    assert "loop" in caplog.text and "already listed" in caplog.text
    assert sum(len(y) for _, y in crop.test) == 10
    resize = load_data(str(root), batch_size=2, image_size=16, prepare="resize")  # the small-image path
    assert isinstance(resize.test, TensorLoader) and resize.info == crop.info
    assert resize.test.labels.tolist() == [y for _, y in crop.test.dataset.dataset.folder.samples]


def test_predict_walks_a_folder_as_a_split_is_listed(tmp_path) -> None:
    split = tmp_path / "test"
    for i in range(2):
        _image(split / "a" / f"{i}.png", 12, 10 * i)
    _image(split / "a" / "nested" / "2.png", 12, 50)
    _image(split / ".ipynb_checkpoints" / "0-checkpoint.png", 12, 0)  # hidden: read by neither
    _image(split / "a" / ".hidden" / "3.png", 12, 0)
    (split / "a" / "loop").symlink_to("..")
    outside = tmp_path / "outside" / "d"
    for i in range(2):
        _image(outside / f"{i}.png", 12, 100 + i)
    (split / "d").symlink_to(outside)  # a linked class folder: predicted, as evaluation reads it
    os.mkfifo(split / "a" / "fifo.png")
    files, total = expand_inputs([split])
    listed, labels, classes = list_folder(split)
    assert files == listed and total == 5 and classes == ["a", "d"] and labels == [0, 0, 0, 1, 1]
    assert [p.relative_to(split).as_posix() for p in files] == ["a/0.png", "a/1.png", "a/nested/2.png"] + [
        "d/0.png",
        "d/1.png",
    ]


# ---------------------------------------------------------------------- 2. corrupt images skipped, not replaced
def test_a_corrupt_large_image_is_skipped_never_counted_twice(tmp_path, caplog) -> None:
    root = _folder(tmp_path / "G", side=72, per_class=4, classes=("a", "b"))
    (root / "test" / "a" / "0.png").write_bytes((root / "test" / "a" / "1.png").read_bytes()[:60])  # truncated
    (root / "test" / "a" / "1.png").write_bytes(b"not an image at all")
    (root / "test" / "b" / "3.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="skipnet.data"):
        bundle = load_data(str(root), batch_size=2, eval_batch_size=2, workers=0, image_size=72)
        for _ in range(2):  # the first batch (a/0, a/1) has no readable image: skipped, not empty
            batches = list(bundle.test)
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == [0, 0, 1, 1, 1] and all(len(y) for _, y in batches)
    warned = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warned) == 3 and not any("next" in m for m in warned)  # once per file, none replaced


def test_a_training_pass_keeps_its_batch_count_without_repeating_an_image(tmp_path) -> None:
    root = _folder(tmp_path / "T", side=72, per_class=6, classes=("a", "b"))
    bad = ["a/0.png", "a/3.png", "a/5.png", "b/1.png", "b/4.png"]
    for name in bad:
        (root / "train" / name).write_bytes(b"\x89PNG garbage")
    bundle = load_data(str(root), batch_size=2, workers=0, image_size=72, seed=1)
    empty_batches = 0
    for epoch in range(4):
        bundle.train.set_epoch(epoch)
        raw = [y for _, y in bundle.train.loader]
        empty_batches += sum(bool((y < 0).all()) for y in raw)
        first = [(x.clone(), y.clone()) for x, y in bundle.train]
        again = list(bundle.train)  # a resumed run replays the same batches
        assert len(first) == len(bundle.train) == 6  # the training loop counts its steps by them
        assert sorted(torch.cat([y for _, y in first]).tolist()) == [0, 0, 0, 1, 1, 1, 1]  # 12 - 5, each once
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert empty_batches  # the case the split batches make up for happened


def test_a_large_split_with_no_readable_image_is_refused(tmp_path) -> None:
    root = _folder(tmp_path / "Z", side=72, classes=("a", "b"))
    for f in (root / "test").rglob("*.png"):
        f.write_bytes(b"broken")
    bundle = load_data(str(root), batch_size=2, eval_batch_size=2, workers=0, image_size=72)
    with pytest.raises(SkipnetError, match="6 consecutive images under .* could not be decoded"):
        list(bundle.test)


# ------------------------------------------------------------------------------ 3. names that are not UTF-8
@pytest.mark.parametrize("side", [12, 72], ids=["small", "large"])
def test_a_class_folder_not_named_in_utf8_is_one_line(tmp_path, side) -> None:
    root = _folder(tmp_path / "L", side=side, classes=("a", os.fsdecode(b"caf\xe9")))
    with pytest.raises(SkipnetError) as err:
        load_data(str(root), batch_size=2, workers=0)
    assert "'caf\\udce9'" in str(err.value) and "UTF-8" in str(err.value) and "\n" not in str(err.value)


def test_an_image_not_named_in_utf8_is_read_and_written(tmp_path, capsys) -> None:
    root = _folder(tmp_path / "N", side=12, classes=("a", "b"))
    os.rename(root / "train" / "a" / "0.png", root / "train" / "a" / os.fsdecode(b"caf\xe9.png"))
    assert load_data(str(root), batch_size=2).info["train_images"] == 6  # its cache key is made of its bytes
    classes = ["a", os.fsdecode(b"b\xff")] + [f"c{i}" for i in range(8)]  # a record from before the refusal
    model = create_model("tiny_rnn_gate_14").eval()
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, data={"mean": [0.5] * 3, "std": [0.25] * 3, "classes": classes, "image_size": 32})
    images = root / "train" / "a"
    rows = {}
    for suffix in ("csv", "jsonl"):
        out = tmp_path / f"p.{suffix}"
        assert main(["predict", str(ckpt), str(images), "--out", str(out), "--top-k", "10"]) == 0, capsys.readouterr()
        rows[suffix] = out.read_text(encoding="utf-8")
    assert "caf\\xe9.png" in rows["csv"] and "b\\xff" in rows["csv"]
    names = [json.loads(line)["image"] for line in rows["jsonl"].splitlines()]
    assert sum(n.endswith("caf\\xe9.png") for n in names) == 1  # the same text in both formats
    assert '"b\\\\xff"' in rows["jsonl"]


# --------------------------------------------------------------------------------- 4. Info-ZIP member names
def _zip_without_utf8_flag(path: Path, names: list[bytes], png: bytes) -> Path:
    """A zip whose members' raw names are ``names`` and whose UTF-8 flag is clear, as Info-ZIP writes them:
    written under ASCII stand-ins of the same length, which are then replaced in the bytes."""
    stand_ins = [f"{i:0{len(n) - 4}d}.png".encode() for i, n in enumerate(names)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for s in stand_ins:
            z.writestr(s.decode(), png)
    data = path.read_bytes()
    for s, n in zip(stand_ins, names):
        assert data.count(s) == 2  # local header and central directory
        data = data.replace(s, n)
    path.write_bytes(data)
    return path


def test_info_zip_utf8_names_are_read_as_utf8(tmp_path) -> None:
    png = _image(tmp_path / "x.png", 12, 0).read_bytes()
    utf8, cp437 = "éclair/日本.png".encode(), "caf\x82.png".encode("latin-1")  # 0x82: é in cp437
    archive = _zip_without_utf8_flag(tmp_path / "A.zip", [utf8, cp437], png)
    with zipfile.ZipFile(archive) as z:
        assert not any(i.flag_bits & 0x800 for i in z.infolist())
    names = [name for name, data in iter_inputs([archive]) if data == png]
    assert names == [f"{archive}:éclair/日本.png", f"{archive}:café.png"]
