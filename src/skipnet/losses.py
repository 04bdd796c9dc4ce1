"""The hybrid objective (paper Eq. 5-6) and its REINFORCE estimator, at explicit (B, N) shapes.

    J = E_x E_g [ L(y_hat(x, F, g), y) - (alpha / N) * sum_i R_i ],   R_i = (1 - g_i) * C_i   (Eq. 5)
    r_i = -[ beta * L - (alpha / N) * sum_{j >= i} R_j ]                                      (Eq. 6, relaxed)
    grad J = E[grad L] - E[ sum_i grad log p(g_i | x) * r_i ]                                 (Eq. 6)

``L`` is the per-sample cross-entropy, detached inside the return. Every tensor here is (B, N): one row per
sample, one column per gate -- the authors' ImageNet code multiplied (B,) log-probs by (B, 1) returns and
broadcast to (B, B), crediting each action with the batch-average return.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def skip_rewards(decisions: Tensor) -> Tensor:
    """``R_i = (1 - g_i) * C_i`` (Eq. 5) with ``C_i = 1``, (B, N)."""
    return 1.0 - decisions


def hybrid_returns(
    ce: Tensor,
    decisions: Tensor,
    alpha: float,
    beta: float = 1.0,
    skip_target: float | None = None,
    correct: Tensor | None = None,
) -> Tensor:
    """Per-sample, per-gate returns ``r_i`` of Eq. 6 (with the beta relaxation), shape (B, N).

    Args:
        ce: (B,) per-sample cross-entropy; detached here.
        decisions: (B, N) sampled 0/1 gate actions.
        skip_target: beyond the paper (``--skip-target``): the skip reward stops growing once a sample has
            skipped this fraction ``s`` of its N gated blocks. The reward of gate j becomes the increment of the
            capped running total, ``min(c_j, sN) - min(c_{j-1}, sN)`` with ``c_j = sum_{k <= j} R_k``, so the
            reward to go is ``min(c_N, sN) - min(c_{i-1}, sN)``; ``None`` (or s >= 1) is Eq. 6 unchanged.
        correct: beyond the paper (``--skip-reward correct``): (B,) 0/1, whether each sample's prediction was
            right; the skip reward of a wrong sample is zero (``R_i = (1 - g_i) C_i [y_hat = y]``), so a wrong
            image is paid only for lowering its loss, never for skipping (BlockDrop's reward likewise pays for
            skipping only when the prediction is correct). ``None`` is Eq. 5.
    """
    if ce.dim() != 1 or decisions.dim() != 2 or decisions.shape[0] != ce.shape[0]:
        raise ValueError(f"expected ce (B,) and decisions (B, N); got {tuple(ce.shape)} and {tuple(decisions.shape)}")
    n = decisions.shape[1]
    rewards = skip_rewards(decisions.to(ce.dtype))
    if skip_target is None:
        future = rewards.flip(1).cumsum(1).flip(1)  # sum_{j >= i} R_j
    else:
        cap, running = skip_target * n, rewards.cumsum(1)  # c_j
        before = (running - rewards).clamp(max=cap)  # min(c_{i-1}, sN)
        future = running[:, -1:].clamp(max=cap) - before  # min(c_N, sN) - min(c_{i-1}, sN)
    if correct is not None:
        future = future * correct.detach().to(future.dtype).view(-1, 1)
    return -(beta * ce.detach().view(-1, 1) - (alpha / n) * future)


def blockdrop_returns(correct: Tensor, decisions: Tensor, penalty: float, block_cost: Tensor | None = None) -> Tensor:
    """Beyond the paper (``--reward blockdrop``): BlockDrop's reward (Wu et al., CVPR 2018, Eq. 3), given to every
    gate of a sample, shape (B, N):

        R = 1 - u^2   if the prediction is right,   R = -penalty   otherwise

    with ``u = sum_i g_i c_i / sum_i c_i`` the executed share of the gated blocks' cost (``block_cost`` (N,), the
    MACs of each gated block; ``None``: every block costs the same). A wrong image earns the same whatever it
    skips, so only images that stay right are paid for skipping: the pressure to skip falls on easy images.

    Args:
        correct: (B,) 0/1 (or bool), whether each sample's prediction was right.
        decisions: (B, N) 0/1 gate actions.
        penalty: gamma >= 0, the cost of a wrong prediction.
    """
    if correct.dim() != 1 or decisions.dim() != 2 or decisions.shape[0] != correct.shape[0]:
        raise ValueError(
            f"expected correct (B,) and decisions (B, N); got {tuple(correct.shape)} and {tuple(decisions.shape)}"
        )
    g = decisions.detach().float()
    cost = g.new_ones(g.shape[1]) if block_cost is None else block_cost.to(g)
    used = (g * cost).sum(1) / cost.sum()  # u, (B,)
    right = correct.detach().float()
    reward = right * (1.0 - used * used) - (1.0 - right) * float(penalty)
    return reward.view(-1, 1).expand_as(g).contiguous()


def gate_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of the gates' Bernoulli policies, ``sum_i H(sigmoid(z_i))`` (B,), in nats; stable in
    the logit: ``H = softplus(z) - z sigmoid(z)``. ``--entropy-bonus`` adds its batch mean, weighted, to the
    REINFORCE objective (beyond the paper; as BlockDrop's ``beta``), so the gates are kept from saturating."""
    z = logits.float()
    return (F.softplus(z) - z * torch.sigmoid(z)).sum(1)


def batch_shape_loss(probs: Tensor, rate: float | Tensor, low: float = 0.1, high: float = 0.9) -> Tensor:
    """Beyond the paper (``--batch-shape RATE``): a per-gate, batch-level term that a gate deciding the same for
    every image cannot satisfy. Over a batch of B images, each gate's probabilities, sorted, are matched to the
    quantiles of a two-point prior: the ``rate`` share of the images it ranks highest to ``high``, the others to
    ``low``, by mean squared difference (the 2-Wasserstein distance between the batch's distribution of ``p`` and
    the prior; batch-shaping, Ehteshami Bejnordi et al., ICLR 2020, matches CDFs to a Beta prior instead):

        loss = mean_{l, k} (p_(k),l - q_k)^2,   q_k = high if k > B - round(rate B) else low   (k = 1..B, ascending)

    A static gate (one ``p`` for every image) pays ``rate (1 - rate) (high - low)^2`` at best; a gate that splits
    the batch pays 0. Which images it executes is left to the reward. ``probs`` (B, N), returns a scalar; ``rate``
    a float, or (N,) one per gate (:func:`adaptive_rate`)."""
    rates = torch.as_tensor(rate, dtype=torch.float32, device=probs.device).reshape(-1)
    if probs.dim() != 2 or rates.numel() not in (1, probs.shape[1]) or not bool(((rates > 0) & (rates < 1)).all()):
        raise ValueError(f"expected probs (B, N) and 0 < rate < 1 (one or N); got {tuple(probs.shape)} and {rate}")
    b = probs.shape[0]
    sorted_p = probs.float().sort(0).values  # ascending over the batch, per gate
    k = torch.arange(1, b + 1, device=probs.device, dtype=torch.float32).view(-1, 1)
    high_count = torch.round(rates.view(1, -1) * b)  # the images each gate should execute, rate * B rounded
    target = torch.where(k > b - high_count, high, low)
    return ((sorted_p - target) ** 2).mean()


def difficulty_order_loss(probs: Tensor, difficulty: Tensor, spread: float) -> Tensor:
    """Beyond the paper (``--difficulty-spread S``): each image's executed share ``e_b = mean_l p_bl`` is pulled
    towards a target set by how hard the image is within its batch. With ``r_b`` the rank of ``difficulty`` (0 for
    the easiest of B images) and ``m`` the batch mean of ``e`` (detached, so the term moves no compute level):

        loss = mean_b (e_b - t_b)^2,   t_b = clip(m + 2 S (r_b / (B - 1) - 1/2), 0, 1)

    so the hardest image is asked for ``m + S``, the easiest for ``m - S``. Which blocks an image executes is left
    to the gates. ``difficulty`` (B,) is any per-image hardness, e.g. the teacher's cross-entropy (Fig. 1/7: hard
    images should execute more). ``probs`` (B, N); returns a scalar."""
    if probs.dim() != 2 or difficulty.shape != probs.shape[:1] or not 0.0 < spread <= 0.5:
        got = f"{tuple(probs.shape)}, {tuple(difficulty.shape)}, {spread}"
        raise ValueError(f"expected probs (B, N), difficulty (B,), 0 < spread <= 0.5; got {got}")
    share = probs.float().mean(1)
    b = share.shape[0]
    rank = difficulty.detach().argsort().argsort().float()
    u = rank / (b - 1) - 0.5 if b > 1 else torch.zeros_like(rank)
    target = (share.detach().mean() + 2.0 * spread * u).clamp(0.0, 1.0)
    return ((share - target) ** 2).mean()


def adaptive_rate(probs: Tensor, floor: float) -> Tensor:
    """``--batch-shape-floor M``: each gate's own batch-mean probability, clipped to ``[M, 1 - M]`` (detached), as
    :func:`batch_shape_loss`'s per-gate rate. The reward keeps choosing how much each gate executes; the term only
    asks that at least the share M of the images go the other way at every gate, so no gate is static. (N,)"""
    return probs.detach().float().mean(0).clamp(floor, 1.0 - floor)


def mean_first_return(
    ce_mean: float, skip_fraction: float, alpha: float, beta: float = 1.0, skip_target: float | None = None
) -> float:
    """The batch mean of the first gate's return ``r_1`` (Eq. 6 at i = 1, ``C_i = 1``), from the mean
    cross-entropy and the mean fraction of gated blocks skipped: ``-(beta L) + alpha * skipped / N``. It is linear
    in both, so this equals ``hybrid_returns(ce, decisions, alpha, beta)[:, 0].mean()`` (tested). It is what HRL
    maximises, used to choose the HRL checkpoint on the validation split. With ``skip_target`` the mean fraction
    is capped at it: an upper bound of the mean capped return (the cap is per sample), exact when no sample is
    above the target."""
    if skip_target is not None:
        skip_fraction = min(skip_fraction, skip_target)
    return -(beta * ce_mean) + alpha * skip_fraction


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample knowledge distillation ``T^2 * KL(softmax(t / T) || softmax(s / T))``, shape (B,) (Hinton et
    al. 2015; beyond the paper). The ``T^2`` keeps its gradient on the scale of the cross-entropy's."""
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return (t * t) * (log_t.exp() * (log_t - log_s)).sum(1)


def distilled_task_loss(ce: Tensor, kd: Tensor, weight: float) -> Tensor:
    """The backbone's per-sample supervised loss under ``--distill``: ``(1 - w) * CE + w * KD``, (B,). The HRL
    return (Eq. 6) keeps the cross-entropy: with the teacher's ``T^2``-scaled KL inside it, every skipped block
    looked far costlier than ``alpha`` repays (measured: no block skipped at alpha 3.5, RESULTS.md)."""
    return (1.0 - weight) * ce + weight * kd


def reinforce_loss(log_probs: Tensor, returns: Tensor, baseline: Tensor | None = None) -> Tensor:
    """Surrogate whose gradient is ``-sum_i grad log p(g_i|x) * (r_i - b_i)``, averaged over the batch.

    Args:
        log_probs: (B, N) ``log pi(g_i | x)`` with gradient to the policy.
        returns: (B, N) returns (no gradient).
        baseline: optional (N,) or (B, N) baseline subtracted for variance reduction.
    """
    if log_probs.shape != returns.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and returns {tuple(returns.shape)} must both be (B, N)")
    advantage = returns.detach()
    if baseline is not None:
        advantage = advantage - baseline.detach()
    return -(log_probs * advantage).sum(1).mean()


BASELINES = ("none", "batch", "ema", "self-critical")


class Baseline:
    """Baseline ``b_i`` of the return (optional variance reduction): none; the batch mean per gate; its moving
    average (ema); or self-critical (beyond the paper; Rennie et al. 2017, BlockDrop's ``r(sampled) - r(greedy)``):
    each sample's own return under the greedy decisions of the same network, ``greedy`` (B, N), so a sampled
    route is reinforced exactly when it beats what the policy would do at inference on that image."""

    def __init__(self, kind: str = "none", momentum: float = 0.9) -> None:
        if kind not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {kind!r}")
        self.kind, self.momentum, self.value = kind, momentum, None

    def __call__(self, returns: Tensor, greedy: Tensor | None = None) -> Tensor | None:
        if self.kind == "self-critical":
            if greedy is None or greedy.shape != returns.shape:
                raise ValueError("the self-critical baseline needs the greedy returns, shaped as the returns")
            return greedy.detach()
        if self.kind == "none":
            return None
        batch = returns.detach().mean(0)
        if self.kind == "batch":
            return batch
        if self.value is None:
            self.value = batch
        out = self.value
        self.value = self.momentum * self.value + (1 - self.momentum) * batch
        return out

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state.get("value")


class SkipBudget:
    """Beyond the paper (``--skip-budget S``): alpha of Eq. 5 adapted so that the policy skips a fraction ``S`` of
    the gated blocks on average over the data, not per sample.

    HRL with a fixed alpha minimises ``E[L] - alpha E[skipped fraction]``; with the constraint ``E[skipped] >= S``
    that is the Lagrangian with alpha as its multiplier, and dual ascent finds it:

        alpha <- max(0, alpha + eta * (S - skipped))

    after each step, ``skipped`` the step's (global) batch mean of the sampled decisions. The reward stays linear
    in every sample's own skips (Eq. 5-6 at the current alpha), so images whose loss suffers little skip more
    than the budget and hard ones less, unlike ``--skip-target``, which caps each sample at S.
    """

    def __init__(self, budget: float, alpha: float, lr: float) -> None:
        if not 0.0 < budget < 1.0 or alpha < 0 or lr <= 0:
            raise ValueError(f"need 0 < budget < 1, alpha >= 0, lr > 0; got {budget}, {alpha}, {lr}")
        self.budget, self.alpha, self.lr = float(budget), float(alpha), float(lr)

    def update(self, skipped: float) -> float:
        """One dual-ascent step from the mean skipped fraction of a batch; returns the new alpha."""
        self.alpha = max(0.0, self.alpha + self.lr * (self.budget - float(skipped)))
        return self.alpha

    def state_dict(self) -> dict:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])


__all__ = [
    "BASELINES",
    "Baseline",
    "SkipBudget",
    "difficulty_order_loss",
    "distillation_loss",
    "distilled_task_loss",
    "adaptive_rate",
    "batch_shape_loss",
    "blockdrop_returns",
    "gate_entropy",
    "hybrid_returns",
    "mean_first_return",
    "reinforce_loss",
    "skip_rewards",
]
