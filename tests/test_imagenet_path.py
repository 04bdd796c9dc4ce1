"""The ImageNet path end to end on real images: ImageFolder at 224 px, ``--init-torchvision``, SP then HRL.

CIFAR-10 JPEGs from the bundled archive are upsampled to 224x224 into a two-class ImageFolder (``train/``,
``val/``), a torchvision ResNet-50 state dict is written to a file, and the real CLI trains
``imagenet_rnn_gate_50`` for two SP steps from it and two HRL steps from the SP checkpoint (DataLoader
workers included).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import CIFAR_TAR
from skipnet import get_config
from skipnet.cli import main
from skipnet.trainconfig import TrainConfig, resolve_defaults

BUNDLED = CIFAR_TAR
CLASSES = ("cat", "ship")
PER_CLASS = {"train": 6, "val": 2}  # 16 images


def imagenet_folder(dest: Path) -> Path:
    """A two-class ImageFolder of bundled CIFAR-10 training JPEGs upsampled to 224x224 with PIL."""
    from PIL import Image

    need = {(s, c): n for s, n in PER_CLASS.items() for c in CLASSES}
    with tarfile.open(BUNDLED) as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpeg/train/<class>/<file>.jpg
            if not member.isfile() or len(parts) != 4 or parts[1] != "train" or parts[2] not in CLASSES:
                continue
            split = next((s for s in PER_CLASS if need[(s, parts[2])] > 0), None)
            if split is None:
                if not any(need.values()):
                    break
                continue
            need[(split, parts[2])] -= 1
            out = dest / split / parts[2] / parts[3]
            out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(tar.extractfile(member)) as im:
                im.convert("RGB").resize((224, 224), Image.BICUBIC).save(out, quality=90)
    assert not any(need.values()), need
    return dest


def test_imagenet_hrl_defaults_are_the_authors() -> None:
    """ImageNet HRL after SP: alpha 0.01, beta alpha/N, 40 epochs, lr 1e-4 constant (reference notes §2)."""
    arch = get_config("imagenet_rnn_gate_101")
    cfg = TrainConfig(arch=arch.name, stage="hrl", data="x", out="y", init="sp.pt")
    c = resolve_defaults(cfg, arch.family, arch.dataset, num_gates=32, steps_per_epoch=5000)
    assert (c.alpha, c.beta, c.epochs, c.iters, c.lr, c.schedule) == (0.01, 0.01 / 32, 40, None, 1e-4, "constant")
    assert c.batch_size == 256
    sp = resolve_defaults(TrainConfig(arch=arch.name, stage="sp", data="x", out="y"), "imagenet", "imagenet", 32, 5000)
    assert (sp.epochs, sp.lr, sp.schedule) == (120, 0.1, "paper")
    cifar = resolve_defaults(cfg, "cifar", "cifar10", 17, 390)
    assert (cifar.alpha, cifar.beta, cifar.iters) == (0.1, 1.0, 10_000)


@pytest.mark.slow
def test_imagenet_layout_torchvision_init_sp_then_hrl(tmp_path: Path, monkeypatch, cifar_jpeg) -> None:
    import torchvision

    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    data = imagenet_folder(tmp_path / "imagenet-mini")
    torch.manual_seed(123)  # a torchvision init that differs from the one the trainer draws itself
    tv_state = torchvision.models.resnet50(weights=None).state_dict()
    tv_file = tmp_path / "resnet50.pth"
    torch.save(tv_state, tv_file)

    common = ["--data", str(data), "--iters", "2", "--batch-size", "4", "--val-split", "0", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        sp_out, hrl_out = tmp_path / "sp", tmp_path / "hrl"
        argv = ["train", "imagenet_rnn_gate_50", "--stage", "sp", "--init-torchvision", str(tv_file), "--lr", "1e-3"]
        assert main([*argv, *common, "--workers", "0", "--out", str(sp_out)]) == 0
        argv = ["train", "imagenet_rnn_gate_50", "--stage", "hrl", "--init", str(sp_out / "best.pt")]
        assert main([*argv, *common, "--workers", "1", "--out", str(hrl_out)]) == 0
    finally:
        torch.set_num_threads(threads)

    for run in (sp_out, hrl_out):
        assert {"last.pt", "best.pt", "summary.json", "config.json"} <= {p.name for p in run.iterdir()}
    sp = torch.load(sp_out / "last.pt", weights_only=True)
    assert sp["step"] == 2 and sp["data"]["num_classes"] == 2 and sp["data"]["image_size"] == 224
    sd = sp["state_dict"]
    # The backbone started from the file: a layer4 conv weight moved only by two small SGD steps, far less
    # than its distance to an independent random init.
    name = "layer4.2.conv2.weight"
    moved = (sd[f"backbone.{name}"] - tv_state[name]).abs().max().item()
    fresh = torchvision.models.resnet50(weights=None).state_dict()[name]
    assert moved < 1e-3 * tv_state[name].abs().max().item() + 1e-4, moved
    assert (fresh - tv_state[name]).abs().max().item() > 100 * moved
    assert sd["backbone.fc.weight"].shape == (2, 2048)  # 1000-class classifier left out, 2 classes trained

    summary = json.loads((sp_out / "summary.json").read_text())
    assert summary["test"]["images"] == 4  # the val/ folder is the test split
    hrl_cfg = json.loads((hrl_out / "config.json").read_text())
    n_gates = 15  # ImageNet ResNet-50: 16 blocks, the first always runs
    assert hrl_cfg["alpha"] == 0.01 and hrl_cfg["beta"] == pytest.approx(0.01 / n_gates)
    assert hrl_cfg["lr"] == 1e-4 and hrl_cfg["schedule"] == "constant"
    hrl = torch.load(hrl_out / "best.pt", weights_only=True)
    assert hrl["step"] == 2 and hrl["train_config"]["stage"] == "hrl"
    for k in ("backbone.layer1.0.conv1.weight", "gates.lstm.weight_ih"):  # HRL started from the SP weights
        assert (hrl["state_dict"][k] - sd[k]).abs().max() < 1e-2
