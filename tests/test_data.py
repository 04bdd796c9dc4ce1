"""The data layer (issue 34): splits, seeds and the decoded-image cache are what they were before ``data.py`` was
split into modules (the expected values below were computed with the old module), and the image-folder path of large
images honours ``augment`` and applies ``limit_test`` to the validation split as the tensor path does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipnet.data import load_data


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))


def make_folder(root: Path, side: int, n_train=(7, 5, 6), n_test=(3, 2, 4)) -> Path:
    """A fixed ImageFolder: three classes of noise images, ``side`` pixels square (<= 64: the tensor path)."""
    rng = np.random.RandomState(7)
    for split, counts in (("train", n_train), ("test", n_test)):
        for c, n in zip(("ant", "bee", "cat"), counts):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (side, side, 3)).astype(np.uint8)).save(d / f"{c}{i}.png")
    return root


def tensor_summary(bundle) -> dict:
    """Each split's images (by their pixel sums) and labels, two epochs of training batches, info and stats."""
    out = {}
    for s in ("train", "val", "test"):
        ld = getattr(bundle, s)
        out[s] = None if ld is None else ([int(x.sum()) for x in ld.images], ld.labels.tolist())
    batches = []
    for ep in (0, 1):
        bundle.train.set_epoch(ep)
        batches.append([(y.tolist(), round(float(x.double().sum()), 2)) for x, y in bundle.train])
    out["batches"], out["info"], out["stats"] = batches, bundle.info, (bundle.mean, bundle.std)
    return out


def folder_names(loader) -> list[tuple[str, int]] | None:
    """(file name, label) of each image a large-image loader reads, in order."""
    if loader is None:
        return None
    sub = loader.dataset
    return [(Path(sub.dataset.folder.samples[i][0]).name, sub.dataset.folder.samples[i][1]) for i in sub.indices]


# ------------------------------------------------------------------------- unchanged by the split (old code's values)
def test_small_image_folder_splits_batches_and_stats_are_unchanged(tmp_path) -> None:
    b = load_data(
        str(make_folder(tmp_path / "small", 8)), batch_size=4, val_split=0.25, limit_train=9, limit_test=5, seed=3
    )
    got = tensor_summary(b)
    batches = got.pop("batches")
    assert got == {
        "train": ([24998, 24459, 24252, 22638, 24188, 24377, 24017, 24287, 23141], [0, 0, 0, 1, 1, 1, 1, 2, 2]),
        "val": ([22571, 24703, 23151, 22607], [0, 1, 2, 2]),
        "test": ([23750, 24776, 23578, 24030, 23849], [0, 1, 1, 2, 2]),
        "info": {"train_images": 9, "val_images": 4, "test_images": 5},
        "stats": ((0.4914, 0.4852, 0.4904), (0.2887, 0.2947, 0.285)),
    }
    expected = [[([1, 1, 0, 0], -517.9), ([1, 2, 1, 2], -570.01)], [([2, 1, 1, 1], -710.9), ([0, 0, 0, 2], -736.22)]]
    assert [[y for y, _ in ep] for ep in batches] == [[y for y, _ in ep] for ep in expected]
    assert [s for ep in batches for _, s in ep] == pytest.approx([s for ep in expected for _, s in ep], abs=0.05)


def test_large_image_folder_splits_are_unchanged(tmp_path) -> None:
    root = str(make_folder(tmp_path / "large", 72))
    a = load_data(root, batch_size=2, val_split=0.25, limit_train=8, seed=3, workers=0, image_size=72)
    assert {s: folder_names(getattr(a, s)) for s in ("train", "val", "test")} | {"info": a.info} == {
        "train": [
            ("ant2.png", 0),
            ("ant4.png", 0),
            ("bee0.png", 1),
            ("bee1.png", 1),
            ("bee2.png", 1),
            ("bee4.png", 1),
            ("cat2.png", 2),
            ("cat4.png", 2),
        ],
        "val": [("ant3.png", 0), ("bee3.png", 1), ("cat0.png", 2), ("cat3.png", 2)],
        "test": [
            ("ant0.png", 0),
            ("ant1.png", 0),
            ("ant2.png", 0),
            ("bee0.png", 1),
            ("bee1.png", 1),
            ("cat0.png", 2),
            ("cat1.png", 2),
            ("cat2.png", 2),
            ("cat3.png", 2),
        ],
        "info": {"train_images": 8, "val_images": 4, "test_images": 9},
    }
    c = load_data(root, batch_size=2, limit_test=4, seed=3, workers=0, image_size=72)
    assert c.val is None and len(folder_names(c.train)) == 18
    assert folder_names(c.test) == [("ant0.png", 0), ("bee0.png", 1), ("bee1.png", 1), ("cat0.png", 2)]
    assert c.info == {"train_images": 18, "val_images": 0, "test_images": 4}
    assert (c.image_size, c.in_channels, c.classes, c.mean) == (72, 3, ["ant", "bee", "cat"], (0.485, 0.456, 0.406))


def test_digits_splits_are_unchanged() -> None:
    d = load_data("digits", batch_size=64, val_split=0.1, limit_train=300, limit_test=40, seed=5)
    got = {
        s: (
            sum(int(x.sum()) for x in getattr(d, s).images),
            sum(getattr(d, s).labels.tolist()),
            len(getattr(d, s).labels),
        )
        for s in ("train", "val", "test")
    }
    assert got == {"train": (1496454, 1342, 300), "val": (197879, 152, 40), "test": (199471, 179, 40)}
    assert d.info == {"train_images": 300, "val_images": 40, "test_images": 40}
    assert (d.train.pad, d.train.flip) == (1, False)


def _old_cache_file(split_dir: Path, size: int | None, classes: list[str]) -> Path:
    """Where the old ``data.py`` cached a decoded split (its key, frozen here): a cache written before the split
    must still be found."""
    h = hashlib.sha1(f"{split_dir.resolve()}:{size}:{json.dumps(list(classes))}".encode())
    for c in classes:
        for f in sorted((split_dir / c).iterdir()):
            st = f.stat()
            h.update(f"{f.parent.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return (
        split_dir.parent.parent
        / "cache"
        / "tensors"
        / f"{split_dir.parent.name}-{split_dir.name}-{h.hexdigest()[:16]}.pt"
    )


def test_a_decoded_image_cache_of_the_old_layout_is_read(tmp_path) -> None:
    root = make_folder(tmp_path / "small", 8, n_train=(2, 2, 2), n_test=(1, 1, 1))
    classes = ["ant", "bee", "cat"]
    for split in ("train", "test"):  # the old on-disk format, with contents the folder does not hold
        n = 6 if split == "train" else 3
        cached = {
            "images": torch.full((n, 3, 8, 8), 7 if split == "train" else 9, dtype=torch.uint8),
            "labels": torch.tensor([0, 0, 1, 1, 2, 2][:n] if n == 6 else [0, 1, 2]),
            "classes": classes,
            "skipped": [],
        }
        path = _old_cache_file(root / split, None, classes)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cached, path)
    b = load_data(str(root), batch_size=2, stats=((0.5,) * 3, (0.5,) * 3))
    assert bool((b.train.images == 7).all()) and bool((b.test.images == 9).all())
    assert b.test.labels.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------ the two bugs of issue 34
def test_large_image_folder_augment_false_turns_augmentation_off(tmp_path) -> None:
    root = str(make_folder(tmp_path / "large", 72))
    on = load_data(root, batch_size=2, seed=3, workers=0, image_size=72)
    # random crops and flips by default, drawn anew each epoch (the same for an image and epoch: resumable)
    assert not torch.equal(on.train.dataset[(0, 0)][0], on.train.dataset[(1, 0)][0])
    assert torch.equal(on.train.dataset[(1, 0)][0], on.train.dataset[(1, 0)][0])
    off = load_data(root, batch_size=2, seed=3, workers=0, image_size=72, augment=False)
    first = off.train.dataset[(0, 0)][0]
    assert torch.equal(first, off.train.dataset[(1, 0)][0])  # deterministic: the evaluation transform
    path = off.train.dataset.dataset.folder.samples[off.train.dataset.indices[0]][0]
    evaluation = off.test.dataset.dataset.folder.transform
    with Image.open(path) as im:
        assert torch.equal(first, evaluation(im.convert("RGB")))


def test_large_image_folder_limit_test_limits_the_validation_split_as_the_tensor_path_does(tmp_path) -> None:
    small = load_data(str(make_folder(tmp_path / "small", 8)), batch_size=2, val_split=0.5, limit_test=3, seed=3)
    large = load_data(
        str(make_folder(tmp_path / "large", 72)),
        batch_size=2,
        val_split=0.5,
        limit_test=3,
        seed=3,
        workers=0,
        image_size=72,
    )
    assert small.info == large.info == {"train_images": 9, "val_images": 3, "test_images": 3}
    assert len(large.val.dataset) == 3
    assert [label for _, label in folder_names(large.val)] == small.val.labels.tolist()  # the same images
    assert [label for _, label in folder_names(large.test)] == small.test.labels.tolist()


# ------------------------------------------------------------------------------------------------ the data spec
def test_load_data_is_build_of_a_frozen_data_spec(tmp_path) -> None:
    import dataclasses
    import inspect

    from skipnet.data import DataSpec, build

    fields = [f.name for f in dataclasses.fields(DataSpec)]
    assert ["source", *fields[1:]] == fields
    assert list(inspect.signature(load_data).parameters)[1:] == fields[1:]  # load_data's keywords are its fields
    spec = DataSpec(str(make_folder(tmp_path / "small", 8)), batch_size=4, val_split=0.25, limit_test=2, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 4  # type: ignore[misc]
    assert spec.eval_batch == 256 and DataSpec("digits", batch_size=512).eval_batch == 512
    assert DataSpec("digits", eval_batch_size=8).eval_batch == 8
    a, b = build(spec), load_data(spec.source, batch_size=4, val_split=0.25, limit_test=2, seed=3)
    assert a.info == b.info and torch.equal(a.val.images, b.val.images) and torch.equal(a.test.labels, b.test.labels)


def test_the_names_other_modules_import_from_skipnet_data() -> None:
    import skipnet.data as data

    for name in (
        "load_data",
        "DataBundle",
        "TensorLoader",
        "FolderLoader",
        "SafeFolder",
        "resolve_folder",
        "_image_folder",
        "_decode_file",  # the old names of decode_file and of image_decoder's decoder (tests import them)
        "_tv_decoder",
        "decode_bytes",
        "decode_file",
        "image_decoder",
        "resize_small",
        "eval_transform",
        "Normalize",
        "cache_dir",
        "BUILTINS",
        "BUILTIN",
        "SPLIT_SEED",
    ):
        assert hasattr(data, name), name
