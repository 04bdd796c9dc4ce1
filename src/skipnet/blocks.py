"""The two functions of a gated residual block in Eq. 1, ``x_{i+1} = g_i F_i(x_i) + (1 - g_i) S_i(x_i)``.

``F_i`` is the whole BasicBlock/Bottleneck of :mod:`skipnet.backbones` (residual branch + shortcut + ReLU) and
``S_i`` its shortcut: the identity, or for a downsampling block its projection ``BN(conv1x1_s2(x))`` (no ReLU). Every
executor (:mod:`skipnet.executors`), the cost counter and the export graphs build on these.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _module

from skipnet.backbones import Bottleneck


def residual_branch(block: nn.Module, x: Tensor) -> Tensor:
    """The residual function of a BasicBlock/Bottleneck, before the addition."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(block.relu(out)))
    return out


def shortcut_branch(block: nn.Module, x: Tensor) -> Tensor:
    """What a skipped block yields (Eq. 1): its projection shortcut, or the identity."""
    return block.downsample(x) if block.downsample is not None else x


def plain_relu(block: nn.Module) -> bool:
    """Whether the block's activation is a plain ``nn.ReLU`` that nothing watches (no hook): then the fast paths
    may apply it as a fused or in-place ReLU; any other (``nn.ReLU6``, ``nn.LeakyReLU``, a hooked ReLU) is called
    as the module it is, as the plain ResNet's own forward calls it."""
    return type(block.relu) is nn.ReLU and not watched(block.relu)


def watched(module: nn.Module) -> bool:
    """Whether ``module`` is watched by forward hooks or pre-hooks, its own or global ones
    (``torch.nn.modules.module.register_module_forward_hook``): then a fast path calls it as the module it is."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
    )


def activation_(block: nn.Module, out: Tensor) -> Tensor:
    """The block's activation after the addition, ``block.relu(out)``: in place in ``out`` (a fresh tensor of the
    caller's) for a plain ReLU (:func:`plain_relu`)."""
    return F.relu_(out) if plain_relu(block) else block.relu(out)


def run_block(block: nn.Module, x: Tensor) -> Tensor:
    """``F_i(x)``: the whole residual block, ``act(residual(x) + shortcut(x))`` with the block's activation.

    The addition and a plain ReLU are done in place on the residual's fresh output (as torchvision's own blocks
    do), which is autograd-safe: batch norm does not save its output.
    """
    out = residual_branch(block, x)
    out += shortcut_branch(block, x)
    return activation_(block, out)


__all__ = ["activation_", "plain_relu", "residual_branch", "run_block", "shortcut_branch", "watched"]
