"""The ninth hostile round (2026-12-07): each test fails on the code before its fix."""

from __future__ import annotations

import pytest
import torch


def test_a_decompression_bomb_is_one_rule_on_every_path(tmp_path, monkeypatch) -> None:
    """An image between PIL's pixel limit and twice it (where PIL only warns) is refused by the small-image
    decoder, the large-image loader and predict alike; one under the limit is read by all three."""
    from PIL import Image

    from skipnet.data import decode_bytes
    from skipnet.data.decode import pil_loader
    from skipnet.predict import Unreadable, _large_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big, ok = tmp_path / "big.png", tmp_path / "ok.png"
    Image.new("RGB", (40, 40), (9, 9, 9)).save(big)  # 1,600 px: over the limit, under PIL's error at 2x
    Image.new("RGB", (30, 30), (9, 9, 9)).save(ok)  # 900 px
    assert decode_bytes(big.read_bytes()) is None
    with pytest.raises(ValueError, match="decompression-bomb"):
        pil_loader(str(big))
    with pytest.raises(Unreadable, match="decompression-bomb"):
        _large_image(big.read_bytes(), 32)
    assert decode_bytes(ok.read_bytes()).shape == (3, 30, 30)
    assert pil_loader(str(ok)).size == (30, 30)
    assert _large_image(ok.read_bytes(), 16).shape == (3, 16, 16)


def test_a_bomb_in_a_folder_of_small_images_is_named_as_such(tmp_path, monkeypatch, caplog) -> None:
    """The small-image decoder skips an image over the pixel limit with the other unreadable ones: its warning
    names that limit beside corrupt and truncated files (it said "corrupt or truncated" only)."""
    import logging

    from PIL import Image

    from skipnet.data import load_data

    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    root = tmp_path / "F"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (30, 30), (40 * i, 9, 9)).save(root / split / c / f"{i}.png")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(root / "test" / "a" / "big.png")  # 1,600 px
    with caplog.at_level(logging.WARNING):
        bundle = load_data(str(root), batch_size=2, workers=0)
    assert len(bundle.test.labels) == 6
    line = next(r.getMessage() for r in caplog.records if "big.png" in r.getMessage())
    assert "skipped 1 of 7" in line and "decompression-bomb limit" in line, line


def test_analyze_shows_the_images_its_rows_are_about_past_an_unreadable_one(tmp_path, monkeypatch) -> None:
    """An evaluation pass over large images leaves out an unreadable one; the example images analyze draws for
    the pass's rows are those rows' images, not the ones a position further on."""
    from PIL import Image

    from skipnet.analysis import gather_images
    from skipnet.data import load_data

    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "F"
    for split in ("train", "test"):
        for k, c in enumerate(("a", "b")):
            for i in range(4):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (80, 80), (60 * i, 40 + 100 * k, 20 * i)).save(root / split / c / f"{i}.png")
    (root / "test" / "a" / "1.png").write_bytes(b"not an image")  # the second image of the split
    bundle = load_data(str(root), batch_size=2, eval_batch_size=3, workers=0, image_size=72)
    rows = torch.cat([x for x, _ in bundle.test])
    assert len(rows) == 7 and bundle.test.dropped == [1]
    shown = gather_images(bundle, bundle.test, list(range(7)))
    assert torch.allclose(shown, bundle.denormalize(rows), atol=1e-6)


def test_export_model_takes_the_models_own_record_and_mode() -> None:
    """The library's ``export_model`` (not only ``skipnet export``) writes a loaded model's normalisation and
    classes into the graph, and refuses a gated graph for a network whose gates were never trained."""
    from skipnet.errors import SkipnetError
    from skipnet.export import export_model
    from skipnet.gated import GateMode
    from skipnet.registry import create_model

    model = create_model("tiny_rnn_gate_14").eval()
    record = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "classes": [f"c{i}" for i in range(10)]}
    model.data_record = dict(record)
    ex = export_model(model, "pt2", probes=1)
    assert ex.graph == "conditional"
    assert ex.meta["normalize"] == {"mean": pytest.approx(record["mean"]), "std": pytest.approx(record["std"])}
    assert ex.meta["classes"] == record["classes"]
    model.mode = GateMode.ALL_ON  # as a stage-base checkpoint of a gated architecture loads
    with pytest.raises(SkipnetError, match="never trained"):
        export_model(model, "pt2", graph="conditional", probes=1)
    assert export_model(model, "pt2", probes=1).graph == "plain"


def test_predict_lists_a_folder_as_eval_does(tmp_path) -> None:
    """A .gif in a class folder is not one of a split's images, so predict on the folder leaves it out too (it
    reads a .gif given by name)."""
    from PIL import Image

    from skipnet.data.folders import list_folder
    from skipnet.predict import expand_inputs

    for name in ("a.png", "b.gif", "c.jpg"):
        (tmp_path / "cat").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "cat" / name)
    found, _ = expand_inputs([str(tmp_path)])
    assert sorted(p.name for p in found) == sorted(p.name for p in list_folder(tmp_path)[0]) == ["a.png", "c.jpg"]
    assert [p.name for p in expand_inputs([str(tmp_path / "cat" / "b.gif")])[0]] == ["b.gif"]


def test_export_model_falls_back_to_the_models_normalisation_when_ckpt_has_none() -> None:
    """``ckpt=`` given with classes only: the graph still normalises as the model's own record says."""
    from skipnet.export import export_model
    from skipnet.registry import create_model

    model = create_model("tiny_rnn_gate_14").eval()
    model.data_record = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    ex = export_model(model, "pt2", ckpt={"data": {"classes": [f"c{i}" for i in range(10)]}}, probes=1)
    assert ex.meta["normalize"]["mean"] == pytest.approx([0.4, 0.5, 0.6]) and ex.meta["classes"][0] == "c0"


def test_predict_says_how_a_gif_is_read_when_a_folder_holds_only_gifs(tmp_path) -> None:
    from PIL import Image

    from skipnet.errors import SkipnetError
    from skipnet.predict import expand_inputs

    Image.new("L", (8, 8)).save(tmp_path / "a.gif")
    with pytest.raises(SkipnetError, match="gif, are read when named"):
        expand_inputs([str(tmp_path)])
