"""Cost accounting: exact multiply-adds (MACs) per image, gates included (paper §4.1).

The per-region costs are derived once from the modules themselves: a forward hook on every convolution,
linear layer and LSTM cell counts the MACs of what actually ran while the network is walked region by
region at batch size 1 -- the fixed part (stem, the always-run first block, every projection shortcut, which
runs whether or not its block is skipped, and the head), each gated block's residual branch, and each gate.
A test cross-checks the total against ``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from skipnet.blocks import residual_branch, shortcut_branch
from skipnet.gated import GatedResNet


def _module_macs(module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> int:
    if isinstance(module, nn.Conv2d):
        out = output
        k = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        return int(out.numel() // out.shape[0] * k)
    if isinstance(module, nn.Linear):
        return int(output.numel() // output.shape[0] * module.in_features)
    if isinstance(module, nn.LSTMCell):
        return 4 * module.hidden_size * (module.input_size + module.hidden_size)
    return 0


class _Counter:
    def __init__(self, model: nn.Module) -> None:
        self.total = 0
        self.handles = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if isinstance(m, nn.Conv2d | nn.Linear | nn.LSTMCell)
        ]

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
        self.total += _module_macs(module, inputs, output)

    @contextmanager
    def region(self):
        start = self.total
        box = [0]
        yield box
        box[0] = self.total - start

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class CostModel:
    """MACs per image of every region of a gated network at one input size.

    Attributes:
        fixed_macs: always spent: stem, first block, projection shortcuts, head.
        block_macs: (N,) residual-branch MACs of each gated block (saved when skipped).
        gate_macs: (N,) MACs of each gate (always spent; zeros for a plain ResNet).
    """

    arch: str
    image_size: int
    params: int
    fixed_macs: int
    block_macs: list[int]
    gate_macs: list[int]
    block_stage: list[int] = field(default_factory=list)

    @property
    def num_gates(self) -> int:
        return len(self.block_macs)

    @property
    def total_macs_all_on(self) -> int:
        """The plain ResNet's cost: every block, no gate."""
        return self.fixed_macs + sum(self.block_macs)

    @property
    def gate_macs_total(self) -> float:
        """MACs of all the gates per image, spent whether or not their blocks run (where the gates are computed)."""
        return float(sum(self.gate_macs))

    @property
    def min_macs(self) -> float:
        """The least a gated run can spend per image: every gated block skipped, the gates computed (the fixed part
        plus :attr:`gate_macs_total`); calibration's floor, the all-skip point."""
        return self.fixed_macs + self.gate_macs_total

    def reduction(self, macs: Any) -> Any:
        """``macs`` as a MACs reduction vs the plain ResNet, in % (:func:`macs_reduction`)."""
        return macs_reduction(macs, self.total_macs_all_on)

    def macs_for_reduction(self, reduction: Any) -> Any:
        """The MACs per image ``reduction`` % below the plain ResNet (:func:`macs_at_reduction`)."""
        return macs_at_reduction(reduction, self.total_macs_all_on)

    @property
    def gate_overhead(self) -> float:
        """Summed gate MACs / summed gated-block MACs (a block's projection shortcut is in ``fixed_macs``, not in
        ``block_macs``: a skipped block still runs it)."""
        return sum(self.gate_macs) / max(1, sum(self.block_macs))

    def macs_per_image(self, decisions: Tensor, include_gates: bool = True) -> Tensor:
        """MACs actually spent per image, (B,), from a (B, N) 0/1 decision tensor."""
        blocks = torch.tensor(self.block_macs, dtype=torch.float64, device=decisions.device)
        spent = self.fixed_macs + decisions.to(torch.float64) @ blocks
        if include_gates:
            spent = spent + self.gate_macs_total
        return spent

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gates"] = self.num_gates
        d["total_macs_all_on"] = self.total_macs_all_on
        d["gate_overhead"] = self.gate_overhead
        return d


def macs_reduction(macs: Any, all_on: Any) -> Any:
    """How many % fewer MACs ``macs`` are than ``all_on`` (the plain ResNet's): ``100 (1 - macs / all_on)``; negative
    for more. The one home of the formula; works on numbers and arrays alike (a plot's secondary axis)."""
    return 100.0 * (1.0 - macs / all_on)


def macs_at_reduction(reduction: Any, all_on: Any) -> Any:
    """The MACs ``reduction`` % below ``all_on``: ``all_on (1 - reduction / 100)``, the inverse of
    :func:`macs_reduction`."""
    return all_on * (1.0 - reduction / 100.0)


def fewer_macs(reduction: float) -> str:
    """A MACs reduction in words: ``"30.0% fewer"``, or ``"1.2% more"`` when it is negative (a network whose gates
    cost more than the blocks they skip), never "-1.2% fewer"."""
    return f"{abs(reduction):.1f}% fewer" if round(reduction, 1) >= 0 else f"{-reduction:.1f}% more"


def computation_percentage(decisions: Tensor) -> float:
    """The authors' "computation percentage": ``100 * (1 + sum_k executed_fraction_k) / (K + 1)``.

    Every block weighs the same; the always-run first block counts as executed; gates, stem and head are
    left out. ``decisions`` is (B, K). Its "FLOPs reduced" is ``100 - CP``.
    """
    k = decisions.shape[1]
    executed = decisions.to(torch.float64).mean(0).sum().item() if decisions.shape[0] else float(k)
    return 100.0 * (1.0 + executed) / (k + 1)


@torch.no_grad()
def cost_model(model: GatedResNet, image_size: int | None = None) -> CostModel:
    """Derive the :class:`CostModel` of ``model`` by running it region by region at batch size 1."""
    size = image_size or model.config.image_size
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.zeros(1, model.config.in_channels, size, size, device=p.device, dtype=p.dtype)
    counter = _Counter(model)
    try:
        fixed = 0
        with counter.region() as r:
            x = model.first_block(model.stem(x))
        fixed += r[0]
        state = model.gates.init_state(x) if model.gates is not None else None
        block_macs, gate_macs = [], []
        for i, block in enumerate(model.gated_blocks):
            with counter.region() as r:
                if model.gates is not None:
                    _, state = model.gate_step(i, x, state)
            gate_macs.append(r[0])
            with counter.region() as r:
                short = shortcut_branch(block, x)
            fixed += r[0]
            with counter.region() as r:
                res = residual_branch(block, x)
            block_macs.append(r[0])
            x = torch.relu(res + short)
        with counter.region() as r:
            model.head(x)
        fixed += r[0]
    finally:
        counter.close()
        model.train(was_training)
    params = sum(t.numel() for t in model.parameters())
    return CostModel(model.config.name, size, params, fixed, block_macs, gate_macs, list(model.block_stage))
