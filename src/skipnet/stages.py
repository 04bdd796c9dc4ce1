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
from skipnet.losses import Baseline, hybrid_returns, reinforce_loss


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
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss from per-sample cross-entropy ``ce`` (B,) and the gate ``trace`` (B, N). ``task`` (B,), when
        given (``--distill``), replaces ``ce`` in the supervised term only; the HRL return keeps the paper's CE.
        ``correct`` (B,), when given (``--skip-reward correct``), pays the skip reward only to right predictions."""
        stats: dict[str, Tensor] = {"ce": ce.detach().mean()}
        supervised = ce if task is None else task
        loss = supervised.mean() if self.supervised else ce.new_zeros(())
        if self.uses_rl and trace.num_gates:
            # (B, N), CE detached inside
            returns = hybrid_returns(ce, trace.decisions, alpha, beta, skip_target, correct)
            b = baseline(returns) if baseline is not None else None
            rl = reinforce_loss(trace.log_probs, returns, b)
            loss = loss + rl_weight * rl
            stats["rl"] = rl.detach()
            stats["reward"] = returns[:, 0].detach().mean()
        return loss, stats


STAGES: dict[str, Stage] = {
    "base": Stage("base", GateMode.ALL_ON, GateMode.ALL_ON, False, help="plain ResNet"),
    "sp": Stage("sp", GateMode.HARD, GateMode.GREEDY, True, help="supervised pre-training, hard straight-through"),
    "hrl": Stage("hrl", GateMode.SAMPLE, GateMode.GREEDY, True, uses_rl=True, help="hybrid REINFORCE (Eq. 5-6)"),
    "soft": Stage("soft", GateMode.SOFT, GateMode.GREEDY, True, help="soft gating baseline"),
    "rl": Stage("rl", GateMode.SAMPLE, GateMode.GREEDY, True, uses_rl=True, supervised=False, help="pure REINFORCE"),
    "sdv": Stage("sdv", GateMode.RANDOM, GateMode.RANDOM, False, help="stochastic-depth variant (random skipping)"),
}
