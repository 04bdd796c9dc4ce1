"""Architecture configuration: plain data that fully describes a network and travels in checkpoints."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

from skipnet.errors import SkipnetError

Family = Literal["cifar", "imagenet"]
GateKind = Literal["none", "ffgate1", "ffgate2", "rnn", "aig"]

GATE_KINDS: tuple[str, ...] = get_args(GateKind)
# ImageNet ResNet depth -> (block type, blocks per stage), torchvision's table (He et al., 2016, Table 1)
IMAGENET_LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET_DEPTHS = tuple(IMAGENET_LAYERS)

# Upper bounds of every field, checked before anything is allocated: a name or a file's metadata cannot make
# skipnet build a network that exhausts memory (the paper's largest is ResNet-1202 on CIFAR).
LIMITS = {
    "depth": 2000,
    "num_classes": 100_000,
    "image_size": 4096,
    "width": 1024,
    "rnn_embed": 1024,
    "rnn_hidden": 1024,
    "in_channels": 64,
}
MAX_PARAMETERS = 300_000_000  # 1.2 GB of float32 weights
_INT_FIELDS = tuple(LIMITS)
_STR_FIELDS = ("name", "family", "gate", "dataset")


def estimated_parameters(c: ArchConfig) -> int:
    """About the number of weights of ``c`` (within a few per cent), from its fields alone: nothing is allocated."""
    if c.family == "imagenet":
        return 60_000_000 + 2048 * c.num_classes
    n = (c.depth - 2) // 6
    convs = 2 * 9 * n * c.width**2 * (1 + 4 + 16)  # three stages of n blocks, widths w, 2w, 4w
    gates = 4 * c.rnn_hidden * (c.rnn_embed + c.rnn_hidden) + 4 * c.width * c.rnn_embed
    return convs + gates + 4 * c.width * c.num_classes


# timm's keyword names for create_model -> ours
TIMM_NAMES = {"in_chans": "in_channels"}


@dataclass(frozen=True)
class ArchConfig:
    """Everything needed to rebuild a (gated) ResNet.

    Attributes:
        name: registry name the config came from (informational).
        family: ``"cifar"`` (6n+2 BasicBlock ResNet, 3 stages) or ``"imagenet"`` (torchvision ResNet).
        depth: number of weighted layers (38, 74, 110, 152 for CIFAR; 34, 50, 101 for ImageNet).
        num_classes: size of the classifier output.
        gate: ``"none"`` (plain ResNet), ``"ffgate1"``, ``"ffgate2"`` or ``"rnn"`` (paper §3.1), or
            ``"aig"`` (ConvNet-AIG's gate, beyond the paper).
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
        for f in _STR_FIELDS:
            if not isinstance(getattr(self, f), str):
                raise SkipnetError(f"architecture field {f} must be a string, got {getattr(self, f)!r}"[:200])
        for f in _INT_FIELDS:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool):
                raise SkipnetError(f"architecture field {f} must be an integer, got {v!r}"[:200])
            if not 1 <= v <= LIMITS[f]:
                raise SkipnetError(f"architecture field {f} must be in [1, {LIMITS[f]}], got {v}")
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
        if estimated_parameters(self) > MAX_PARAMETERS:
            raise SkipnetError(
                f"architecture {self.name} would have about {estimated_parameters(self):.3g} weights, more than the "
                f"{MAX_PARAMETERS:.3g} skipnet builds (depth {self.depth}, width {self.width})"
            )

    @property
    def gated(self) -> bool:
        return self.gate != "none"

    def replace(self, **changes: Any) -> ArchConfig:
        """A copy with ``changes`` applied; ``None`` values are ignored and timm's names accepted (``in_chans``
        for ``in_channels``), as in ``timm.create_model(name, num_classes=..., in_chans=...)``."""
        changes = {TIMM_NAMES.get(k, k): v for k, v in changes.items() if v is not None}
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise SkipnetError(
                f"unknown model option {unknown[0]!r}; the options are {', '.join(sorted(known | set(TIMM_NAMES)))}"
            )
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        """The config of a checkpoint's ``arch`` record; malformed contents are a :class:`SkipnetError`."""
        if not isinstance(data, dict):
            raise SkipnetError(f"the architecture record is a {type(data).__name__}, not a mapping")
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise SkipnetError(f"the architecture record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})
