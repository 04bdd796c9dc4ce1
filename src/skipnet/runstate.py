"""What a training run keeps while it trains, and what it writes to its directory (issue 34).

:class:`RunState` holds the step, the running sums of the training statistics, the evaluation history and which
evaluation is the best (under ``--select``, :func:`selection_score`), and writes and restores the resumable
checkpoints (``last.pt``, ``best.pt``) and the ``metrics.jsonl`` rows. Setting a run up is :mod:`skipnet.runsetup`;
the loop is :mod:`skipnet.train`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from skipnet.checkpoint import load_checkpoint, make_checkpoint, rng_state, set_rng_state
from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_write, checkpoint_bytes
from skipnet.losses import Baseline, SkipBudget, mean_first_return
from skipnet.routes import skip_ratio
from skipnet.rundir import BEST, LAST, METRICS, append_row, read_rows, write_rows
from skipnet.runsetup import RunSetup, first_line
from skipnet.trainconfig import TrainConfig

log = logging.getLogger(__name__)

BUDGET_TOLERANCE = 0.02  # --skip-budget: an evaluation skipping this little below the budget still meets it
# A run whose training cross-entropy stays above EXPLODED_CE_FACTOR x ln(classes) (a uniform guess's) for
# EXPLODED_STEPS steps in a row has diverged although every number is finite (a loss of 6e8 was seen): stopped.
EXPLODED_CE_FACTOR = 100.0
EXPLODED_STEPS = 10


def selection_score(
    rule: str,
    val: dict[str, Any],
    alpha: float,
    beta: float,
    num_gates: int,
    skip_target: float | None = None,
    skip_budget: float | None = None,
    skip_reward: str = "all",
    reward: str = "hybrid",
    penalty: float = 1.0,
) -> float:
    """How good a checkpoint is on the validation split under ``rule`` (higher is better): its accuracy, the
    mean return HRL maximises (Eq. 6, :func:`skipnet.losses.mean_first_return`), or (``last``) its recency.

    Under ``--skip-budget`` alpha moves during the run, so returns at different alphas do not compare; the budget
    is a constraint, and ``reward`` ranks the evaluations that meet it by accuracy (in [0, 100]) above those that
    do not, which rank by how much they skip (in [-100, 0)).

    Under ``--skip-reward correct`` only right predictions earn the skip reward; the evaluation does not keep
    per-image skips, so the skipped fraction is weighted by the accuracy (exact when skipping and correctness are
    independent; an estimate otherwise). Under ``--reward blockdrop`` the score is ``acc (1 - u^2) - (1 - acc)
    gamma`` at the mean executed share ``u`` of the gated blocks (an estimate of the mean reward: exact when
    every image executes as many blocks)."""
    if rule == "accuracy":
        return float(val["accuracy"])
    if rule == "reward":
        skipped = skip_ratio(val["executed_blocks_mean"], num_gates)
        if reward == "blockdrop":
            acc = float(val["accuracy"]) / 100.0
            return acc * (1.0 - (1.0 - skipped) ** 2) - (1.0 - acc) * penalty
        if skip_budget is not None:
            return float(val["accuracy"]) if skipped >= skip_budget - BUDGET_TOLERANCE else 100.0 * skipped - 100.0
        if skip_reward == "correct":
            skipped *= float(val["accuracy"]) / 100.0
        return mean_first_return(val["loss"], skipped, alpha, beta, skip_target)
    return math.inf


def run_score(cfg: TrainConfig, val: dict[str, Any], num_gates: int) -> float:
    """:func:`selection_score` under the run's own options."""
    return selection_score(
        cfg.select,
        val,
        cfg.alpha,
        cfg.beta,
        num_gates,
        cfg.skip_target,
        skip_budget=cfg.skip_budget,
        skip_reward=cfg.skip_reward,
        reward=cfg.reward,
        penalty=cfg.wrong_penalty,
    )


def validation_row(val: dict[str, Any], num_gates: int) -> dict[str, Any]:
    """The ``metrics.jsonl`` fields of one evaluation on the validation split."""
    return {
        "val_accuracy": val["accuracy"],
        "val_macs": val["macs_mean"],
        "val_macs_reduction": val["macs_reduction"],
        "val_cp": val["computation_percentage"],
        "val_skip_ratio": skip_ratio(val["executed_blocks_mean"], num_gates),
        "val_skip_ratio_per_block": [float(r) for r in val.get("skip_ratio_per_block", [])],  # as summarize rounds
        "val_loss": val["loss"],
    }


class RunState:
    """The resumable state of one run beside its model and optimizer, and the files that record it."""

    def __init__(
        self, setup: RunSetup, baseline: Baseline, budget: SkipBudget | None, teacher_sha256: str | None = None
    ) -> None:
        self.setup, self.baseline, self.budget = setup, baseline, budget
        self.teacher_sha256 = teacher_sha256  # --distill: the teacher file's contents, checked on resume
        self.out = Path(setup.cfg.out)
        self.main = setup.dist.rank == 0
        self.step = 0
        self.best_val = -1.0  # validation accuracy of best.pt
        self.best_score = -math.inf  # its score under --select
        self.history: list[dict[str, Any]] = []
        self.running: dict[str, float] = {}  # sums of the training statistics since the last evaluation
        self.n_running = 0
        self.last_saved = time.monotonic()  # for the wall-clock checkpoints (--checkpoint-minutes)
        self.exploded_steps = 0  # consecutive steps with the cross-entropy over the exploded level
        self.last_round: int | None = None  # the step of the last evaluation (checkpoint round)

    # -- the statistics between evaluations
    def accumulate(self, stats: dict[str, float]) -> dict[str, float]:
        """Count one step's statistics; returns the running means of loss, accuracy and executed share."""
        self.step += 1
        self.n_running += 1
        for k, v in stats.items():
            self.running[k] = self.running.get(k, 0.0) + v
        return {k: self.running[k] / self.n_running for k in ("loss", "acc", "exec") if k in self.running}

    def check_exploded(self, ce: float | None) -> None:
        """Stop a run whose training cross-entropy ``ce`` (this step's batch mean, the same on every rank) has
        stayed far above a uniform guess's for :data:`EXPLODED_STEPS` steps: it diverged while staying finite."""
        limit = EXPLODED_CE_FACTOR * math.log(max(2, self.setup.data.num_classes))
        self.exploded_steps = self.exploded_steps + 1 if ce is not None and ce > limit else 0
        if self.exploded_steps >= EXPLODED_STEPS:
            raise SkipnetError(
                f"the training cross-entropy stayed above {limit:.3g} ({EXPLODED_CE_FACTOR:g}x a uniform guess's) "
                f"for {EXPLODED_STEPS} steps, to step {self.step} (stage {self.setup.cfg.stage}): the run diverged; "
                f"{self.kept()}. Lower --lr (or --alpha / --rl-weight) and start again"
            )

    def take_means(self) -> dict[str, float]:
        """The means since the last evaluation, and a fresh start for the next."""
        means = {k: v / self.n_running for k, v in self.running.items()} if self.n_running else {}
        self.running, self.n_running = {}, 0
        return means

    def choose(self, row: dict[str, Any], score: float | None) -> tuple[dict[str, Any], bool]:
        """Record an evaluation ``row`` scoring ``score`` under ``--select`` (``None``: no validation split, so
        the last checkpoint is the chosen one); returns the checkpoint's metrics and whether it is the new best."""
        if score is None:
            score, improved = math.inf, True
        else:
            improved = score > self.best_score or self.setup.cfg.select == "last"
        if improved:
            self.best_val = row.get("val_accuracy", self.best_val)
            self.best_score = score
        self.history.append(row)
        self.last_round = int(row["step"])
        if self.main:
            append_row(self.out / METRICS, row)
        return row | {"best_val_accuracy": self.best_val, "best_score": self.best_score}, improved

    def latest_metrics(self) -> dict[str, Any]:
        """The metrics of a checkpoint written between evaluations (a signal, the wall-clock interval)."""
        last = self.history[-1] if self.history else {}
        return last | {"best_val_accuracy": self.best_val, "best_score": self.best_score}

    def elapsed_before(self) -> float:
        """Training time spent before this process (the last metrics row's, on resume)."""
        if not self.history:
            rows, _ = read_rows(self.out / METRICS)
            if rows:
                return float(rows[-1].get("time_s", 0.0))
        return 0.0

    # -- checkpoints
    def checkpoint_bytes(self, metrics: dict[str, Any], rng_ranks: list[Any] | None = None) -> bytes:
        """The resumable state of the run, serialised (weights, optimizer, schedule, RNG, running statistics);
        ``rng_ranks``: every rank's RNG state, in rank order (several processes: each samples its own stream)."""
        s = self.setup
        ckpt = make_checkpoint(
            s.model,
            optimizer=s.optimizer,
            scheduler=s.scheduler,
            step=self.step,
            epoch=self.step // max(1, s.steps_per_epoch),
            metrics=metrics,
            train_config=s.cfg.to_dict(),
            data=s.data.meta() | {"spec": s.cfg.data, "val_split": s.cfg.val_split},
            extra={
                "data_fingerprint": s.data_fingerprint,
                "baseline": self.baseline.state_dict(),
                "skip_budget": self.budget.state_dict() if self.budget is not None else None,
                "stage": s.cfg.stage,
                "running": {"sums": dict(self.running), "n": self.n_running},
                "last_round": self.last_round,
                "world_size": s.dist.world,
                "rng_ranks": rng_ranks if s.dist.world > 1 else None,
                "teacher_sha256": self.teacher_sha256,
            },
        )
        return checkpoint_bytes(ckpt)

    def save(self, metrics: dict[str, Any], best: bool = False) -> None:
        """Write ``last.pt`` (and first, when this round chose it, ``best.pt``: a run killed in between redoes
        the round on resume, so ``best.pt`` is never older than the ``last.pt`` that names it best).

        The state is checked first: a diverged update (e.g. BatchNorm statistics gone infinite) stops the run
        with the previous checkpoints kept."""
        if not self.finite():
            raise self.diverged()
        rng_ranks = self.setup.dist.gather_object(rng_state())  # every rank's stream; None off rank 0
        if self.main:
            payload = self.checkpoint_bytes(metrics, rng_ranks)
            if best:
                atomic_write(self.out / BEST, lambda f: f.write(payload))
            atomic_write(self.out / LAST, lambda f: f.write(payload))
        self.last_saved = time.monotonic()  # on every rank: the ranks decide on the next wall-clock save together

    def restore(self, ckpt: dict[str, Any], path: Path) -> None:
        """Continue from the checkpoint ``ckpt`` read from ``path``: weights, optimizer, schedule, step, best
        scores, baselines, running statistics and RNG streams; metric rows written after it are dropped."""
        s = self.setup
        self._check_resumable(ckpt, path)
        try:
            s.model.load_state_dict(ckpt["state_dict"])
            s.model.to(s.dist.device)
            s.optimizer.load_state_dict(ckpt["optimizer"])
            s.scheduler.load_state_dict(ckpt["scheduler"])
            self.step = int(ckpt["step"])
            self.best_val = float(ckpt.get("metrics", {}).get("best_val_accuracy", -1.0))
            self.best_score = float(ckpt.get("metrics", {}).get("best_score", self.best_val))
            if ckpt.get("baseline") is not None:
                self.baseline.load_state_dict(ckpt["baseline"])
            if self.budget is not None:
                self.budget.load_state_dict(ckpt["skip_budget"])
            running = ckpt.get("running") or {}
            self.running = {k: float(v) for k, v in running.get("sums", {}).items()}
            self.n_running = int(running.get("n", 0))
            last_round = ckpt.get("last_round", ckpt.get("metrics", {}).get("step"))  # older files: their row's
            self.last_round = int(last_round) if last_round is not None else None
            set_rng_state(ckpt.get("rng", {}))
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise SkipnetError(f"{path} cannot be resumed by this run ({first_line(exc)})") from None
        if not self.finite():
            raise SkipnetError(
                f"{path} holds non-finite weights or statistics, so training cannot continue from it; "
                "start a new run (another --out) with a lower --lr"
            )
        self._check_best(path)
        self._drop_metrics_after(self.step)
        log.info("resumed %s at step %d/%d", self.out, self.step, s.total)

    def _check_resumable(self, ckpt: dict[str, Any], path: Path) -> None:
        """Refuse a resume that could not continue the run exactly: under another number of processes (each
        rank's data shard, augmentation and sampling streams, and where an epoch ends, depend on it), or with a
        ``--distill`` teacher file whose contents changed since the run started."""
        world, saved = self.setup.dist.world, ckpt.get("world_size")
        if isinstance(saved, int) and saved != world:
            how = f"torchrun --nproc_per_node {saved}" if saved > 1 else "one process (without torchrun)"
            raise SkipnetError(
                f"--resume: {path} was written by a run of {saved} process(es) and this run has {world}; the data "
                f"shards, random streams and epoch ends depend on the number, so it would not continue exactly (not "
                f"even at an epoch boundary); resume it with {how}, or start a new run (another --out)"
            )
        teacher, distill = ckpt.get("teacher_sha256"), self.setup.cfg.distill
        before = (ckpt.get("train_config") or {}).get("distill")
        if teacher is None and distill is not None and before is not None and distill != before:
            raise SkipnetError(
                f"--resume: {path} records no digest of its --distill teacher (written before teachers were "
                f"checked), so a teacher at another path cannot be told to be the same; give --distill {before}"
            )
        if teacher is not None and self.teacher_sha256 is not None and teacher != self.teacher_sha256:
            raise SkipnetError(
                f"--resume: the --distill teacher {self.setup.cfg.distill} has other contents (SHA-256 "
                f"{self.teacher_sha256[:12]}...) than when the run in {path.parent} started ({str(teacher)[:12]}...); "
                "put the original teacher back, or start a new run (another --out)"
            )

    def restore_rank_rng(self, ckpt: dict[str, Any]) -> None:
        """Several processes: this rank's own RNG streams from ``ckpt`` (after :meth:`DistContext.wrap`, which seeds
        a new run's per-rank streams), so that a resumed run samples as the uninterrupted one. A checkpoint from
        before they were saved keeps the streams ``wrap`` drew (not exact)."""
        states, dist = ckpt.get("rng_ranks"), self.setup.dist
        if dist.world > 1 and isinstance(states, list) and len(states) == dist.world:
            set_rng_state(states[dist.rank])
        elif dist.world > 1 and dist.rank == 0:  # said once, not silent: the numbers will differ from a straight run
            log.warning(
                "resuming a checkpoint written before each process's random streams were saved: the run continues "
                "under %d processes, but not bit-identical to one that never stopped (nor checked for its number of "
                "processes)",
                dist.world,
            )

    def _check_best(self, path: Path) -> None:
        """A run resumed after it chose a ``best.pt`` ends by testing it: refuse now, not after the whole schedule,
        when that file is gone or damaged."""
        if self.best_score == -math.inf or path.name == "best.pt":
            return
        try:
            load_checkpoint(path.parent / BEST)
        except SkipnetError as exc:
            raise SkipnetError(
                f"--resume: {path.parent}/best.pt, the checkpoint this run chose so far, cannot be read "
                f"({first_line(exc)}); put it back, or start a new run (another --out)"
            ) from None

    def finite(self) -> bool:
        """Whether every floating-point parameter and buffer is finite (NaN * 0 and inf * 0 are NaN)."""
        model = self.setup.model
        tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        return not tensors or float(sum(t.mul(0).sum(dtype=torch.float32) for t in tensors)) == 0.0

    def kept(self) -> str:
        """Which checkpoint a stopped run leaves to resume from, in words."""
        last = self.out / LAST
        return f"{last} (step {load_checkpoint(last)['step']}) is kept" if last.exists() else "no checkpoint was kept"

    def loss_error(self, value: float | str, quantity: str = "training loss") -> SkipnetError:
        """A non-finite training loss (or gradient), caught before the update that would have spread it to the
        weights."""
        last = self.out / LAST
        kept = (
            f"the last good checkpoint is {last} (step {load_checkpoint(last)['step']})"
            if last.exists()
            else "no checkpoint was written yet"
        )
        return SkipnetError(
            f"the {quantity} became {value} at step {self.step + 1} (stage {self.setup.cfg.stage}); stopped before "
            f"updating the weights; {kept}. Lower --lr (or --alpha / --rl-weight), or resume from it with --resume"
        )

    def diverged(self) -> SkipnetError:
        return SkipnetError(
            f"the weights or BatchNorm statistics became non-finite by step {self.step} (stage "
            f"{self.setup.cfg.stage}); {self.kept()}. Lower --lr (or --alpha / --rl-weight) and start again"
        )

    def _drop_metrics_after(self, step: int) -> None:
        """On resume: forget metric rows written after the checkpoint (a run killed between the two writes) and a
        torn row (a run killed, or a disk filled, in the middle of one)."""
        path = self.out / METRICS
        if not self.main or not path.exists():
            return
        rows, torn = read_rows(path)
        keep = [r for r in rows if r.get("step", 0) <= step]
        if len(keep) != len(rows) or torn:
            dropped = len(rows) - len(keep)
            log.info("resume: dropping %d metric rows written after step %d and %d torn rows", dropped, step, torn)
            write_rows(path, keep)
