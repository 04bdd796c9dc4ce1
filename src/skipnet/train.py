"""The training loop shared by every stage (base, sp, hrl, soft, rl, sdv).

A run directory holds ``config.json`` (the resolved run config), ``metrics.jsonl`` (one JSON line per
evaluation), ``last.pt`` (for ``--resume``), ``best.pt`` (best validation accuracy) and, when the run has
finished, ``summary.json`` with the test metrics of ``best.pt`` (chosen on validation only).

A run is assembled in one downward pass by :func:`skipnet.runsetup.assemble` (config -> data -> model ->
optimizer); :class:`skipnet.runstate.RunState` keeps its step, best checkpoint and files; :class:`Trainer` is the
loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from skipnet.checkpoint import load_checkpoint, model_from_checkpoint
from skipnet.cost import fewer_macs
from skipnet.errors import Interrupted, SkipnetError
from skipnet.evaluate import evaluate
from skipnet.fileio import atomic_write, json_text, remove_stale_temps
from skipnet.gated import GateMode
from skipnet.gates import AIGGate
from skipnet.losses import SkipBudget, distillation_loss, distilled_task_loss
from skipnet.rundir import BEST, CONFIG, SUMMARY, run_lock
from skipnet.runlog import DERIVED, Progress, RunLog, derived_record, environment
from skipnet.runsetup import assemble
from skipnet.runstate import RunState, run_score, validation_row
from skipnet.stages import Reward
from skipnet.trainconfig import TrainConfig, options_set

log = logging.getLogger(__name__)


class Trainer:
    """One training run. ``Trainer(cfg).fit()`` returns the run summary. Progress goes to :mod:`logging`
    (``skipnet.runlog``); ``progress_bar=True`` (the CLI's choice) shows a tqdm bar instead when stderr is a
    terminal."""

    def __init__(self, cfg: TrainConfig, progress_bar: bool = False, given: set[str] | None = None) -> None:
        from skipnet import distributed

        self.progress_bar = progress_bar
        self.dist = distributed.setup(cfg)
        self.rank, self.world, self.device = self.dist.rank, self.dist.world, self.dist.device
        self.main = self.rank == 0
        s = assemble(cfg, self.dist, options_set(cfg) if given is None else given)
        self.requested, self.resumed = cfg.to_dict(), s.resume is not None  # config.json: what the defaults filled
        self.cfg, self.stage, self.data, self.model, self.teacher = s.cfg, s.stage, s.data, s.model, s.teacher
        self.cost, self.optimizer, self.scheduler = s.cost, s.optimizer, s.scheduler
        self.steps_per_epoch, self.total, self.out = s.steps_per_epoch, s.total, Path(s.cfg.out)
        self.block_cost = torch.tensor(self.cost.block_macs, dtype=torch.float32, device=self.device)
        # the layout the batches reach the model in: the loaders yield channels_last; --no-channels-last is NCHW
        self.memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        c = self.cfg  # --skip-budget: alpha adapted each step from the global batch's skips (same on every rank)
        budget = SkipBudget(c.skip_budget, c.alpha, c.alpha_lr) if c.skip_budget is not None else None
        self.state = RunState(s, self.dist.baseline(c.baseline), budget, teacher_sha256(c.distill))  # global baseline
        if s.resume is not None:
            self.state.restore(s.resume, s.resume_path)
        self.stop = StopRequest(self.main)  # set by SIGINT / SIGTERM; acted on between steps
        self.train_model: nn.Module = self.dist.wrap(self.model, self.cfg)
        if s.resume is not None:  # each rank's own RNG streams, which wrap re-seeded
            self.state.restore_rank_rng(s.resume)
        self.amp = self.dist.autocast(self.cfg.amp)
        self.scaler = self.dist.grad_scaler(self.cfg.amp)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def baseline(self):
        return self.state.baseline

    @property
    def budget(self) -> SkipBudget | None:
        return self.state.budget

    def _train_mode(self) -> None:
        """Training mode; with ``--bn frozen`` every BatchNorm stays in eval mode (running statistics used and
        kept, as greedy inference uses them; its scale and shift still learn), except a ConvNet-AIG gate's, whose
        batch normalisation is the gate's design; with ``--freeze policy`` the gates stay in eval mode."""
        self.train_model.train()
        if self.cfg.bn == "frozen":
            freeze_batchnorm(self.model)
        if self.cfg.freeze == "policy" and self.model.gates is not None:
            self.model.gates.eval()  # the routes greedy inference takes: a gate's BatchNorm on its running statistics

    # -- evaluation
    def evaluate_split(self, split: str) -> dict[str, Any]:
        # Rank 0 evaluates the bare model on the whole split; the other ranks receive its result.
        loader = self.dist.full_split(self.data.split(split))
        return self.dist.on_main(lambda: self._evaluate(self.model, loader))

    def _evaluate(self, model: torch.nn.Module, loader) -> dict[str, Any]:
        """``model`` on ``loader`` as ``skipnet eval`` runs it (SDV: eval's seed, not ``--seed``): same figures."""
        return evaluate(model, loader, self.cost, mode=model.mode, memory_format=self.memory_format)

    # -- the loop
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        y = y.to(self.device, non_blocking=True)
        with self.amp:
            out = self.train_model(
                x,
                self.stage.train_mode,
                threshold=self._train_threshold(),
                keep=cfg.keep,
                execution=self.dist.train_execution,
                explore=cfg.explore if self.stage.train_mode == GateMode.SAMPLE else 0.0,
            )
            ce = F.cross_entropy(out.logits.float(), y, reduction="none")  # (B,)
            task, extra, order = None, {}, None
            if self.teacher is not None:
                with torch.no_grad():
                    target = self.teacher(x).logits
                kd = distillation_loss(out.logits, target, cfg.distill_temperature)
                task, extra = distilled_task_loss(ce, kd, cfg.distill_weight), {"kd": kd.detach().mean()}
                if cfg.difficulty_spread is not None:  # how hard the teacher finds each image
                    hard = F.cross_entropy(target.float(), y, reduction="none")
                    order = (hard, cfg.difficulty_spread, cfg.batch_shape_weight)
            loss, stats = self.stage.loss(
                ce,
                out.trace,
                alpha=self.alpha,
                beta=cfg.beta,
                rl_weight=cfg.rl_weight,
                baseline=self.baseline,
                task=task,
                correct=out.logits.argmax(1) == y,
                reward=self.reward(),
                greedy=self._greedy_outcome(x, y) if cfg.baseline == "self-critical" else None,
                entropy=cfg.entropy_bonus,
                shape=self._shape(),
                difficulty=order,
            )
            stats |= extra
        if self.dist.any(not bool(torch.isfinite(loss.detach()))):  # before the update: weights stay good
            raise self.state.loss_error(loss.item())
        apply_update(self.optimizer, self.scaler, loss, self.dist, self.state)
        self.scheduler.step()
        with torch.no_grad():
            acc = (out.logits.argmax(1) == y).float().mean()
            executed = out.trace.decisions.float().mean() if out.trace.num_gates else torch.ones(())
        stats = {k: v.float() for k, v in stats.items()} | {"loss": loss.detach().float(), "acc": acc, "exec": executed}
        stats = self.dist.mean_stats(stats)
        if self.budget is not None:  # "alpha": the value this step used
            stats["alpha"] = self.alpha
            self.budget.update(1.0 - stats["exec"])
        return stats

    def _train_threshold(self) -> float:
        """The hard gates' threshold this step: ``--threshold``, moved by ``U(-J, J)`` under ``--threshold-jitter J``
        (drawn from torch's generator, which a checkpoint restores: a resumed run draws the same)."""
        j = self.cfg.threshold_jitter
        return self.cfg.threshold + (j * (2.0 * float(torch.rand(())) - 1.0) if j else 0.0)

    def reward(self) -> Reward:
        """What this step's sampled routes earn (``--reward``, at the current alpha)."""
        c = self.cfg
        return Reward(
            c.reward,
            self.alpha,
            c.beta,
            c.skip_target,
            correct_only=c.skip_reward == "correct",
            penalty=c.wrong_penalty,
            block_cost=self.block_cost,
        )

    def _shape(self) -> tuple[float | None, float, float | None] | None:
        """``--batch-shape`` / ``--batch-shape-floor``: (rate, weight, floor) of the batch-shape term, or None."""
        c = self.cfg
        if c.batch_shape is None and c.batch_shape_floor is None:
            return None
        return c.batch_shape, c.batch_shape_weight, c.batch_shape_floor

    @torch.no_grad()
    def _greedy_outcome(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CE, decisions, correct) of the batch under greedy decisions at the run's threshold, BatchNorm in eval
        mode as at inference: what the self-critical baseline compares each sampled route with."""
        self.model.eval()
        try:
            out = self.model(x, GateMode.GREEDY, threshold=self.cfg.threshold, execution=self.dist.train_execution)
        finally:
            self._train_mode()
        ce = F.cross_entropy(out.logits.float(), y, reduction="none")
        return ce, out.trace.decisions, out.logits.argmax(1) == y

    @property
    def alpha(self) -> float:
        """The skip reward's weight this step: ``--alpha``, or where ``--skip-budget`` has moved it."""
        return self.budget.alpha if self.budget is not None else self.cfg.alpha

    def fit(self) -> dict[str, Any]:
        """Train to the last step (or the next signal), evaluating and checkpointing every ``--eval-every`` steps;
        returns the summary (the test metrics of ``best.pt``)."""
        summary_path = self.out / SUMMARY
        self._write_config()
        if self.step >= self.total and summary_path.exists():
            log.info("%s has already finished (%d steps); nothing to do", self.out, self.total)
            return json.loads(summary_path.read_text())
        self._announce()
        cfg, before = self.cfg, self.state.elapsed_before()
        progress = Progress(self.total, self.main, cfg.log_every, self.step, before, self.progress_bar)
        self.runlog = RunLog(
            self.out, enabled=self.main, every=cfg.log_every, tensorboard=cfg.tensorboard, resume_step=self.step or None
        )
        run_start = time.time() - before
        self._train_mode()
        with self.stop.installed(), progress.logging_above(), self.runlog:  # closed also on a stop or an error
            while self.step < self.total:
                self._epoch(progress, run_start)
            if self.state.last_round != self.step:  # resumed at its last step, stopped before that step's round
                self._checkpoint_round(self.state.take_means(), time.time() - run_start)
        progress.close()
        self.runlog.close()
        return self._finish(time.time() - run_start)

    def _write_config(self) -> None:
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            options = self.cfg.to_dict()
            derived = derived_record(self.out / CONFIG, self.requested, options, self.resumed)
            record = {"arch_config": self.model.config.to_dict(), "environment": environment(self.device, self.world)}
            text = json.dumps(options | record | ({DERIVED: derived} if derived is not None else {}), indent=2)
            atomic_write(self.out / CONFIG, lambda f: f.write(text.encode()))

    def _announce(self) -> None:
        c = self.cfg
        gates = f"{self.model.num_gates} gates" if self.model.gates is not None else "no gates (plain ResNet)"
        log.info(
            "%s: stage %s, %s, %d steps (%d per epoch), batch %d, lr %g (%s), %s",
            *(self.out, c.stage, self.model.config.name, self.total, self.steps_per_epoch, c.batch_size, c.lr),
            *(c.schedule, gates),
        )

    def _epoch(self, progress: Progress, run_start: float) -> None:
        """The rest of the current epoch (from the step reached, when resuming inside it), or up to the last step."""
        state, cfg = self.state, self.cfg
        skip = self.step % self.steps_per_epoch
        self.data.train.set_epoch(self.step // self.steps_per_epoch)
        for i, (x, y) in enumerate(self.data.train):
            if i < skip:  # resuming inside an epoch: the loader's per-epoch streams replay to here
                continue
            if self.dist.any(self.stop.signum is not None):  # every rank stops at the same step
                progress.close()
                self._interrupted(time.time() - run_start)
            if self.dist.any(time.monotonic() - state.last_saved >= 60 * cfg.checkpoint_minutes):
                state.save(state.latest_metrics())
            try:
                stats = self.train_step(x, y)
            except RuntimeError:  # e.g. gate probabilities that are NaN: say why if the state diverged
                if state.finite():
                    raise
                raise state.diverged() from None
            shown = state.accumulate(stats)  # the step counted
            state.check_exploded(stats.get("ce"))
            progress.update(self.step, shown)
            lr, spent = self.optimizer.param_groups[0]["lr"], time.time() - run_start
            self.runlog.step(self.step, stats, lr=lr, epoch=self.step / self.steps_per_epoch, time_s=spent)
            if self.step % cfg.eval_every == 0 or self.step == self.total:
                self._checkpoint_round(state.take_means(), time.time() - run_start)
                self._train_mode()
            if self.step >= self.total:
                return

    def _interrupted(self, elapsed: float) -> None:
        """Write ``last.pt`` at the current step (mid-interval: running statistics included) and stop."""
        signum = self.stop.signum or signal.SIGTERM
        self.state.save(self.state.latest_metrics())
        if self.main:
            log.info("interrupted at step %d/%d after %.0f s", self.step, self.total, elapsed)
        self.dist.barrier()
        name = signal.Signals(signum).name
        stopped = f"{name}: stopped at step {self.step}/{self.total}; checkpoint {self.out / 'last.pt'} written"
        raise Interrupted(f"{stopped}; continue with the same command plus --resume", 128 + int(signum), stopped)

    def _checkpoint_round(self, train_stats: dict[str, float], elapsed: float) -> None:
        """Evaluate on the validation split, record the row, and write ``last.pt`` (and ``best.pt`` when chosen)."""
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 3),
            "lr": self.optimizer.param_groups[0]["lr"],
            "time_s": round(elapsed, 1),
        }
        row |= {f"train_{k}": round(v, 5) for k, v in train_stats.items()}
        val, score = None, None  # no validation split: the last checkpoint is the chosen one
        if self.data.val is not None:
            val = self.evaluate_split("val")
            score = run_score(self.cfg, val, self.model.num_gates)
            row |= validation_row(val, self.model.num_gates)
            row["val_score"] = score if math.isfinite(score) else None
        metrics, improved = self.state.choose(row, score)
        self.runlog.evaluation(self.step, row, val)
        if self.main:
            log.info(
                "step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
            )
        self.state.save(metrics, best=improved)
        self.dist.barrier()

    def _finish(self, elapsed: float) -> dict[str, Any]:
        summary: dict[str, Any] = {"stage": self.cfg.stage, "arch": self.model.config.name, "steps": self.step}
        if self.main:
            best = load_checkpoint(self.out / BEST, self.device)
            model = model_from_checkpoint(best).to(self.device)
            test_loader = self.dist.full_split(self.data.test)
            test = self._evaluate(model, test_loader)
            summary |= {
                "best_step": best["step"],
                "best_val_accuracy": best["metrics"].get("val_accuracy"),
                "test": test,
                "train_time_s": round(elapsed, 1),
                "train_config": self.cfg.to_dict(),
            }
            text = json_text(summary, indent=2)  # a non-finite figure as null
            atomic_write(self.out / SUMMARY, lambda f: f.write(text.encode()))
            log.info(
                "finished: test accuracy %.2f%% at %.4g MACs (%s than the plain ResNet), CP %.1f%%",
                test["accuracy"],
                test["macs_mean"],
                fewer_macs(test["macs_reduction"]),
                test["computation_percentage"],
            )
        return self.dist.broadcast_object(summary)  # rank 0's summary, on every rank


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary with a resumable checkpoint (``signum`` is
    set); a second SIGINT interrupts at once (the previous checkpoint stays intact: writes are atomic)."""

    def __init__(self, announce: bool) -> None:
        self.signum: int | None = None
        self.announce = announce  # rank 0 says so

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            name = signal.Signals(signum).name
            log.warning("%s: stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)", name)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers, for the duration (only the main thread can install them; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def teacher_sha256(spec: str | None) -> str | None:
    """SHA-256 of the file ``--distill`` names (a path, a ``save_pretrained`` directory or ``pretrained:NAME``;
    ``None`` without one): recorded in the run's checkpoints, so that a resume with other teacher contents is
    refused."""
    from skipnet.zoo import resolve_checkpoint

    if not spec:
        return None
    h = hashlib.sha256()
    try:
        with open(resolve_checkpoint(spec), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise SkipnetError(f"--distill {spec} cannot be read ({exc.strerror or exc})") from None
    return h.hexdigest()


def apply_update(optimizer: torch.optim.Optimizer, scaler: Any, loss: torch.Tensor, dist: Any, state: Any) -> None:
    """One optimizer update from ``loss`` (``scaler``: a ``GradScaler``, which itself skips a step whose gradients
    are not finite). A non-finite gradient under a finite loss (0 x inf of a skipped block that overflowed in
    masked training) stops the run before it is applied, as a non-finite loss does (``state.loss_error``)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return
    loss.backward()
    if dist.any(not finite_gradients(optimizer)):
        raise state.loss_error("non-finite", quantity="gradient")
    optimizer.step()


def finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer is about to apply is finite (one sum per parameter, one read)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack([g.detach().sum(dtype=torch.float32) for g in grads])).all())


def freeze_batchnorm(model: nn.Module) -> None:
    """``--bn frozen``: every BatchNorm in eval mode, except a ConvNet-AIG gate's (its batch normalisation is
    what the gate is)."""
    normalising = {id(m) for g in model.modules() if isinstance(g, AIGGate) for m in g.modules()}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in normalising:
            m.eval()


@contextmanager
def hold_run_dir(out: str) -> Iterator[None]:
    """The run directory's lock (rank 0 only: under torchrun the other ranks write nothing), then a sweep of the
    temporary files that writers killed earlier left in it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with run_lock(out):
        remove_stale_temps(out, every_file=True)
        yield


def train(cfg: TrainConfig, progress_bar: bool = False, given: set[str] | None = None) -> dict[str, Any]:
    """Run (or resume) one training run, holding its directory's lock; returns its summary. Nothing is printed:
    progress and notices go to :mod:`logging` (``progress_bar=True``: a tqdm bar on a terminal, for the CLI).
    ``given``: the options the caller set (``--resume`` applies or refuses those; default: the non-default ones)."""
    with hold_run_dir(cfg.out):
        trainer = Trainer(cfg, progress_bar, given)
        try:
            summary = trainer.fit()
            trainer.dist.barrier()  # every rank done before any tears the process group down (gloo aborts a late one)
            return summary
        finally:
            trainer.train_model = trainer.model  # free the DDP wrapper now, not at exit (see DistContext.cleanup)
            trainer.dist.cleanup()
