"""Registry of named architectures, each one line over :class:`~skipnet.config.ArchConfig`.

Names follow the authors' repository with its typos fixed: ``cifar10_resnet_110``,
``cifar10_feedforward_38`` (FFGate-I below 100 layers, FFGate-II from 100 on, as in the paper),
``cifar10_rnn_gate_110``, ``cifar10_aig_gate_38`` (ConvNet-AIG's gate, beyond the paper), the same for
``cifar100_`` and ``svhn_``, ``imagenet_resnet_50``, ``imagenet_rnn_gate_101``, and ``tiny_*`` variants for
fast tests. Any other 6n+2 depth is accepted by pattern, e.g. ``cifar10_rnn_gate_56``.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from skipnet.config import ArchConfig
from skipnet.errors import SkipnetError
from skipnet.gated import GatedResNet

_REGISTRY: dict[str, ArchConfig] = {}

SMALL_DATASETS = {"cifar10": 10, "cifar100": 100, "svhn": 10}
_PATTERN = re.compile(r"^(cifar10|cifar100|svhn|tiny)_(resnet|feedforward|rnn_gate|aig_gate)_(\d{1,9})$")


def register(config: ArchConfig) -> ArchConfig:
    """Add ``config`` under ``config.name``; duplicate names are refused."""
    if config.name in _REGISTRY:
        raise ValueError(f"architecture {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    return config


def ff_kind(depth: int) -> str:
    """The paper's rule: FFGate-I for depth < 100, FFGate-II for depth >= 100 (§3.1)."""
    return "ffgate1" if depth < 100 else "ffgate2"


def _small(dataset: str, kind: str, depth: int) -> ArchConfig:
    gate = {"resnet": "none", "feedforward": ff_kind(depth), "rnn_gate": "rnn", "aig_gate": "aig"}[kind]
    if dataset == "tiny":
        return ArchConfig(f"tiny_{kind}_{depth}", "cifar", depth, 10, gate, 32, width=8, dataset="tiny")
    return ArchConfig(f"{dataset}_{kind}_{depth}", "cifar", depth, SMALL_DATASETS[dataset], gate, 32, dataset=dataset)


for _ds in SMALL_DATASETS:
    for _d in (38, 74, 110, 152):
        register(_small(_ds, "resnet", _d))
        register(_small(_ds, "rnn_gate", _d))
    for _d in (38, 74, 110):
        register(_small(_ds, "feedforward", _d))
    register(_small(_ds, "aig_gate", 38))  # other depths by pattern
for _d in (34, 50, 101):
    register(ArchConfig(f"imagenet_resnet_{_d}", "imagenet", _d, 1000, "none", 224, dataset="imagenet"))
    register(ArchConfig(f"imagenet_rnn_gate_{_d}", "imagenet", _d, 1000, "rnn", 224, dataset="imagenet"))
# Tiny variants for tests: 14 layers (5 gated blocks), width 8.
for _kind in ("resnet", "rnn_gate", "feedforward", "aig_gate"):
    register(_small("tiny", _kind, 14))
register(ArchConfig("tiny_feedforward2_14", "cifar", 14, 10, "ffgate2", 32, width=8, dataset="tiny"))


def list_models() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)


def get_config(name: str, **overrides: Any) -> ArchConfig:
    """The config of ``name`` with ``overrides`` applied (``None`` overrides are dropped)."""
    if name in _REGISTRY:
        config = _REGISTRY[name]
    else:
        m = _PATTERN.match(name)
        if not m:
            close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise SkipnetError(f"unknown architecture {name!r}; {hint}run 'skipnet models' for the list")
        config = _small(m.group(1), m.group(2), int(m.group(3)))
    return config.replace(**overrides)


def min_image_size(config: ArchConfig) -> int:
    """The smallest input side for which ``config``'s last stage still sees a feature map of at least 1x1 pixel
    per stride: 8 for a CIFAR ResNet (total stride 4, last map 2x2), 32 for an ImageNet ResNet (stride 32)."""
    return 32 if config.family == "imagenet" else 8


def check_image_size(config: ArchConfig, size: int | None, option: str = "--image-size") -> None:
    """Raise a one-line error when ``size`` is too small for ``config`` (``None``: the architecture's own)."""
    if size is None:
        return
    least = min_image_size(config)
    if size < least:
        stride = 32 if config.family == "imagenet" else 4
        raise SkipnetError(
            f"{option} {size} is too small for {config.name}: its feature maps shrink {stride}x, so inputs must be "
            f"at least {least}x{least} pixels (its default is {config.image_size}); pass {option} {config.image_size}"
        )


def create_model(name: str | ArchConfig, pretrained: bool = False, **overrides: Any) -> GatedResNet:
    """Build a :class:`GatedResNet` from a registered name (or a config) and optional overrides, with fresh
    weights. The shipped weights are ``skipnet.create_model(name, pretrained=True)``
    (:func:`skipnet.pretrained.create_model`): loading them needs the checkpoint reader, above this module."""
    if pretrained:
        raise SkipnetError(
            "skipnet.registry.create_model builds an architecture with fresh weights; for the shipped weights call "
            "skipnet.create_model(name, pretrained=True)"
        )
    config = name.replace(**overrides) if isinstance(name, ArchConfig) else get_config(name, **overrides)
    return GatedResNet(config)
