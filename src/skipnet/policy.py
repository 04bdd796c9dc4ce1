"""Gate policies: per gated block, the decision ``g_i`` and, at the end of the forward, its log-probability.

A policy is made once per forward (:func:`choose`) from the mode, threshold, keep ratio, exploration floor and
any forced decisions. :meth:`GatePolicy.start` sees the first gated block's input; :meth:`GatePolicy.decide`
runs gate ``i`` (paper §3.1, :mod:`skipnet.gates`) and returns block ``i``'s decision in the form the forward's
executor takes (:mod:`skipnet.executors`: the gate ``g`` (B,) for masked execution, the executing rows or a
``bool`` for routed); :meth:`GatePolicy.trace` assembles the :class:`~skipnet.outputs.GateTrace`, with
``log pi(g_i | x)`` of the Bernoulli policy (Eq. 3) for REINFORCE (Eq. 5-6).

Modes (:class:`GateMode`):

- ``hard``   straight-through (Eq. 7): forward ``1[p >= t]``, backward ``dp`` (supervised pre-training).
- ``soft``   ``g = p`` (the paper's soft-gating baseline in training).
- ``sample`` ``g ~ Bernoulli(p)`` (REINFORCE / hybrid RL, Eq. 5-6).
- ``greedy`` ``g = 1[p >= t]`` (inference; ``t`` = ``threshold``, 0.5 by default).
- ``random`` ``g ~ Bernoulli(keep)`` independent of the input (stochastic-depth variant, SDV).
- ``all_on`` every block runs, no gate is computed: exactly the plain ResNet.

To add a gate mode: a :class:`GateMode` member and a :class:`GatePolicy` subclass (its ``decide`` and
``decisions``), picked in :func:`choose`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from skipnet import capture
from skipnet.errors import SkipnetError
from skipnet.outputs import GateTrace

ALL_SKIP_THRESHOLD = 1.01  # greedy threshold above every p <= 1: no gated block runs (calibration's floor)


class GateMode(StrEnum):
    HARD = "hard"
    SOFT = "soft"
    SAMPLE = "sample"
    GREEDY = "greedy"
    RANDOM = "random"
    ALL_ON = "all_on"

    @property
    def needs_masked(self) -> bool:
        """Whether the mode's gradient needs every block for every sample (masked execution only)."""
        return self in (GateMode.HARD, GateMode.SOFT)

    @property
    def routed_by_default(self) -> bool:
        """Whether ``execution="auto"`` routes: nothing needs the skipped branch."""
        return self in (GateMode.SAMPLE, GateMode.GREEDY, GateMode.RANDOM)

    @property
    def differentiable(self) -> bool:
        """Whether training in this mode gives the gates a gradient (straight-through, soft or REINFORCE)."""
        return self in (GateMode.HARD, GateMode.SOFT, GateMode.SAMPLE)

    @property
    def computes_gates(self) -> bool:
        """Whether a forward in this mode runs the gates (their cost is spent): all but ``all_on`` and ``random``."""
        return self not in (GateMode.ALL_ON, GateMode.RANDOM)

    @property
    def description(self) -> str:
        """A few words naming how the mode decides, for reports."""
        return _DESCRIPTIONS.get(self, self.value)


_DESCRIPTIONS = {
    GateMode.ALL_ON: "all_on: every block runs, no gate computed",
    GateMode.RANDOM: "random: blocks kept at random (stochastic depth)",
    GateMode.GREEDY: "greedy: the learned gates decide",
    GateMode.SOFT: "soft: every block runs, its output scaled by its gate's probability (saves nothing)",
}


class GatePolicy:
    """One forward's decisions. The base runs the gates (or the compiled gate step) and builds the trace;
    subclasses say how a gate's probability becomes a decision (:meth:`decide`) and the (B, N) decisions taken
    (:meth:`decisions`)."""

    def __init__(self, model: Any, mode: GateMode, threshold: float, explore: float, routed: bool) -> None:
        self.mode, self.threshold, self.explore, self.routed = mode, threshold, explore, routed
        self.gates, self.n = model.gates, model.num_gates
        self.gate_step: Callable[..., tuple[Tensor, Any]] = model.gate_step
        self.computes = self.gates is not None and mode.computes_gates

    paths: capture.Paths  # the forward's fast paths (set by :func:`choose`)

    def start(self, x: Tensor) -> None:
        """Begin on the input ``x`` of the first gated block (a tensor the forward made)."""
        self.batch, self.dtype = x.shape[0], x.dtype
        self.state = self.gates.init_state(x, self.paths) if self.computes else None
        # CPU float32 inference with the recurrent gate: each gate step is one compiled call that also takes the
        # decision and lists the executed samples (skipnet.fastgate); ``kern.z`` / ``kern.p`` hold the trace.
        run = self.computes and self.n
        self.kern = self.gates.kernel_run(x, self.state, self.threshold, self.paths) if run else None
        self.z_l: list[Tensor] = []
        self.p_l: list[Tensor] = []
        self.dec_l: list[Any] = []

    def step(self, i: int, x: Tensor) -> int | None:
        """Run gate ``i`` (if any): the compiled step's count of executing samples, else ``None``."""
        if self.kern is not None:
            return self.kern.step(i, x)
        if self.computes:
            z, self.state = self.gate_step(i, x, self.state)
            self.z_l.append(z)
        return None

    def probs(self, i: int, x: Tensor) -> Tensor:
        """Run gate ``i``; ``p_i`` (B,). A plain ResNet has no gate: ``p = 1``, so greedy executes every block."""
        self.step(i, x)
        if self.kern is not None:
            return self.kern.p[:, i]
        p = torch.sigmoid(self.z_l[-1]) if self.computes else x.new_ones(self.batch)
        self.p_l.append(p)
        return p

    def decide(self, i: int, x: Tensor) -> Tensor | bool:
        raise NotImplementedError

    def decisions(self, x: Tensor, probs: Tensor) -> Tensor:
        """The (B, N) 0/1 decisions taken, in the block input's dtype."""
        raise NotImplementedError

    def trace(self, x: Tensor) -> GateTrace:
        """The forward's :class:`GateTrace` (``x``: the last block's output)."""
        batch, n = self.batch, self.n
        if self.kern is not None:
            z_all, probs = self.kern.z, self.kern.p
        elif self.computes and n:
            z_all = torch.stack(self.z_l, 1)
            probs = torch.stack(self.p_l, 1) if self.p_l else torch.sigmoid(z_all)
        else:
            z_all, probs = x.new_zeros(batch, n), x.new_ones(batch, n)
        dec = self.decisions(x, probs)
        if not (self.computes and n):
            log_probs = x.new_zeros(batch, n)
        elif self.explore and self.mode == GateMode.SAMPLE:  # the floored policy pi = eps + (1 - 2 eps) p
            eps = self.explore
            on = torch.log(eps + (1.0 - 2.0 * eps) * torch.sigmoid(z_all))
            off = torch.log(eps + (1.0 - 2.0 * eps) * torch.sigmoid(-z_all))
            log_probs = dec * on + (1.0 - dec) * off
        else:  # log pi(g_i | x) for the Bernoulli policy of Eq. 3, stable in the logit; one pass for all gates
            log_probs = dec * F.logsigmoid(z_all) + (1.0 - dec) * F.logsigmoid(-z_all)
        return GateTrace(probs=probs, decisions=dec.detach(), log_probs=log_probs, logits=z_all)


class AllOn(GatePolicy):
    """``all_on``: every block runs, no gate is computed."""

    def decide(self, i: int, x: Tensor) -> bool:
        return True

    def decisions(self, x: Tensor, probs: Tensor) -> Tensor:
        return x.new_ones(self.batch, self.n)


class Forced(GatePolicy):
    """Given 0/1 decisions (B, N), or for ``random`` (SDV) Bernoulli(``keep``) draws independent of the input.
    Gates are still computed (their cost is real) unless the mode computes none."""

    def __init__(self, model: Any, mode: GateMode, threshold: float, explore: float, routed: bool, **kw: Any) -> None:
        super().__init__(model, mode, threshold, explore, routed)
        self.given: Tensor | None = kw["decisions"]
        self.keep: float = kw["keep"]

    def start(self, x: Tensor) -> None:
        super().start(x)
        given = self.given
        if given is None:  # random mode
            given = torch.bernoulli(x.new_full((self.batch, self.n), float(self.keep)))
        self.forced = given.detach().to(device=x.device, dtype=self.dtype)
        # Routing reads each decision on the host: once, up front, as Python flags for a batch of one, as
        # per-block index tensors otherwise (one nonzero for the whole (B, N) matrix).
        self.rows: list[Any] = []
        if self.routed and self.n:
            executed = self.forced > 0.5
            if self.batch == 1:
                self.rows = executed[0].tolist()
            else:
                pairs = torch.nonzero(executed.t())  # (block, sample) pairs, sorted by block then sample
                self.rows = list(pairs[:, 1].contiguous().split(executed.sum(0).tolist()))

    def decide(self, i: int, x: Tensor) -> Tensor | bool:
        self.step(i, x)
        return self.rows[i] if self.routed else self.forced[:, i]

    def decisions(self, x: Tensor, probs: Tensor) -> Tensor:
        return self.forced


class Greedy(GatePolicy):
    """Routed ``greedy``: only the decision ``1[p >= t]`` is needed, in as few operations as can be."""

    def start(self, x: Tensor) -> None:
        super().start(x)
        self.host_threshold: float | None = None

    def decide(self, i: int, x: Tensor) -> Tensor | bool:
        if self.kern is not None:  # the kernel decided: n samples, listed in kern.idx
            n = self.kern.step(i, x)
            return n == self.batch if n in (0, self.batch) else self.kern.idx[:n]
        p = self.probs(i, x)
        if self.batch == 1:  # one host read, a plain Python branch
            if self.host_threshold is None:  # ``p >= t`` compares in p's dtype: so does this
                self.host_threshold = torch.tensor(self.threshold, dtype=p.dtype).item()
            take = p.item() >= self.host_threshold
            self.dec_l.append(take)
            return take
        mask = p.detach() >= self.threshold
        self.dec_l.append(mask)
        return torch.nonzero(mask).flatten()

    def decisions(self, x: Tensor, probs: Tensor) -> Tensor:
        if self.kern is not None:  # the kernel's own comparison, p >= t in p's dtype
            return (probs >= self.threshold).to(self.dtype)
        if not self.dec_l:  # no gated block: nothing was decided
            return x.new_ones(self.batch, self.n)
        if not isinstance(self.dec_l[0], Tensor):  # batch of one: Python flags
            return torch.tensor(self.dec_l, dtype=self.dtype, device=x.device).view(1, -1)
        return torch.stack(self.dec_l, 1).to(self.dtype)


class Drawn(GatePolicy):
    """``hard``, ``soft``, ``sample`` and masked ``greedy``: a tensor decision per block from ``p``."""

    def decide(self, i: int, x: Tensor) -> Tensor | bool:
        p = self.probs(i, x)
        eps = self.explore
        if self.mode == GateMode.SAMPLE:
            hard = torch.bernoulli(p.detach() if not eps else eps + (1.0 - 2.0 * eps) * p.detach())
        else:  # hard, soft, greedy
            hard = (p.detach() >= self.threshold).to(self.dtype)
        self.dec_l.append(hard)
        if self.routed:  # sample: a Bernoulli draw is exactly 0 or 1
            return hard.item() > 0.5 if self.batch == 1 else torch.nonzero(hard).flatten()
        if self.mode == GateMode.HARD:
            # Eq. 7: forward 1[p >= t], backward dp. ``p - p.detach()`` is exactly 0, so g is exactly 0 or 1
            # (``hard - p.detach() + p`` rounds to 1 +- 1 ulp, or +-3e-8 for a skip).
            return hard + (p - p.detach())
        return p if self.mode == GateMode.SOFT else hard

    def decisions(self, x: Tensor, probs: Tensor) -> Tensor:
        return torch.stack(self.dec_l, 1) if self.dec_l else x.new_ones(self.batch, self.n)


def check_threshold(threshold: Any) -> float:
    """``threshold`` as a float when it is a number in [0, 1] or :data:`ALL_SKIP_THRESHOLD` (the rule checkpoints
    follow); anything else (NaN, -0.5, 1.5, a string) is refused: ``p >= t`` would silently skip every block."""
    t = _real(threshold)
    if t > 1.0 and math.isclose(t, ALL_SKIP_THRESHOLD, rel_tol=1e-6):  # the all-skip value read back as float32
        t = ALL_SKIP_THRESHOLD
    if not (0.0 <= t <= 1.0 or t == ALL_SKIP_THRESHOLD):  # NaN fails both
        raise SkipnetError(
            f"threshold must be a number in [0, 1] (or calibrate's all-skip {ALL_SKIP_THRESHOLD}), got {threshold!r}; "
            "pass threshold= or set model.threshold"
        )
    return t


def check_keep(keep: Any) -> float:
    """``keep`` (the keep ratio of ``random`` mode) as a float when it is a number in [0, 1]; else refused."""
    k = _real(keep)
    if not 0.0 <= k <= 1.0:  # NaN fails
        raise SkipnetError(f"keep must be a number in [0, 1], got {keep!r}; pass keep= or set model.keep_ratio")
    return k


def check_decisions(decisions: Tensor) -> None:
    """Refuse forced decisions other than 0 and 1 (0.7, 2, -1, NaN): routed execution would read them as ``> 0.5``
    and masked execution mix with them, two different networks. One reduction on the tensor."""
    d = decisions.detach()
    if bool(((d != 0) & (d != 1)).any()):
        bad = d[(d != 0) & (d != 1)].flatten()[0].item()
        raise SkipnetError(f"decisions must hold only 0 and 1 (1: the block runs), got {bad!r}")


def _real(value: Any) -> float:
    """``value`` as a Python float when it is a real number (a Python or NumPy number, a one-element tensor); NaN
    for anything else, so that every range check refuses it."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return float("nan")


def choose(
    model: Any,
    mode: GateMode,
    routed: bool,
    batch: int,
    decisions: Tensor | None,
    threshold: float,
    keep: float,
    explore: float,
    paths: capture.Paths,
) -> GatePolicy:
    """The policy of one forward of ``model`` with fast ``paths`` (checks the arguments)."""
    if mode in (GateMode.HARD, GateMode.SOFT, GateMode.SAMPLE) and model.gates is None:
        raise SkipnetError(f"mode {mode.value!r} needs a gated architecture; this one has no gates")
    if not 0.0 <= explore < 0.5:
        raise SkipnetError(f"explore must be in [0, 0.5), got {explore}")
    if decisions is not None and not isinstance(decisions, torch.Tensor):
        raise SkipnetError(f"decisions must be a torch.Tensor (B, N) of 0 and 1, got {type(decisions).__name__}")
    if decisions is not None and tuple(decisions.shape) != (batch, model.num_gates):
        raise SkipnetError(f"decisions must have shape (B, N) = ({batch}, {model.num_gates})")
    threshold = check_threshold(threshold)
    if decisions is not None and not paths.masked_only:  # a tracer cannot read them (a graph input takes new ones)
        check_decisions(decisions)
    elif mode == GateMode.RANDOM:
        keep = check_keep(keep)
    policy: GatePolicy
    if decisions is not None or mode == GateMode.RANDOM:
        policy = Forced(model, mode, threshold, explore, routed, decisions=decisions, keep=keep)
    elif mode == GateMode.ALL_ON:
        policy = AllOn(model, mode, threshold, explore, routed)
    elif routed and mode == GateMode.GREEDY:
        policy = Greedy(model, mode, threshold, explore, routed)
    else:
        policy = Drawn(model, mode, threshold, explore, routed)
    policy.paths = paths
    return policy


__all__ = [
    "ALL_SKIP_THRESHOLD",
    "AllOn",
    "Drawn",
    "Forced",
    "GateMode",
    "GatePolicy",
    "Greedy",
    "check_decisions",
    "check_keep",
    "check_threshold",
    "choose",
]
