"""Architecture configuration: plain data that fully describes a network and travels in checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from skipnet.errors import SkipnetError

Family = Literal["cifar", "imagenet"]
GateKind = Literal["none", "ffgate1", "ffgate2", "rnn"]

GATE_KINDS = ("none", "ffgate1", "ffgate2", "rnn")
IMAGENET_DEPTHS = (18, 34, 50, 101, 152)


@dataclass(frozen=True)
class ArchConfig:
    """Everything needed to rebuild a (gated) ResNet.

    Attributes:
        name: registry name the config came from (informational).
        family: ``"cifar"`` (6n+2 BasicBlock ResNet, 3 stages) or ``"imagenet"`` (torchvision ResNet).
        depth: number of weighted layers (38, 74, 110, 152 for CIFAR; 34, 50, 101 for ImageNet).
        num_classes: size of the classifier output.
        gate: ``"none"`` (plain ResNet), ``"ffgate1"``, ``"ffgate2"`` or ``"rnn"`` (paper §3.1).
        image_size: default (square) input size, used for cost accounting.
        width: channels of the first CIFAR stage (16 in the paper); ignored for ImageNet.
        rnn_embed: RNNGate projection size (10 in the paper).
        rnn_hidden: RNNGate LSTM hidden size (10 in the paper).
        in_channels: input image channels.
        dataset: the data set the name was registered for (``cifar10``, ``imagenet``, ...).
    """

    name: str
    family: Family
    depth: int
    num_classes: int
    gate: GateKind
    image_size: int
    width: int = 16
    rnn_embed: int = 10
    rnn_hidden: int = 10
    in_channels: int = 3
    dataset: str = "cifar10"

    def __post_init__(self) -> None:
        if self.family not in ("cifar", "imagenet"):
            raise SkipnetError(f"unknown family {self.family!r}; expected 'cifar' or 'imagenet'")
        if self.gate not in GATE_KINDS:
            raise SkipnetError(f"unknown gate {self.gate!r}; expected one of {', '.join(GATE_KINDS)}")
        if self.family == "cifar" and (self.depth < 8 or (self.depth - 2) % 6 != 0):
            raise SkipnetError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 38, ...), got {self.depth}")
        if self.family == "imagenet" and self.depth not in IMAGENET_DEPTHS:
            raise SkipnetError(f"ImageNet ResNet depth must be one of {IMAGENET_DEPTHS}, got {self.depth}")
        if self.num_classes < 1:
            raise SkipnetError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.image_size < 8:
            raise SkipnetError(f"image_size must be >= 8, got {self.image_size}")

    @property
    def gated(self) -> bool:
        return self.gate != "none"

    def replace(self, **changes: Any) -> ArchConfig:
        """A copy with ``changes`` applied; ``None`` values are ignored (timm-style overrides)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
