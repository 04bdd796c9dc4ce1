"""The training loop shared by every stage (base, sp, hrl, soft, rl, sdv).

A run directory holds ``config.json`` (the resolved run config), ``metrics.jsonl`` (one JSON line per
evaluation), ``last.pt`` (for ``--resume``), ``best.pt`` (best validation accuracy) and, when the run has
finished, ``summary.json`` with the test metrics of ``best.pt`` (chosen on validation only).
"""

from __future__ import annotations

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

from skipnet.checkpoint import (
    atomic_write,
    checkpoint_bytes,
    load_checkpoint,
    load_model,
    load_weights_into,
    make_checkpoint,
    model_from_checkpoint,
    remove_stale_temps,
    set_rng_state,
)
from skipnet.cost import cost_model, fewer_macs
from skipnet.data import DataBundle, load_data
from skipnet.errors import Interrupted, SkipnetError
from skipnet.evaluate import evaluate
from skipnet.fileio import json_text
from skipnet.gated import GatedResNet, GateMode
from skipnet.gates import AIGGate
from skipnet.losses import Baseline, SkipBudget, distillation_loss, distilled_task_loss, mean_first_return
from skipnet.registry import get_config
from skipnet.rundir import append_row, check_same_data, data_fingerprint, read_rows, run_lock, write_rows
from skipnet.runlog import Progress, RunLog, environment
from skipnet.stages import STAGES, Reward, Stage
from skipnet.trainconfig import (  # noqa: F401 (SCHEDULES re-exported)
    SCHEDULES,
    TrainConfig,
    check_resumed_length,
    options_set,
    resolve_defaults,
    resumed_config,
)

log = logging.getLogger(__name__)


BUDGET_TOLERANCE = 0.02  # --skip-budget: an evaluation skipping this little below the budget still meets it


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
        skipped = 1.0 - (val["executed_blocks_mean"] - 1.0) / max(1, num_gates)
        if reward == "blockdrop":
            acc = float(val["accuracy"]) / 100.0
            return acc * (1.0 - (1.0 - skipped) ** 2) - (1.0 - acc) * penalty
        if skip_budget is not None:
            return float(val["accuracy"]) if skipped >= skip_budget - BUDGET_TOLERANCE else 100.0 * skipped - 100.0
        if skip_reward == "correct":
            skipped *= float(val["accuracy"]) / 100.0
        return mean_first_return(val["loss"], skipped, alpha, beta, skip_target)
    return math.inf


def _same_stats(saved: dict[str, Any], data: DataBundle) -> bool:
    pairs = list(zip(saved["mean"], data.mean)) + list(zip(saved["std"], data.std))
    return len(saved["mean"]) == len(data.mean) and all(abs(a - b) <= 1e-4 for a, b in pairs)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if cfg.iters is not None:
        return int(cfg.iters)
    return max(1, int(round(cfg.epochs * steps_per_epoch)))


def lr_factor(schedule: str, step: int, total: int, warmup: int, imagenet: bool, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if warmup and step < warmup:
        return 0.1  # the authors' warm-up: lr 0.01 for the first iterations of deep CIFAR nets
    t = step / max(1, total)
    if schedule == "constant":
        return 1.0
    if schedule in ("paper", "step"):
        if imagenet and schedule == "paper":
            return 0.1 ** (step // (30 * steps_per_epoch))
        return 1.0 if t < 0.5 else (0.1 if t < 0.75 else 0.01)  # 32k / 48k of 64k
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    # one-cycle: linear warm-up over the first 25% to the peak, then linear decay to zero
    return t / 0.25 if t < 0.25 else max(0.0, (1.0 - t) / 0.75)


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """One training run. ``Trainer(cfg).fit()`` returns the run summary. Progress goes to :mod:`logging`
    (``skipnet.runlog``); ``progress_bar=True`` (the CLI's choice) shows a tqdm bar instead when stderr is a
    terminal."""

    def __init__(self, cfg: TrainConfig, progress_bar: bool = False, given: set[str] | None = None) -> None:
        self.progress_bar = progress_bar
        if cfg.stage not in STAGES:
            raise SkipnetError(f"unknown stage {cfg.stage!r}; expected one of {', '.join(STAGES)}")
        self.stage: Stage = STAGES[cfg.stage]
        self.out = Path(cfg.out)
        from skipnet import distributed as dist

        self.dist = dist.setup(cfg)
        self.rank, self.world, self.device = self.dist.rank, self.dist.world, self.dist.device
        self.main = self.rank == 0
        cfg, resume_ckpt = self._resumed_config(cfg, options_set(cfg) if given is None else given)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        init_ckpt = load_checkpoint(cfg.init) if cfg.init and resume_ckpt is None else None
        arch = get_config(cfg.arch)
        if cfg.gate_bias is not None and not arch.gated:
            raise SkipnetError(f"--gate-bias needs a gated architecture; {arch.name} has no gates")
        global_batch = cfg.batch_size or (256 if arch.family == "imagenet" else 128)
        if global_batch % self.world:
            raise SkipnetError(f"--batch-size {global_batch} is not divisible by the {self.world} processes")
        saved = resume_ckpt if resume_ckpt is not None else init_ckpt  # the input normalisation to keep
        self.data: DataBundle = self._load_data(cfg, arch, global_batch, saved)
        self.data_fingerprint = data_fingerprint(self.data)
        if resume_ckpt is not None:  # another --data path must hold the same data set
            check_same_data(resume_ckpt, self.data.meta(), self.data_fingerprint, cfg.data, cfg.out)
        arch = arch.replace(
            num_classes=self.data.num_classes, in_channels=self.data.in_channels, image_size=self.data.image_size
        )
        if self.stage.needs_gates and not arch.gated:
            raise SkipnetError(f"stage {cfg.stage!r} needs a gated architecture (e.g. an *_rnn_gate_* name)")
        torch.manual_seed(cfg.seed)
        self.model = GatedResNet(arch)
        self.steps_per_epoch = len(self.data.train)
        self.cfg = resolve_defaults(cfg, arch.family, arch.dataset, self.model.num_gates, self.steps_per_epoch)
        self.cfg.batch_size = global_batch
        self.total = total_steps(self.cfg, self.steps_per_epoch)
        if resume_ckpt is not None:
            check_resumed_length(self.cfg, int(resume_ckpt.get("step", 0)), self.total, cfg.out)
        self._prepare_model(init_ckpt, resumed=resume_ckpt is not None)
        self.optimizer, self.scheduler = self._optimizer()
        self.baseline: Baseline = self.dist.baseline(self.cfg.baseline)  # global-batch mean under DDP
        c = self.cfg  # --skip-budget: alpha adapted each step from the global batch's skips (same on every rank)
        self.budget = SkipBudget(c.skip_budget, c.alpha, c.alpha_lr) if c.skip_budget is not None else None
        self.step = 0
        self.best_val = -1.0  # validation accuracy of best.pt
        self.best_score = -math.inf  # its score under --select
        self.history: list[dict[str, Any]] = []
        self.running: dict[str, float] = {}  # sums of the training statistics since the last evaluation
        self.n_running = 0
        self._signal: int | None = None  # set by the SIGINT / SIGTERM handler; acted on between steps
        self.last_saved = time.monotonic()  # for the wall-clock checkpoints (--checkpoint-minutes)
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        self.train_model: nn.Module = self.dist.wrap(self.model, self.cfg)
        self.amp = self.dist.autocast(self.cfg.amp)
        self.scaler = self.dist.grad_scaler(self.cfg.amp)

    # -- setup helpers
    def _resumed_config(self, cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict[str, Any] | None]:
        """``(config, checkpoint)`` of the run to continue (``--resume`` with a checkpoint: the saved config with the
        options ``given`` that may change applied, :func:`~skipnet.trainconfig.resumed_config`), or ``(cfg, None)``
        for a new run."""
        self.resume_path = self._resume_source(cfg)
        if self.resume_path is None:
            return cfg, None
        ckpt = load_checkpoint(self.resume_path)
        try:
            saved = TrainConfig.from_dict(ckpt["train_config"])
        except (KeyError, TypeError, AttributeError):
            raise SkipnetError(f"{self.resume_path} has no usable run configuration to resume from") from None
        return resumed_config(cfg, saved, given, cfg.out), ckpt

    def _resume_source(self, cfg: TrainConfig) -> Path | None:
        """The checkpoint ``--resume`` continues from: ``last.pt``; or ``best.pt`` of a run stopped (killed, disk
        full) during its first checkpoint, after ``best.pt`` was written and before ``last.pt``: the two hold the
        same state. ``None``: a new run (a directory without a checkpoint yet is cleared first)."""
        last, best = self.out / "last.pt", self.out / "best.pt"
        if not cfg.resume:
            if last.exists():
                raise SkipnetError(
                    f"{self.out} already holds a run; pass --resume to continue it or choose another --out"
                )
            return None
        if last.exists():
            return last
        if not best.exists():
            self._start_afresh()
            return None
        try:
            step = load_checkpoint(best)["step"]
        except SkipnetError as exc:
            raise SkipnetError(
                f"--resume: {self.out} holds a best.pt but no last.pt to continue from, and best.pt cannot be "
                f"resumed ({_first_line(exc)}); choose another --out (or remove what is there)"
            ) from None
        log.warning(
            "--resume: %s has no last.pt (stopped during its first checkpoint); continuing from best.pt (step %d), "
            "the same state",
            self.out,
            step,
        )
        return best

    def _load_data(self, cfg: TrainConfig, arch: Any, global_batch: int, saved: dict[str, Any] | None) -> DataBundle:
        """This process's share of the data, normalised as ``saved`` (the resumed or --init checkpoint) was."""
        stats = None
        if saved is not None and saved.get("data", {}).get("mean"):
            stats = (tuple(saved["data"]["mean"]), tuple(saved["data"]["std"]))
        with self.dist.main_first():  # one process per machine extracts and caches the data first
            return load_data(
                cfg.data,
                data_dir=cfg.data_dir,
                download=cfg.download,
                batch_size=global_batch // self.world,
                eval_batch_size=cfg.eval_batch_size,
                val_split=cfg.val_split,
                seed=cfg.seed,
                workers=cfg.workers,
                rank=self.rank,
                world=self.world,
                limit_train=cfg.limit_train,
                limit_test=cfg.limit_test,
                image_size=cfg.image_size or (arch.image_size if arch.family == "imagenet" else None),
                stats=stats,
            )

    def _prepare_model(self, init_ckpt: dict[str, Any] | None, resumed: bool) -> None:
        """Initialise the new model (zero residuals, gate bias, --init weights), set its gate options, the cost
        model and the teacher, and move both to the device."""
        cfg, arch = self.cfg, self.model.config
        if cfg.zero_init_residual:  # before --init, whose tensors replace these
            self.model.zero_init_residual()
            if self.stage.train_mode == GateMode.HARD and not cfg.init and not (cfg.gate_bias or 0) > 0:
                log.warning(
                    "--zero-init-residual with gates that may start closed: in SP a closed gate's zero branch gets "
                    "no gradient and the gate none either; pass --gate-bias 2 so that the gates start open"
                )
        if cfg.gate_bias is not None and arch.gated:
            self.model.set_gate_bias(cfg.gate_bias)
        if init_ckpt is not None:
            left = load_weights_into(self.model, init_ckpt, cfg.init)
            log.info("initialised from %s (%d tensors left at their initial values)", cfg.init, len(left))
        if cfg.init_torchvision and not resumed:
            self._init_torchvision(cfg.init_torchvision)
        self.model.threshold = cfg.threshold
        self.model.keep_ratio = cfg.keep
        self.model.mode = (
            self.stage.eval_mode if arch.gated or self.stage.eval_mode == GateMode.RANDOM else GateMode.ALL_ON
        )
        self.cost = cost_model(self.model)
        self.block_cost = torch.tensor(self.cost.block_macs, dtype=torch.float32, device=self.device)
        self.teacher = self._load_teacher(cfg.distill) if cfg.distill else None
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """SGD over two parameter groups (the gates at ``--gate-lr-mult`` times the lr) and its lr schedule."""
        cfg = self.cfg
        gate_params = list(self.model.gates.parameters()) if self.model.gates is not None else []
        gate_ids = {id(q) for q in gate_params}
        backbone = [q for q in self.model.parameters() if id(q) not in gate_ids]
        frozen = {"backbone": backbone, "gates": gate_params}.get(cfg.freeze, [])
        for q in frozen:  # --freeze: no gradient, no update, no weight decay
            q.requires_grad_(False)
        groups = [] if cfg.freeze == "backbone" else [{"params": backbone}]
        if gate_params and cfg.freeze != "gates":  # the policy may learn faster than the features (--gate-lr-mult)
            groups.append({"params": gate_params, "lr": cfg.lr * cfg.gate_lr_mult})
        nesterov = cfg.nesterov and cfg.momentum > 0
        opt = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, weight_decay=cfg.weight_decay
        )
        imagenet, spe = self.model.config.family == "imagenet", self.steps_per_epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(cfg.schedule, s, self.total, cfg.warmup_iters, imagenet, spe)
        )
        return opt, schedule

    def _start_afresh(self) -> None:
        """``--resume`` on a directory without a checkpoint (a job preempted before its first one, re-queued with
        the same command line): start a new run there, dropping what the first attempt left."""
        leftovers = [n for n in ("metrics.jsonl", "summary.json") if (self.out / n).exists()]  # best.pt: refused
        log.warning("--resume: %s holds no checkpoint yet; starting a new run", self.out)
        if self.main:
            for name in leftovers:
                (self.out / name).unlink()

    def _load_teacher(self, spec: str) -> GatedResNet:
        """The frozen network whose predictions ``--distill`` matches (eval mode, its own gate mode): it must see
        the same classes and the same input normalisation as the student, or the targets would be wrong."""
        teacher, ckpt = load_model(spec)
        if teacher.config.num_classes != self.data.num_classes:
            raise SkipnetError(
                f"--distill {spec} predicts {teacher.config.num_classes} classes; the data has {self.data.num_classes}"
            )
        stats = ckpt.get("data", {})
        if stats.get("mean") is not None and not _same_stats(stats, self.data):
            raise SkipnetError(
                f"--distill {spec} was trained on inputs normalised with mean {stats['mean']} and std {stats['std']}; "
                f"this run normalises with {list(self.data.mean)} and {list(self.data.std)}"
            )
        teacher.requires_grad_(False)
        teacher.to(self.device)
        if self.cfg.channels_last:
            teacher.to(memory_format=torch.channels_last)
        return teacher.eval()

    def _init_torchvision(self, path: str) -> None:
        if self.model.config.family != "imagenet":
            raise SkipnetError("--init-torchvision needs an imagenet_* architecture")
        if not Path(path).is_file():
            raise SkipnetError(f"--init-torchvision: {path!r} does not exist")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise SkipnetError(f"--init-torchvision: cannot read {path} ({type(exc).__name__})") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if sd.get("fc.weight") is not None and sd["fc.weight"].shape[0] != self.model.config.num_classes:
            sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
            log.info("--init-torchvision: classifier has a different number of classes; fc left at random init")
        missing, unexpected = self.model.backbone.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.startswith("fc.")] + list(unexpected)
        if bad:
            raise SkipnetError(f"--init-torchvision: {path} is not a matching torchvision ResNet state dict ({bad[0]})")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(ckpt["state_dict"])
            self.model.to(self.device)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
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
            set_rng_state(ckpt.get("rng", {}))
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise SkipnetError(f"{self.resume_path} cannot be resumed by this run ({_first_line(exc)})") from None
        if not self._state_finite():
            raise SkipnetError(
                f"{self.resume_path} holds non-finite weights or statistics, so training cannot continue from it; "
                "start a new run (another --out) with a lower --lr"
            )
        self._drop_metrics_after(self.step)
        log.info("resumed %s at step %d/%d", self.out, self.step, self.total)

    # -- checkpoints
    def _checkpoint_bytes(self, metrics: dict[str, Any]) -> bytes:
        """The resumable state of the run, serialised (weights, optimizer, schedule, RNG, running statistics)."""
        ckpt = make_checkpoint(
            self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            step=self.step,
            epoch=self.step // max(1, self.steps_per_epoch),
            metrics=metrics,
            train_config=self.cfg.to_dict(),
            data=self.data.meta() | {"spec": self.cfg.data, "val_split": self.cfg.val_split},
            extra={
                "data_fingerprint": self.data_fingerprint,
                "baseline": self.baseline.state_dict(),
                "skip_budget": self.budget.state_dict() if self.budget is not None else None,
                "stage": self.cfg.stage,
                "running": {"sums": dict(self.running), "n": self.n_running},
            },
        )
        return checkpoint_bytes(ckpt)

    def _save_last(self, metrics: dict[str, Any], best: bool = False) -> None:
        """Write ``last.pt`` (and first, when this round chose it, ``best.pt``: a run killed in between redoes
        the round on resume, so ``best.pt`` is never older than the ``last.pt`` that names it best).

        The state is checked first: a diverged update (e.g. BatchNorm statistics gone infinite) stops the run
        with the previous checkpoints kept."""
        if not self._state_finite():
            raise self._diverged()
        if not self.main:
            return
        payload = self._checkpoint_bytes(metrics)
        if best:
            atomic_write(self.out / "best.pt", lambda f: f.write(payload))
        atomic_write(self.out / "last.pt", lambda f: f.write(payload))
        self.last_saved = time.monotonic()

    def _diverged(self) -> SkipnetError:
        last = self.out / "last.pt"
        kept = f"{last} (step {load_checkpoint(last)['step']}) is kept" if last.exists() else "no checkpoint was kept"
        return SkipnetError(
            f"the weights or BatchNorm statistics became non-finite by step {self.step} (stage {self.cfg.stage}); "
            f"{kept}. Lower --lr (or --alpha / --rl-weight) and start again"
        )

    def _latest_metrics(self) -> dict[str, Any]:
        """The metrics of a checkpoint written between evaluations (a signal, the wall-clock interval)."""
        return (self.history[-1] if self.history else {}) | {
            "best_val_accuracy": self.best_val,
            "best_score": self.best_score,
        }

    def _state_finite(self) -> bool:
        """Whether every floating-point parameter and buffer is finite (NaN * 0 and inf * 0 are NaN)."""
        tensors = [t.detach() for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]
        return not tensors or float(sum(t.mul(0).sum(dtype=torch.float32) for t in tensors)) == 0.0

    def _append_metrics(self, row: dict[str, Any]) -> None:
        if self.main:
            append_row(self.out / "metrics.jsonl", row)

    def _drop_metrics_after(self, step: int) -> None:
        """On resume: forget metric rows written after the checkpoint (a run killed between the two writes) and a
        torn row (a run killed, or a disk filled, in the middle of one)."""
        path = self.out / "metrics.jsonl"
        if not self.main or not path.exists():
            return
        rows, torn = read_rows(path)
        keep = [r for r in rows if r.get("step", 0) <= step]
        if len(keep) != len(rows) or torn:
            dropped = len(rows) - len(keep)
            log.info("resume: dropping %d metric rows written after step %d and %d torn rows", dropped, step, torn)
            write_rows(path, keep)

    # -- evaluation
    def _train_mode(self) -> None:
        """Training mode; with ``--bn frozen`` every BatchNorm stays in eval mode (running statistics used and
        kept, as greedy inference uses them; its scale and shift still learn), except a ConvNet-AIG gate's, whose
        batch normalisation is the gate's design."""
        self.train_model.train()
        if self.cfg.bn == "frozen":
            freeze_batchnorm(self.model)

    def evaluate_split(self, split: str) -> dict[str, Any]:
        # Rank 0 evaluates the bare model on the whole split; the other ranks receive its result.
        loader = self.dist.full_split(self.data.split(split))
        return self.dist.on_main(
            lambda: evaluate(self.model, loader, self.cost, mode=self.model.mode, seed=self.cfg.seed)
        )

    # -- the loop
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with self.amp:
            out = self.train_model(
                x,
                self.stage.train_mode,
                threshold=cfg.threshold,
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
            self._non_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
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

    def _non_finite(self, loss: torch.Tensor) -> None:
        last = self.out / "last.pt"
        kept = (
            f"the last good checkpoint is {last} (step {load_checkpoint(last)['step']})"
            if last.exists()
            else "no checkpoint was written yet"
        )
        value = loss.item()
        raise SkipnetError(
            f"the training loss became {value} at step {self.step + 1} (stage {self.cfg.stage}); stopped before "
            f"updating the weights; {kept}. Lower --lr (or --alpha / --rl-weight), or resume from it with --resume"
        )

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            record = {"arch_config": self.model.config.to_dict(), "environment": environment(self.device, self.world)}
            text = json.dumps(cfg.to_dict() | record, indent=2)
            atomic_write(self.out / "config.json", lambda f: f.write(text.encode()))
        summary_path = self.out / "summary.json"
        if self.step >= self.total and summary_path.exists():
            log.info("%s has already finished (%d steps); nothing to do", self.out, self.total)
            return json.loads(summary_path.read_text())
        log.info(
            "%s: stage %s, %s, %d steps (%d per epoch), batch %d, lr %g (%s), %s",
            self.out,
            cfg.stage,
            self.model.config.name,
            self.total,
            self.steps_per_epoch,
            cfg.batch_size,
            cfg.lr,
            cfg.schedule,
            f"{self.model.num_gates} gates" if self.model.gates is not None else "no gates (plain ResNet)",
        )
        progress = Progress(self.total, self.main, cfg.log_every, self.step, self._elapsed_before(), self.progress_bar)
        self.runlog = RunLog(
            self.out, enabled=self.main, every=cfg.log_every, tensorboard=cfg.tensorboard, resume_step=self.step or None
        )
        run_start = time.time() - self._elapsed_before()
        self._train_mode()
        with self._stop_on_signals(), progress.logging_above(), self.runlog:  # closed also on a stop or an error
            while self.step < self.total:
                epoch = self.step // self.steps_per_epoch
                skip = self.step % self.steps_per_epoch
                self.data.train.set_epoch(epoch)
                for i, (x, y) in enumerate(self.data.train):
                    if i < skip:  # resuming inside an epoch: the loader's per-epoch streams replay to here
                        continue
                    if self.dist.any(self._signal is not None):  # every rank stops at the same step
                        progress.close()
                        self._interrupted(time.time() - run_start)
                    if self.dist.any(time.monotonic() - self.last_saved >= 60 * cfg.checkpoint_minutes):
                        self._save_last(self._latest_metrics())
                    try:
                        stats = self.train_step(x, y)
                    except RuntimeError:  # e.g. gate probabilities that are NaN: say why if the state diverged
                        if self._state_finite():
                            raise
                        raise self._diverged() from None
                    self.step += 1
                    self.n_running += 1
                    for k, v in stats.items():
                        self.running[k] = self.running.get(k, 0.0) + v
                    shown = {k: self.running[k] / self.n_running for k in ("loss", "acc", "exec") if k in self.running}
                    progress.update(self.step, shown)
                    lr, spent = self.optimizer.param_groups[0]["lr"], time.time() - run_start
                    self.runlog.step(self.step, stats, lr=lr, epoch=self.step / self.steps_per_epoch, time_s=spent)
                    if self.step % cfg.eval_every == 0 or self.step == self.total:
                        means = {k: v / self.n_running for k, v in self.running.items()}
                        self.running, self.n_running = {}, 0
                        self._checkpoint_round(means, time.time() - run_start)
                        self._train_mode()
                    if self.step >= self.total:
                        break
        progress.close()
        self.runlog.close()
        return self._finish(time.time() - run_start)

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM ask the loop to stop at the next step boundary with a resumable checkpoint; a second
        SIGINT interrupts at once (the previous checkpoint stays intact: writes are atomic)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signum
            if self.main:
                log.warning(
                    "%s: stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name,
                )

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _interrupted(self, elapsed: float) -> None:
        """Write ``last.pt`` at the current step (mid-interval: running statistics included) and stop."""
        signum = self._signal or signal.SIGTERM
        self._save_last(self._latest_metrics())
        if self.main:
            log.info("interrupted at step %d/%d after %.0f s", self.step, self.total, elapsed)
        self.dist.barrier()
        name = signal.Signals(signum).name
        raise Interrupted(
            f"{name}: stopped at step {self.step}/{self.total}; checkpoint {self.out / 'last.pt'} written; "
            f"continue with the same command plus --resume",
            128 + int(signum),
        )

    def _elapsed_before(self) -> float:
        if not self.history:
            rows, _ = read_rows(self.out / "metrics.jsonl")
            if rows:
                return float(rows[-1].get("time_s", 0.0))
        return 0.0

    def _checkpoint_round(self, train_stats: dict[str, float], elapsed: float) -> None:
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 3),
            "lr": self.optimizer.param_groups[0]["lr"],
            "time_s": round(elapsed, 1),
        }
        row |= {f"train_{k}": round(v, 5) for k, v in train_stats.items()}
        if self.data.val is not None:
            val = self.evaluate_split("val")
            row |= {
                "val_accuracy": val["accuracy"],
                "val_macs": val["macs_mean"],
                "val_macs_reduction": val["macs_reduction"],
                "val_cp": val["computation_percentage"],
                "val_skip_ratio": 1.0 - (val["executed_blocks_mean"] - 1.0) / max(1, self.model.num_gates),
                "val_skip_ratio_per_block": [round(float(r), 5) for r in val.get("skip_ratio_per_block", [])],
            }
            row["val_loss"] = val["loss"]
            c = self.cfg
            score = selection_score(
                c.select,
                val,
                c.alpha,
                c.beta,
                self.model.num_gates,
                c.skip_target,
                skip_budget=c.skip_budget,
                skip_reward=c.skip_reward,
                reward=c.reward,
                penalty=c.wrong_penalty,
            )
            row["val_score"] = score if math.isfinite(score) else None
            improved = score > self.best_score or self.cfg.select == "last"
        else:
            improved, score = True, math.inf  # no validation split: the last checkpoint is the chosen one
        if improved:
            self.best_val = row.get("val_accuracy", self.best_val)
            self.best_score = score
        metrics = row | {"best_val_accuracy": self.best_val, "best_score": self.best_score}
        self.history.append(row)
        self._append_metrics(row)
        self.runlog.evaluation(self.step, row, val if self.data.val is not None else None)
        if self.main:
            log.info(
                "step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
            )
        self._save_last(metrics, best=improved)
        self.dist.barrier()

    def _finish(self, elapsed: float) -> dict[str, Any]:
        summary: dict[str, Any] = {"stage": self.cfg.stage, "arch": self.model.config.name, "steps": self.step}
        if self.main:
            best = load_checkpoint(self.out / "best.pt", self.device)
            model = model_from_checkpoint(best).to(self.device)
            test_loader = self.dist.full_split(self.data.test)
            test = evaluate(model, test_loader, self.cost, mode=model.mode, seed=self.cfg.seed)
            summary |= {
                "best_step": best["step"],
                "best_val_accuracy": best["metrics"].get("val_accuracy"),
                "test": test,
                "train_time_s": round(elapsed, 1),
                "train_config": self.cfg.to_dict(),
            }
            text = json_text(summary, indent=2)  # a non-finite figure as null
            atomic_write(self.out / "summary.json", lambda f: f.write(text.encode()))
            log.info(
                "finished: test accuracy %.2f%% at %.4g MACs (%s than the plain ResNet), CP %.1f%%",
                test["accuracy"],
                test["macs_mean"],
                fewer_macs(test["macs_reduction"]),
                test["computation_percentage"],
            )
        return self.dist.broadcast_object(summary)  # rank 0's summary, on every rank


def freeze_batchnorm(model: nn.Module) -> None:
    """``--bn frozen``: every BatchNorm in eval mode, except a ConvNet-AIG gate's (its batch normalisation is
    what the gate is)."""
    normalising = {id(m) for g in model.modules() if isinstance(g, AIGGate) for m in g.modules()}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in normalising:
            m.eval()


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message that says something (not a header ending in a colon)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return next((ln for ln in lines if not ln.endswith(":")), lines[0] if lines else type(exc).__name__)[:200]


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
            return trainer.fit()
        finally:
            trainer.train_model = trainer.model  # free the DDP wrapper now, not at exit (see DistContext.cleanup)
            trainer.dist.cleanup()
