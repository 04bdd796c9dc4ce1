"""Backbones: the CIFAR 6n+2 ResNet and the ImageNet ResNets (18-152), in torchvision's layout.

Both expose torchvision's attribute layout (``conv1, bn1, relu, maxpool, layer1.., avgpool, fc``; blocks with
``conv1, bn1, conv2, bn2[, conv3, bn3], downsample``), so that the gated network treats them alike and a
torchvision ResNet state dict loads into an ImageNet backbone unchanged. The modules are built here rather than
imported: importing torchvision takes 1.4 s (it loads every model and ``torch._dynamo``), which every command
paid before it did anything. Modules are created and initialised in torchvision's order, so that a seed gives
the same weights as before (``tests/test_backbones.py`` checks both against torchvision), except for an ImageNet
network of other than 3 input channels: its stem was torchvision's replaced by a default-initialised convolution,
and is now built for its channels and initialised as every other convolution. The CIFAR network
uses a projection shortcut (1x1 conv stride 2 + BN) on the first block of stages 2 and 3, as in the authors'
code.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from skipnet.config import IMAGENET_LAYERS, ArchConfig


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (He et al. 2016, Fig. 2 left)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:  # the reference; skipnet's executors use skipnet.blocks
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1, 3x3 (with the stride, "ResNet v1.5" as torchvision), 1x1 to 4x the width, and a shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class _ResNet(nn.Module):
    """The stem, stages and head shared by both families; ``forward`` is the plain network's."""

    inplanes: int

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        width = planes * block.expansion
        if stride != 1 or self.inplanes != width:
            downsample = nn.Sequential(_conv(self.inplanes, width, 1, stride), nn.BatchNorm2d(width))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = width
        layers += [block(width, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in stages(self):
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(_ResNet):
    """ResNet with 6n+2 weighted layers for small images (He et al. 2016, §4.2)."""

    def __init__(self, depth: int, num_classes: int, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = _conv(in_channels, width, 3)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.inplanes = width
        self.layer1 = self._make_layer(BasicBlock, width, n)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, n, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, n, stride=2)
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


_BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ImageNetResNet(_ResNet):
    """The ImageNet ResNets (He et al. 2016, Table 1): a 7x7 stride-2 stem and max pooling, four stages."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        kind, layers = IMAGENET_LAYERS[depth]
        block = _BLOCKS[kind]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build_backbone(config: ArchConfig) -> nn.Module:
    """Build the (ungated) ResNet described by ``config``."""
    if config.family == "cifar":
        return CifarResNet(config.depth, config.num_classes, config.width, config.in_channels)
    return ImageNetResNet(config.depth, config.num_classes, config.in_channels)


def stages(backbone: nn.Module) -> list[nn.Sequential]:
    """The residual stages (``layer1``, ``layer2``, ...) in order."""
    out = []
    i = 1
    while hasattr(backbone, f"layer{i}"):
        out.append(getattr(backbone, f"layer{i}"))
        i += 1
    return out
