"""The backbones are torchvision's ResNets module for module: same state-dict keys, same weights from the same
seed, same outputs; and skipnet's commands start without importing torchvision (1.4 s each)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.testing import assert_close

from conftest import patience
from skipnet import backbones
from skipnet.backbones import BasicBlock, Bottleneck, CifarResNet, ImageNetResNet


def _same_state(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)  # the same keys in the same order (the order the modules were created in)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # the same random draws, bit for bit


def _realistic(net: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.reset_running_stats()
                m.momentum = None
        net.train()(x)
    return net.eval()


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_imagenet_resnets_draw_torchvisions_weights_from_a_seed(depth: int) -> None:
    torch.manual_seed(depth)
    ours = ImageNetResNet(depth, 7)
    torch.manual_seed(depth)
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=7)
    _same_state(ours, theirs)


@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_resnets_compute_torchvisions_function(depth: int) -> None:
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    theirs = _realistic(getattr(torchvision.models, f"resnet{depth}")(weights=None).double(), x)
    ours = ImageNetResNet(depth, 1000).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(ours.eval()(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_cifar_resnet_draws_what_it_drew_with_torchvisions_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    ours = CifarResNet(20, 10)
    monkeypatch.setattr(backbones, "BasicBlock", torchvision.models.resnet.BasicBlock)
    torch.manual_seed(3)
    before = CifarResNet(20, 10)  # the network as built before the blocks were skipnet's own
    assert isinstance(before.layer1[0], torchvision.models.resnet.BasicBlock)
    _same_state(ours, before)


@pytest.mark.parametrize(
    ("ours", "inplanes", "planes", "stride"),
    [(BasicBlock, 8, 8, 1), (BasicBlock, 8, 16, 2), (Bottleneck, 32, 8, 1), (Bottleneck, 16, 8, 2)],
)
def test_blocks_compute_torchvisions_blocks(ours: type[nn.Module], inplanes: int, planes: int, stride: int) -> None:
    width = planes * ours.expansion
    down = (
        None if stride == 1 else nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width))
    )
    x = torch.randn(3, inplanes, 10, 10, dtype=torch.float64)
    tv = getattr(torchvision.models.resnet, ours.__name__)(inplanes, planes, stride, down).double()
    tv = _realistic(tv, x)
    mine = ours(inplanes, planes, stride, copy.deepcopy(down)).double()
    mine.load_state_dict(tv.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(mine.eval()(x), tv(x), rtol=1e-12, atol=1e-12)


def test_a_stem_for_other_channels_is_initialised_like_the_rest() -> None:
    net = ImageNetResNet(18, 5, in_channels=1)
    assert net.conv1.weight.shape == (64, 1, 7, 7)
    std = float(net.conv1.weight.detach().std())
    assert abs(std - (2.0 / (64 * 49)) ** 0.5) < 0.2 * (2.0 / (64 * 49)) ** 0.5  # kaiming, fan_out, as every conv


def test_commands_start_without_torchvision() -> None:
    code = (
        "import sys, pkgutil, importlib, skipnet, skipnet.commands;"
        "[importlib.import_module(m.name) for p in (skipnet, skipnet.commands)"
        " for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.') if m.name != 'skipnet.__main__'];"
        "sys.exit('torchvision' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=patience(60))
