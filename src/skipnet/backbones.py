"""Backbones: the CIFAR 6n+2 ResNet and torchvision's ImageNet ResNets.

Both expose the torchvision attribute layout (``conv1, bn1, relu, maxpool, layer1.., avgpool, fc``) so that
the gated network treats them alike, and so that a torchvision state dict loads into an ImageNet backbone
unchanged. The CIFAR network reuses torchvision's ``BasicBlock`` with a projection shortcut
(1x1 conv stride 2 + BN) on the first block of stages 2 and 3, as in the authors' code.
"""

from __future__ import annotations

import math

import torch.nn as nn
from torchvision.models import resnet as tv

from skipnet.config import ArchConfig


class CifarResNet(nn.Module):
    """ResNet with 6n+2 weighted layers for small images (He et al. 2016, §4.2)."""

    def __init__(self, depth: int, num_classes: int, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.inplanes = width
        self.layer1 = self._make_layer(width, n, stride=1)
        self.layer2 = self._make_layer(2 * width, n, stride=2)
        self.layer3 = self._make_layer(4 * width, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # N(0, sqrt(2 / (k*k*C_out))), as in the authors' code.
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [tv.BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [tv.BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


_IMAGENET_BUILDERS = {
    18: tv.resnet18,
    34: tv.resnet34,
    50: tv.resnet50,
    101: tv.resnet101,
    152: tv.resnet152,
}


def build_backbone(config: ArchConfig) -> nn.Module:
    """Build the (ungated) ResNet described by ``config``."""
    if config.family == "cifar":
        return CifarResNet(config.depth, config.num_classes, config.width, config.in_channels)
    net = _IMAGENET_BUILDERS[config.depth](weights=None, num_classes=config.num_classes)
    if config.in_channels != 3:
        net.conv1 = nn.Conv2d(config.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def stages(backbone: nn.Module) -> list[nn.Sequential]:
    """The residual stages (``layer1``, ``layer2``, ...) in order."""
    out = []
    i = 1
    while hasattr(backbone, f"layer{i}"):
        out.append(getattr(backbone, f"layer{i}"))
        i += 1
    return out
