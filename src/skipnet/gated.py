"""The gated ResNet (paper Eq. 1) with every gating behaviour as a mode of one network.

Placement follows the authors' code: the first residual block of the network always runs and every later
block ``i`` is gated by a decision ``g_i`` computed from its input ``x_i``:

    x_{i+1} = g_i * F_i(x_i) + (1 - g_i) * S_i(x_i)                                    (Eq. 1)

where ``F_i`` is the whole residual block (residual branch + shortcut + ReLU) and ``S_i`` its shortcut
(:mod:`skipnet.blocks`). One forward is one loop over the gated blocks with two collaborators chosen once per
call: a gate *policy* (:mod:`skipnet.policy`: the modes of :class:`GateMode` -- ``hard``, ``soft``, ``sample``,
``greedy``, ``random``, ``all_on`` -- the threshold, keep ratio, exploration and forced decisions give each
block's decision and, at the end, the trace with its log-probabilities) and an *executor*
(:mod:`skipnet.executors`: masked, or routed -- each block only on the samples that execute it).

In training (``model.train()`` with autograd on) the default mode stays :attr:`GatedResNet.mode` (``greedy``
for a gated network), which gives the gates no gradient; a forward that relies on it warns once. Pass
``mode="hard"`` (supervised pre-training, Eq. 7) or ``mode="sample"`` (REINFORCE, Eq. 5-6) to train the gates.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from skipnet import capture, executors, policy
from skipnet.backbones import Bottleneck, build_backbone, stages
from skipnet.config import ArchConfig
from skipnet.errors import SkipnetError
from skipnet.gates import GateBank, build_gates
from skipnet.outputs import GateTrace, SkipOutput
from skipnet.policy import GateMode

__all__ = ["GateMode", "GateTrace", "GatedResNet", "LogitsOnly", "SkipOutput"]


class GatedResNet(nn.Module):
    """A ResNet whose residual blocks (all but the first) can be skipped per input.

    Args:
        config: the architecture. ``config.gate == "none"`` builds a plain ResNet, which still supports the
            ``all_on`` and ``random`` (SDV) modes.

    Attributes:
        backbone: the ResNet (torchvision layout); for ImageNet a ``torchvision.models.ResNet`` whose
            state dict is interchangeable with torchvision's.
        gates: the :class:`~skipnet.gates.GateBank`, or ``None`` for a plain ResNet.
        mode, threshold, keep_ratio: defaults for :meth:`forward` (checkpoints store ``threshold``).
    """

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        layers = stages(self.backbone)
        # The blocks are looked up by these names at every forward (:attr:`_blocks`), never kept: a block replaced in
        # the tree (``m.backbone.layer3[1] = ...``, quantization, pruning tools) is the one that runs.
        self._stage_names = tuple(f"layer{s + 1}" for s in range(len(layers)))
        self.block_stage = [s for s, layer in enumerate(layers) for _ in layer][1:]  # stage index of each gated block
        blocks = self._blocks
        channels = [self._in_channels(b) for b in blocks[1:]]
        self.gates: GateBank | None = build_gates(config.gate, channels, config.rnn_embed, config.rnn_hidden)
        self.mode = GateMode.GREEDY if config.gated else GateMode.ALL_ON
        self.threshold = 0.5
        self.keep_ratio = 1.0
        # beyond the paper: no gradient from a gate into the features it reads (``skipnet train --detach-gates``)
        self.detach_gate_inputs = False
        # the normalisation and class names its weights were trained with, as its checkpoint recorded them
        # (set by skipnet.checkpoint.model_from_checkpoint, saved again by make_checkpoint); never read here
        self.data_record: dict = {}

    @staticmethod
    def _in_channels(block: nn.Module) -> int:
        return block.conv1.in_channels

    @torch.no_grad()
    def zero_init_residual(self) -> None:
        """Zero the scale of the last BN of every residual branch (Goyal et al. 2017; torchvision's
        ``zero_init_residual``), beyond the paper: each block starts as the identity, so a freshly initialised
        branch does not disturb the signal. In SP the gate's gradient is the inner product of the output gradient
        with the branch, zero here, and a branch learns only where its block runs: gates that start closed stay
        closed, so pair it with an open gate bias (:meth:`set_gate_bias`)."""
        for block in self._blocks:
            bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            bn.weight.zero_()

    @torch.no_grad()
    def set_gate_bias(self, bias: float) -> None:
        """Set the bias of every gate's output layer, so each gate starts at ``p = sigmoid(bias)`` (beyond the
        paper: a positive bias starts SP from scratch with the blocks executing)."""
        if self.gates is None:
            raise SkipnetError(f"{self.config.name} has no gates to set a bias on")
        for fc in self.gates.heads():
            fc.bias.fill_(float(bias))

    @property
    def _blocks(self) -> list[nn.Module]:
        """Every residual block, in order, as the module tree holds them now (a few dictionary reads)."""
        layers = self.backbone._modules
        blocks = [b for name in self._stage_names for b in layers[name]]
        if len(blocks) != len(self.block_stage) + 1:
            raise SkipnetError(
                f"{self.config.name} was built with {len(self.block_stage) + 1} residual blocks and its gates for "
                f"them, but its backbone now holds {len(blocks)}"
            )
        return blocks

    @property
    def num_gates(self) -> int:
        """N: the number of gated blocks (blocks - 1)."""
        return len(self.block_stage)

    @property
    def first_block(self) -> nn.Module:
        return self._blocks[0]

    @property
    def gated_blocks(self) -> list[nn.Module]:
        return self._blocks[1:]

    def stem(self, x: Tensor) -> Tensor:
        b = self.backbone
        return b.maxpool(b.relu(b.bn1(b.conv1(x))))

    def head(self, x: Tensor) -> Tensor:
        pooled = executors.global_avg_pool(x, self.backbone.avgpool)  # a gradient in x's memory format
        return self.backbone.fc(torch.flatten(pooled, 1))

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` before compiling: a SkipNet cannot be scripted; say what to use."""
        raise SkipnetError(capture.REFUSE_SCRIPT)

    def gate_step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Logit (B,) of gate ``i`` from the input ``x`` of gated block ``i``; with :attr:`detach_gate_inputs` the
        gate reads ``x`` detached, so that no loss reaches the backbone through a gate: the straight-through and
        REINFORCE gradients train the gates alone, and the backbone cannot move its features to open or close
        blocks (with frozen gates it learns only the routes it is given)."""
        assert self.gates is not None
        return self.gates.step(i, x.detach() if self.detach_gate_inputs else x, state)

    def forward(
        self,
        x: Tensor,
        mode: GateMode | str | None = None,
        *,
        threshold: float | None = None,
        keep: float | None = None,
        decisions: Tensor | None = None,
        execution: str = "auto",
        explore: float = 0.0,
    ) -> SkipOutput:
        """Run the network on images ``x`` (B, C, H, W).

        Args:
            mode: a :class:`GateMode` (default ``self.mode``); threshold: greedy/hard threshold on ``p`` (default
                ``self.threshold``); keep: keep ratio of ``random`` mode (default ``self.keep_ratio``).
            decisions: (B, N) forced 0/1 decisions; gates are still computed (their cost is real) but the
                given decisions are taken. Used by benchmarks and tests.
            execution: ``"auto"``, ``"routed"`` or ``"masked"`` (:mod:`skipnet.executors`).
            explore: exploration floor ``eps`` of ``sample`` mode (beyond the paper): decisions are drawn from
                ``pi = eps + (1 - 2 eps) p`` and ``log_probs`` are those of ``pi``, so every block is tried on and
                off at least ``eps`` of the time; greedy inference at 0.5 decides as the policy's mode.

        Under ``torch.jit.trace`` and ``torch.export`` the forward runs masked, with every decision a tensor op
        (see :mod:`skipnet.capture`); ``torch.jit.script`` and FX symbolic tracing are refused.
        """
        paths = capture.paths(x)  # the fast paths, decided once (FX refused before anything branches on a proxy)
        if mode is None:
            self._check_default_mode()
        mode = GateMode(self.mode if mode is None else mode)
        executor = executors.choose(paths, execution, mode, decisions is not None)
        threshold = self.threshold if threshold is None else threshold
        keep = self.keep_ratio if keep is None else keep
        gate = policy.choose(self, mode, executor.routed, x.shape[0], decisions, threshold, keep, explore, paths)
        blocks = self._blocks  # from the module tree, once per forward
        x = blocks[0](self.stem(x))
        gate.start(x)  # from here on ``x`` is a tensor this forward made (routing may write into it)
        for i in range(1, len(blocks)):
            x = executor(blocks[i], x, gate.decide(i - 1, x))
        return SkipOutput(self.head(x), gate.trace(x))

    def _check_default_mode(self) -> None:
        """Warn once when training relies on a default mode that gives the gates no gradient."""
        if (
            self.training
            and self.gates is not None
            and not GateMode(self.mode).differentiable
            and torch.is_grad_enabled()
            and not self.__dict__.get("_warned_mode")
        ):
            self.__dict__["_warned_mode"] = True
            warnings.warn(
                f"skipnet: training {self.config.name} in its default mode {GateMode(self.mode).value!r}, which "
                "gives the gates no gradient; pass mode='hard' (supervised pre-training) or mode='sample' "
                "(REINFORCE), or set model.mode",
                stacklevel=3,
            )


class LogitsOnly(nn.Module):
    """``model`` returning the logits alone, for code that expects a classifier (``F.cross_entropy(net(x), y)``).

    ``mode`` and the other keyword arguments are passed to every forward; ``last_trace`` keeps the gate trace of
    the latest call (e.g. for a skip-ratio penalty). The wrapped model's state dict is the wrapper's under
    ``model.``.
    """

    def __init__(self, model: GatedResNet, mode: GateMode | str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.model, self.forward_mode, self.kwargs = model, mode, kwargs
        self.last_trace: GateTrace | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x, self.forward_mode, **self.kwargs)
        self.last_trace = out.trace
        return out.logits
