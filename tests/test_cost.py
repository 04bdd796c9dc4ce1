"""Cost accounting: exact MACs per region, cross-checked against FlopCounterMode and the paper's anchors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from skipnet import create_model
from skipnet.cost import CostModel, computation_percentage, cost_model


def _flops(model, x: torch.Tensor, **kwargs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, **kwargs)
    return counter.get_total_flops()


# FlopCounterMode counts 2 FLOPs per multiply-add of convolutions and matrix products (linear layers and
# the LSTM cell's two affine maps) and nothing else -- the same operations the cost model's hooks count, so
# every comparison below is an exact integer equality. Each forward runs at batch size 1, where routed
# execution takes a plain Python branch per block: an executed block runs its residual branch and its
# shortcut once, a skipped block only its shortcut, and every gate runs once. So
#   all_on forward                       = 2 * (fixed + sum(block))                  (no gate is computed)
#   greedy at threshold 0 (all execute)  = 2 * (fixed + sum(block) + sum(gates))
#   forced decisions d                   = 2 * macs_per_image(d) = 2 * (fixed + d @ block + sum(gates))
# (Masked execution would count each shortcut twice -- inside F_i and again as S_i -- which is why routed
# execution is the one compared.)
ARCHS = [
    "tiny_resnet_14",
    "tiny_rnn_gate_14",
    "tiny_feedforward_14",
    "tiny_feedforward2_14",
    "tiny_aig_gate_14",
    "cifar10_rnn_gate_38",
    "cifar10_aig_gate_38",
    "cifar10_feedforward_38",
    "cifar10_feedforward_110",
]


@pytest.mark.parametrize("name", ARCHS)
def test_cost_model_matches_flop_counter(name: str) -> None:
    model = create_model(name).eval()
    cm = cost_model(model)
    n = model.num_gates
    assert cm.num_gates == n == len(cm.gate_macs)
    assert cm.block_stage == model.block_stage
    assert all(b > 0 for b in cm.block_macs)
    assert all(g > 0 for g in cm.gate_macs) == model.config.gated
    x = torch.randn(1, 3, cm.image_size, cm.image_size)
    gates = sum(cm.gate_macs)

    assert _flops(model, x, mode="all_on") == 2 * cm.total_macs_all_on
    assert _flops(model, x, mode="greedy", threshold=0.0) == 2 * (cm.total_macs_all_on + gates)
    zeros = torch.zeros(1, n)
    assert _flops(model, x, decisions=zeros) == 2 * (cm.fixed_macs + gates)
    d = torch.bernoulli(torch.full((1, n), 0.5))
    assert 0 < d.sum() < n
    assert _flops(model, x, decisions=d) == 2 * int(cm.macs_per_image(d).item())
    if n <= 5:  # pin every block's own cost, not just a sum: execute exactly one block at a time
        for i in range(n):
            one = torch.zeros(1, n)
            one[0, i] = 1.0
            assert _flops(model, x, decisions=one) == 2 * (cm.fixed_macs + cm.block_macs[i] + gates)


def test_cost_model_imagenet_resnet50_at_224() -> None:
    model = create_model("imagenet_resnet_50").eval()
    cm = cost_model(model)
    assert cm.image_size == 224 and cm.num_gates == 15
    x = torch.randn(1, 3, 224, 224)
    assert _flops(model, x, mode="all_on") == 2 * cm.total_macs_all_on
    d = torch.zeros(1, 15)
    d[0, ::2] = 1.0
    assert _flops(model, x, decisions=d) == 2 * int(cm.macs_per_image(d).item())


def test_cost_model_restores_training_mode_and_image_size() -> None:
    model = create_model("tiny_rnn_gate_14").train()
    cm64 = cost_model(model, image_size=64)
    assert model.training
    cm32 = cost_model(model)
    assert cm64.image_size == 64 and cm32.image_size == 32
    # Convolutions scale with the area; the gates' pooled inputs and the head do not.
    assert cm64.block_macs == [4 * b for b in cm32.block_macs]
    assert cm64.gate_macs == cm32.gate_macs
    assert cm32.params == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- paper anchors


@pytest.mark.parametrize(
    ("name", "expected", "rel"),
    [
        ("cifar10_resnet_110", 2.53e8, 0.01),
        ("cifar10_resnet_38", 0.85e8, 0.03),
        ("imagenet_resnet_50", 4.1e9, 0.02),
        ("imagenet_resnet_101", 7.8e9, 0.02),
    ],
)
def test_paper_cost_anchors(name: str, expected: float, rel: float) -> None:
    cm = cost_model(create_model(name))
    assert cm.total_macs_all_on == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("cifar10_rnn_gate_110", 0.0, 0.001),  # ~0.04% of a block
        ("cifar10_feedforward_38", 0.12, 0.20),  # FFGate-I, ~15.6% (paper: 19%)
        ("cifar10_feedforward_110", 0.12, 0.13),  # FFGate-II, 12.5%
        ("cifar10_resnet_110", 0.0, 0.0),
    ],
)
def test_gate_overhead(name: str, low: float, high: float) -> None:
    cm = cost_model(create_model(name))
    assert low <= cm.gate_overhead <= high
    if name.endswith("_110"):
        assert cm.num_gates == 53
    assert cm.gate_overhead == sum(cm.gate_macs) / sum(cm.block_macs)


def test_ff_gate_cost_per_block() -> None:
    # On a block that keeps its resolution (C -> C, HxW): the residual branch is 2 * 9 C^2 HW.
    # FFGate-II: one 3x3 stride-2 conv = 9 C^2 HW / 4, i.e. 1/8 of the block (+ the C -> 1 linear).
    # FFGate-I: 2x2 max-pool, 3x3 conv at HW/4, 3x3 stride-2 conv at HW/16: (1/4 + 1/16) / 2 = 15.625%.
    for name, ratio in (("cifar10_feedforward_110", 0.125), ("cifar10_feedforward_38", 0.15625)):
        cm = cost_model(create_model(name))
        c, hw = 16, 32 * 32
        assert cm.block_macs[0] == 2 * 9 * c * c * hw
        assert cm.gate_macs[0] == int(ratio * cm.block_macs[0]) + c


def test_rnn_gate_cost() -> None:
    cm = cost_model(create_model("cifar10_rnn_gate_110"))
    assert cm.num_gates == 53

    def gate(c: int) -> int:  # projection C -> 10, shared LSTM cell (10 -> 10), shared output 10 -> 1
        return c * 10 + 4 * 10 * (10 + 10) + 10

    # 18 blocks per stage, the very first ungated; the first block of stages 2 and 3 reads the previous
    # stage's narrower output: 17 + 1 gates read 16 channels, 17 + 1 read 32, 17 read 64.
    assert sorted(cm.gate_macs) == sorted([gate(16)] * 18 + [gate(32)] * 18 + [gate(64)] * 17)


# --------------------------------------------------------------------------------------------- per-image cost


def test_macs_per_image_hand_made() -> None:
    cm = CostModel("hand", 32, 0, fixed_macs=100, block_macs=[10, 20, 30], gate_macs=[1, 2, 3])
    d = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert cm.macs_per_image(d).tolist() == [146.0, 106.0, 166.0]
    assert cm.macs_per_image(d, include_gates=False).tolist() == [140.0, 100.0, 160.0]
    assert cm.macs_per_image(d).dtype == torch.float64
    assert cm.total_macs_all_on == 160
    assert cm.gate_overhead == 6 / 60
    d_ = cm.to_dict()
    assert d_["gates"] == 3 and d_["total_macs_all_on"] == 160


def test_macs_per_image_real_model() -> None:
    cm = cost_model(create_model("cifar10_rnn_gate_38"))
    d = torch.bernoulli(torch.full((4, cm.num_gates), 0.5))
    blocks = torch.tensor(cm.block_macs, dtype=torch.float64)
    expected = cm.fixed_macs + d.double() @ blocks + sum(cm.gate_macs)
    assert torch.equal(cm.macs_per_image(d), expected)
    assert cm.macs_per_image(torch.ones(1, cm.num_gates)).item() == cm.total_macs_all_on + sum(cm.gate_macs)


def test_computation_percentage() -> None:
    k = 5
    assert computation_percentage(torch.ones(4, k)) == pytest.approx(100.0)
    assert computation_percentage(torch.zeros(4, k)) == pytest.approx(100.0 / (k + 1))
    # Executed fractions per block 1, 0.5, 0, 0 -> 100 * (1 + 1.5) / 5 = 50.
    mix = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert computation_percentage(mix) == pytest.approx(50.0)
    assert computation_percentage(torch.tensor([[True, False, True]])) == pytest.approx(75.0)
