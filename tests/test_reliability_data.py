"""Hostile data: a damaged .tar.gz is refused (not extracted in part and cached), and a decompression-bomb image
(a tiny file declaring hundreds of megapixels) is skipped in both image paths without being decoded."""

from __future__ import annotations

import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import patience
from skipnet import SkipnetError
from skipnet.data import SafeFolder, _image_folder, load_data


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))


def make_folder(root: Path, n: int = 4, size: int = 16) -> Path:
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (size, size, 3)).astype(np.uint8)).save(d / f"{i}.png")
    return root


def bomb_png(path: Path, side: int = 14_000) -> Path:
    """A PNG whose header declares side x side pixels (196 Mpx by default) and whose data is a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def test_damaged_tar_gz_is_refused_and_not_cached(tmp_path) -> None:
    root = make_folder(tmp_path / "imgs", n=30)
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    raw = bytearray(archive.read_bytes())
    for i in range(len(raw) - 60, len(raw) - 28):  # 32 bytes near the end, as the tester did
        raw[i] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(SkipnetError, match=r"cannot extract .*imgs\.tar\.gz .*download or copy it again") as exc:
        load_data(str(archive), batch_size=4, val_split=0.0)
    assert "\n" not in str(exc.value)
    extracted = tmp_path / "cache" / "extracted"
    assert not extracted.exists() or not any(extracted.iterdir())  # nothing half-extracted is kept (or cached)


def test_intact_tar_gz_still_loads(tmp_path) -> None:
    root = make_folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    bundle = load_data(str(archive), batch_size=4, val_split=0.0)
    assert bundle.info["train_images"] == 8 and bundle.info["test_images"] == 8


@pytest.mark.parametrize("first", [True, False], ids=["bomb-first", "bomb-later"])
def test_bomb_image_is_skipped_in_the_small_image_path(tmp_path, caplog, first) -> None:
    root = make_folder(tmp_path / "imgs")
    bomb = bomb_png(root / "train" / "a" / ("0.png" if first else "9.png"))
    assert bomb.stat().st_size < 1000
    caplog.set_level("WARNING")
    bundle = load_data(str(root), batch_size=4, val_split=0.0)
    files = 8 if first else 9
    assert bundle.info["train_images"] == files - 1
    said = [r.getMessage() for r in caplog.records]
    assert any(f"skipped 1 of {files} images" in m and bomb.name in m for m in said), said


def test_bomb_image_is_skipped_in_the_large_image_path(tmp_path) -> None:
    root = make_folder(tmp_path / "imgs", size=80)  # larger than the cached small-image path takes
    bomb_png(root / "train" / "a" / "1.png")
    folder = _image_folder(root / "train", None, ["a", "b"])
    assert isinstance(folder, SafeFolder)
    index = [p for p, _ in folder.folder.samples].index(str(root / "train" / "a" / "1.png"))
    image, label = folder[index]  # a marker the loader drops (never another image in its place), with a warning
    assert image is None and label == -1 - index and str(root / "train" / "a" / "1.png") in folder.bad


def _resolve_in_child(archive: str, cache: str, queue) -> None:
    import os

    os.environ["SKIPNET_CACHE"] = cache
    from skipnet.data import resolve_folder

    root = resolve_folder(Path(archive))
    queue.put(sorted(str(p.relative_to(root)) for p in root.rglob("*.png")))


def test_two_processes_extract_one_archive_at_once(tmp_path) -> None:
    """Two commands started together on a fresh cache (two runs, or pytest-xdist workers) each get the whole data
    set: each extracts into its own directory and renames it into place; no half-extracted copy is ever read."""
    import multiprocessing as mp

    root = make_folder(tmp_path / "imgs", n=60)
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(str(archive), str(tmp_path / "c"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=patience(120)) for _ in procs]
    for p in procs:
        p.join(patience(60))
        assert p.exitcode == 0
    assert all(g == got[0] for g in got) and len(got[0]) == 2 * 2 * 60
    left = list((tmp_path / "c" / "extracted").iterdir())
    assert len(left) == 1 and (left[0] / ".complete").exists()  # no temporary directory left behind


def test_leftover_of_a_killed_extraction_is_replaced(tmp_path) -> None:
    from skipnet.data import resolve_folder

    root = make_folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    first = resolve_folder(archive)
    dest = next((tmp_path / "cache" / "extracted").iterdir())
    (dest / ".complete").unlink()  # as if killed before it finished
    next(first.rglob("*.png")).unlink()
    again = resolve_folder(archive)
    assert len(list(again.rglob("*.png"))) == 16 and (dest / ".complete").exists()


def _test_labels(root: Path) -> tuple[list[str], list[int]]:
    bundle = load_data(str(root), batch_size=4, val_split=0.0)
    loader = bundle.split("test")
    return list(bundle.classes), [int(y) for _, ys in loader for y in ys]


def test_a_new_training_class_relabels_the_cached_test_split(tmp_path) -> None:
    """Issue 33: train/{a,b}, test/{a,b}; then train/0new/ is added. The test split's files are unchanged, but its
    labels index the training class list, which changed: the decoded-image cache must not hand back the old
    labels (test accuracy 0.00% with the warm cache, 100.00% with a fresh one)."""
    root = make_folder(tmp_path / "imgs")
    classes, labels = _test_labels(root)
    assert classes == ["a", "b"] and sorted(labels) == [0] * 4 + [1] * 4
    new = root / "train" / "0new"
    new.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(new / f"{i}.png")
    classes, labels = _test_labels(root)  # the same cache directory, now warm
    assert classes == ["0new", "a", "b"]
    assert sorted(labels) == [1] * 4 + [2] * 4
    # and back: removing the class again gives the first labels, not the second run's
    for f in new.iterdir():
        f.unlink()
    new.rmdir()
    assert sorted(_test_labels(root)[1]) == [0] * 4 + [1] * 4


def _resave(root: Path, split: str, size: tuple[int, int]) -> None:
    """Every image of ``split`` resized to ``size`` (width, height)."""
    for f in (root / split).rglob("*.png"):
        Image.open(f).resize(size).save(f)


@pytest.mark.parametrize(
    "case, match", [("test", "under .*test are 12x12 px, those under .*train 16x16"), ("wide", "16 px wide and 8 high")]
)
def test_splits_of_another_size_or_not_square_are_refused(tmp_path, case, match) -> None:
    """A folder's network size and cost come from one image size: a test split of another size (it was tested at
    a size it never trained on, and costed at the training size) or non-square images (costed at their width) are
    refused in one line, and --image-size resizes both splits to one square size."""
    root = make_folder(tmp_path / "d")
    if case == "test":
        _resave(root, "test", (12, 12))
    else:
        for split in ("train", "test"):
            _resave(root, split, (16, 8))
    with pytest.raises(SkipnetError, match=match):
        load_data(str(root), batch_size=4)
    assert "--image-size" in str(pytest.raises(SkipnetError, load_data, str(root), batch_size=4).value)
    data = load_data(str(root), batch_size=4, image_size=16)
    assert data.image_size == 16 and next(iter(data.test))[0].shape[-2:] == (16, 16)


def test_a_failed_download_and_an_unread_archive_say_what_is_true(tmp_path, monkeypatch) -> None:
    """--download given: the message does not ask for --download; a .zip names the archives read."""
    import torchvision.datasets as tvd

    def offline(*_, **__):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(SkipnetError, match="could not be downloaded") as err:
        load_data("cifar10", data_dir=str(tmp_path), download=True)
    assert "pass --download" not in str(err.value)
    with pytest.raises(SkipnetError, match="pass --download"):
        load_data("cifar10", data_dir=str(tmp_path), download=False)
    (tmp_path / "images.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(SkipnetError, match=r"archives read are \.tar, \.tar\.gz and \.tgz"):
        load_data(str(tmp_path / "images.zip"))
