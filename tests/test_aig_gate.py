"""ConvNet-AIG's gate (``aig``, beyond the paper): pooled features -> linear -> BatchNorm -> ReLU -> linear."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from skipnet.gates import AIGGate
from skipnet.registry import create_model, get_config
from skipnet.train import freeze_batchnorm


def test_registry_names_the_aig_gate() -> None:
    assert get_config("cifar10_aig_gate_38").gate == "aig"
    assert get_config("cifar100_aig_gate_56").gate == "aig"  # any 6n+2 depth by pattern
    model = create_model("tiny_aig_gate_14")
    assert all(isinstance(g, AIGGate) for g in model.gates.gates)


def test_training_logits_see_an_image_relative_to_its_batch() -> None:
    """In training the gate normalises over the batch: a feature offset shared by every image changes no logit
    (a gate without the BatchNorm would move every image together)."""
    torch.manual_seed(0)
    gate = AIGGate(8).train()
    x = torch.randn(16, 8, 4, 4)
    shift = torch.randn(1, 8, 1, 1) * 5
    torch.testing.assert_close(gate(x), gate(x + shift), rtol=1e-4, atol=1e-4)
    gate.eval()  # inference: running statistics, so the shift shows
    assert (gate(x) - gate(x + shift)).abs().max() > 1e-2


def test_inference_logit_is_the_formula() -> None:
    torch.manual_seed(1)
    gate = AIGGate(8)
    gate.train()
    for _ in range(5):  # give the BatchNorm running statistics that are not (0, 1)
        gate(torch.randn(16, 8, 4, 4) * 3 + 1)
    gate.eval()
    x = torch.randn(4, 8, 4, 4)
    bn = gate.bn
    h = x.mean(dim=(2, 3)) @ gate.proj.weight.T
    h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    want = F.linear(F.relu(h), gate.fc.weight, gate.fc.bias)[:, 0]
    torch.testing.assert_close(gate(x), want)


def test_a_single_training_image_uses_the_running_statistics() -> None:
    torch.manual_seed(2)
    gate = AIGGate(8)
    x = torch.randn(1, 8, 4, 4)
    want = gate.eval()(x)
    torch.testing.assert_close(gate.train()(x), want)


def test_frozen_batchnorm_leaves_the_aig_gates_normalising() -> None:
    model = create_model("tiny_aig_gate_14").train()
    freeze_batchnorm(model)
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(n.startswith("gates.") for n, _ in bns) and any(not n.startswith("gates.") for n, _ in bns)
    for name, m in bns:
        assert m.training == name.startswith("gates."), name
    rnn = create_model("tiny_feedforward_14").train()  # the paper's feed-forward gates freeze with the backbone
    freeze_batchnorm(rnn)
    assert not any(m.training for m in rnn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
