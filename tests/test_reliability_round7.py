"""Faults found in the seventh hostile round and in the last notes' "noticed, left alone", each fixed."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from skipnet.backbones import ImageNetResNet
from skipnet.data import load_data, loaders
from skipnet.errors import SkipnetError
from skipnet.gated import GatedResNet
from skipnet.registry import create_model
from skipnet.runsetup import init_torchvision
from skipnet.trainconfig import TrainConfig


def _folder(root: Path, side: int = 72, per_class: int = 4) -> Path:
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                colour = (60 * i, 200 if c == "a" else 20, 90)
                Image.new("RGB", (side, side), colour).save(root / split / c / f"{i}.png")
    return root


def test_more_workers_than_cpus_are_as_many_as_the_cpus(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loaders.usable_workers(1) == 1 and loaders.usable_workers(2) == 2 and loaders.usable_workers(0) == 0
    with caplog.at_level(logging.INFO, logger="skipnet.data.loaders"):
        assert loaders.usable_workers(4) == 2
    assert "--workers 4: 2 CPUs here, so 2" in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's "suggested max number of worker" warning fails the test
        bundle = load_data(str(_folder(tmp_path / "d")), batch_size=2, val_split=0.25, image_size=72, workers=4)
        for split in (bundle.train, bundle.val, bundle.test):
            assert split.loader.num_workers == 2
        assert sum(len(y) for _, y in bundle.test.loader) == 8  # the workers do read the images


# ------------------------------------------------------------------------------------- --init-torchvision


@pytest.fixture(scope="module")
def resnet34() -> GatedResNet:
    return create_model("imagenet_rnn_gate_34", num_classes=5)


def _saved(tmp_path: Path, obj: object) -> str:
    path = tmp_path / f"weights{len(list(tmp_path.glob('*.pth')))}.pth"
    torch.save(obj, path)
    return str(path)


def test_init_torchvision_refuses_what_is_not_its_resnets_state_dict(resnet34, tmp_path) -> None:
    fifty = ImageNetResNet(50, 1000).state_dict()  # another block type: sizes differ, names overlap
    cases = [
        (_saved(tmp_path, torch.zeros(3)), "is not a state dict"),
        (_saved(tmp_path, [1, 2, 3]), "is not a state dict"),
        (_saved(tmp_path, {**ImageNetResNet(34, 1000).state_dict(), "fc.weight": None}), "is not a state dict"),
        (_saved(tmp_path, fifty), "is not a matching torchvision ResNet state dict (layer1.0.conv3.weight)"),
        (str(tmp_path), "is a directory"),
    ]
    before = {k: v.clone() for k, v in resnet34.backbone.state_dict().items()}
    for path, needle in cases:
        with pytest.raises(SkipnetError, match=re.escape(needle)):
            init_torchvision(resnet34, path)
    assert all(torch.equal(before[k], v) for k, v in resnet34.backbone.state_dict().items())  # nothing half-loaded


def test_init_torchvision_takes_a_state_dict_without_batchnorm_counters(resnet34, tmp_path) -> None:
    theirs = ImageNetResNet(34, 1000).state_dict()
    old = {k: v for k, v in theirs.items() if not k.endswith("num_batches_tracked")}
    fc = resnet34.backbone.fc.weight.detach().clone()
    init_torchvision(resnet34, _saved(tmp_path, old))
    mine = resnet34.backbone.state_dict()
    assert torch.equal(mine["layer3.1.conv2.weight"], theirs["layer3.1.conv2.weight"])
    assert torch.equal(mine["fc.weight"], fc)  # 5 classes here, not 1000: fc left as it was


def test_init_and_init_torchvision_together_are_refused() -> None:
    cfg = TrainConfig(arch="imagenet_rnn_gate_34", stage="hrl", data="x", out="y", init="a.pt", init_torchvision="b")
    with pytest.raises(SkipnetError, match="--init a.pt and --init-torchvision b both set the backbone's weights"):
        cfg.validate()
