"""The ninth hostile round (2026-12-07): each test fails on the code before its fix."""

from __future__ import annotations

import pytest


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
