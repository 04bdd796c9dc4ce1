"""Training stages as small strategies over one loop: which gate mode the forward uses, and the loss.

- ``base``  plain ResNet (all blocks on), cross-entropy.
- ``sp``    supervised pre-training: straight-through hard gates (Eq. 7), cross-entropy only.
- ``hrl``   hybrid REINFORCE (Eq. 5-6): sampled gates, routed execution, CE + rl_weight * REINFORCE.
- ``soft``  soft-gating baseline: g = p in training, hard 0.5 threshold at inference (Table 3).
- ``rl``    pure REINFORCE from scratch: only the policy-gradient term, no supervised gradient (Fig. 10b).
- ``sdv``   stochastic-depth variant: blocks dropped at random with a fixed keep ratio, in training and
            inference (Fig. 6).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from skipnet.gated import GateMode, GateTrace
from skipnet.losses import (
    Baseline,
    adaptive_rate,
    batch_shape_loss,
    blockdrop_returns,
    difficulty_order_loss,
    gate_entropy,
    hybrid_returns,
    reinforce_loss,
)


@dataclass(frozen=True)
class Reward:
    """What a sampled route is paid (``--reward``): ``hybrid``, the paper's relaxed return of Eq. 6 (with
    ``--skip-target`` / ``--skip-reward correct``), or ``blockdrop``, BlockDrop's ``1 - u^2`` if right, else
    ``-penalty`` (:func:`~skipnet.losses.blockdrop_returns`; ``block_cost`` the gated blocks' MACs)."""

    kind: str = "hybrid"
    alpha: float = 0.1
    beta: float = 1.0
    skip_target: float | None = None
    correct_only: bool = False
    penalty: float = 1.0
    block_cost: Tensor | None = None

    def returns(self, ce: Tensor, decisions: Tensor, correct: Tensor | None) -> Tensor:
        """(B, N) returns of the routes taken, from the per-sample CE and whether each prediction was right."""
        if self.kind == "blockdrop":
            if correct is None:
                raise ValueError("the blockdrop reward needs whether each prediction was right")
            return blockdrop_returns(correct, decisions, self.penalty, self.block_cost)
        right = correct if self.correct_only else None
        return hybrid_returns(ce, decisions, self.alpha, self.beta, self.skip_target, right)


@dataclass(frozen=True)
class Stage:
    name: str
    train_mode: GateMode
    eval_mode: GateMode
    needs_gates: bool
    uses_rl: bool = False
    supervised: bool = True
    help: str = ""

    def loss(
        self,
        ce: Tensor,
        trace: GateTrace,
        *,
        alpha: float,
        beta: float,
        rl_weight: float,
        baseline: Baseline | None,
        task: Tensor | None = None,
        skip_target: float | None = None,
        correct: Tensor | None = None,
        reward: Reward | None = None,
        greedy: tuple[Tensor, Tensor, Tensor] | None = None,
        entropy: float = 0.0,
        shape: tuple[float | None, float, float | None] | None = None,
        difficulty: tuple[Tensor, float, float] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss from per-sample cross-entropy ``ce`` (B,) and the gate ``trace`` (B, N). ``task`` (B,), when
        given (``--distill``), replaces ``ce`` in the supervised term only; the HRL return keeps the paper's CE.
        ``correct`` (B,), when given (``--skip-reward correct``), pays the skip reward only to right predictions.

        ``reward``, when given, replaces alpha/beta/skip_target/correct (it holds them, or BlockDrop's reward;
        ``correct`` is then whether each prediction was right). ``greedy`` = (CE, decisions, correct) of the same
        batch under greedy decisions, for the self-critical baseline. ``entropy`` > 0 adds that weight times the
        batch-mean entropy of the gate policies to the objective (``--entropy-bonus``). ``shape`` = (rate, weight,
        floor) adds ``weight * batch_shape_loss(probs, rate)`` (``--batch-shape``), the rate per gate
        ``adaptive_rate(probs, floor)`` when ``floor`` is given (``--batch-shape-floor``); any stage whose gates
        have a gradient. ``difficulty`` = (per-image hardness (B,), spread, weight) adds ``weight *
        difficulty_order_loss(probs, hardness, spread)`` (``--difficulty-spread``), likewise."""
        stats: dict[str, Tensor] = {"ce": ce.detach().mean()}
        supervised = ce if task is None else task
        loss = supervised.mean() if self.supervised else ce.new_zeros(())
        if self.uses_rl and trace.num_gates:
            if reward is None:
                reward = Reward("hybrid", alpha, beta, skip_target, correct_only=correct is not None)
            returns = reward.returns(ce, trace.decisions, correct)  # (B, N), CE detached inside
            greedy_returns = reward.returns(*greedy) if greedy is not None else None
            b = baseline(returns, greedy_returns) if baseline is not None else None
            rl = reinforce_loss(trace.log_probs, returns, b)
            loss = loss + rl_weight * rl
            stats["rl"] = rl.detach()
            stats["reward"] = returns[:, 0].detach().mean()
            if entropy:
                h = gate_entropy(trace.logits).mean()
                loss = loss - entropy * h
                stats["entropy"] = h.detach()
        if shape is not None and trace.num_gates and trace.probs.requires_grad:
            rate, _, floor = shape
            term = batch_shape_loss(trace.probs, adaptive_rate(trace.probs, floor) if floor is not None else rate)
            loss = loss + shape[1] * term
            stats["shape"] = term.detach()
        if difficulty is not None and trace.num_gates and trace.probs.requires_grad:
            hardness, spread, weight = difficulty
            term = difficulty_order_loss(trace.probs, hardness, spread)
            loss = loss + weight * term
            stats["order"] = term.detach()
        return loss, stats


STAGES: dict[str, Stage] = {
    "base": Stage("base", GateMode.ALL_ON, GateMode.ALL_ON, False, help="plain ResNet"),
    "sp": Stage("sp", GateMode.HARD, GateMode.GREEDY, True, help="supervised pre-training, hard straight-through"),
    "hrl": Stage("hrl", GateMode.SAMPLE, GateMode.GREEDY, True, uses_rl=True, help="hybrid REINFORCE (Eq. 5-6)"),
    "soft": Stage("soft", GateMode.SOFT, GateMode.GREEDY, True, help="soft gating baseline"),
    "rl": Stage("rl", GateMode.SAMPLE, GateMode.GREEDY, True, uses_rl=True, supervised=False, help="pure REINFORCE"),
    "sdv": Stage("sdv", GateMode.RANDOM, GateMode.RANDOM, False, help="stochastic-depth variant (random skipping)"),
}
