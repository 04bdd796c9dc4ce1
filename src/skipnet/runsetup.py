"""Assembling a training run in one downward pass: config → data → model → optimizer (issue 34).

:func:`assemble` is the pass; each step is a function a reader can call on its own:

1. :func:`resolve_config` -- the run to start or continue (``--resume``: the saved config, the options given
   applied or refused) and the checkpoint it continues from;
2. :func:`load_run_data` -- this process's share of the data, normalised as the resumed or ``--init`` checkpoint was;
3. :func:`build_model` -- the network for that data, initialised (zero residuals, gate bias, ``--init``,
   ``--init-torchvision``) and set to the stage's gate mode; :func:`load_teacher` for ``--distill``;
4. :func:`make_optimizer` -- SGD over the trainable parameter groups and its learning-rate schedule
   (:func:`lr_factor`).

What a run keeps while it trains (step, best checkpoint, checkpoints on disk) is :mod:`skipnet.runstate`; the loop
is :mod:`skipnet.train`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from skipnet.checkpoint import (
    checkpoint_stats,
    data_record,
    load_checkpoint,
    load_model,
    load_weights_into,
    require_same_class_names,
)
from skipnet.config import ArchConfig
from skipnet.cost import CostModel, cost_model
from skipnet.data import DataBundle, load_data
from skipnet.distributed import DistContext
from skipnet.errors import SkipnetError
from skipnet.evaluate import require_learned_gates
from skipnet.gated import GatedResNet, GateMode
from skipnet.policy import ALL_SKIP_THRESHOLD
from skipnet.registry import get_config
from skipnet.rundir import BEST, LAST, METRICS, SUMMARY, check_same_data, data_fingerprint
from skipnet.stages import STAGES, Stage
from skipnet.trainconfig import (
    TrainConfig,
    check_resumed_length,
    default_batch_size,
    resolve_defaults,
    resumed_config,
)

log = logging.getLogger(__name__)

# Files whose presence means a directory already holds a run (config.json alone: a run that never got to a
# checkpoint, which a new run may replace).
RUN_FILES = (LAST, BEST, METRICS, SUMMARY)


@dataclass
class RunSetup:
    """Everything :func:`assemble` builds, in the order it builds it."""

    cfg: TrainConfig  # resolved: every default filled
    stage: Stage
    dist: DistContext
    resume: dict[str, Any] | None  # the checkpoint --resume continues from
    resume_path: Path | None
    data: DataBundle
    data_fingerprint: str
    model: GatedResNet
    cost: CostModel
    teacher: GatedResNet | None
    steps_per_epoch: int
    total: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def assemble(cfg: TrainConfig, dist: DistContext, given: set[str]) -> RunSetup:
    """The run of ``cfg`` (``given``: the options the user set, which ``--resume`` applies or refuses), assembled."""
    if cfg.stage not in STAGES:
        raise SkipnetError(f"unknown stage {cfg.stage!r}; expected one of {', '.join(STAGES)}")
    stage = STAGES[cfg.stage]
    cfg, resume, resume_path = resolve_config(cfg, given, dist.rank == 0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    init = load_checkpoint(cfg.init) if cfg.init and resume is None else None
    arch = get_config(cfg.arch)
    if cfg.gate_bias is not None and not arch.gated:
        raise SkipnetError(f"--gate-bias needs a gated architecture; {arch.name} has no gates")
    cfg = replace(cfg, batch_size=cfg.batch_size or default_batch_size(arch.family))
    if cfg.batch_size % dist.world:
        raise SkipnetError(f"--batch-size {cfg.batch_size} is not divisible by the {dist.world} processes")
    data = load_run_data(cfg, arch, dist, resume if resume is not None else init, resumed=resume is not None)
    fingerprint = data_fingerprint(data)
    check_new_data(cfg, data, init if resume is None else None, resume is not None)
    if resume is not None:  # another --data path must hold the same data set
        check_same_data(resume, data.meta(), fingerprint, cfg.data, cfg.out)
    arch = arch.replace(num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size)
    if stage.needs_gates and not arch.gated:
        raise SkipnetError(f"stage {cfg.stage!r} needs a gated architecture (e.g. an *_rnn_gate_* name)")
    torch.manual_seed(cfg.seed)
    model = GatedResNet(arch)
    steps_per_epoch = len(data.train)
    cfg = resolve_defaults(cfg, arch.family, arch.dataset, model.num_gates, steps_per_epoch)
    total = total_steps(cfg, steps_per_epoch)
    if resume is not None:
        check_resumed_length(cfg, int(resume.get("step", 0)), total, cfg.out)
    elif init is not None:  # its gates as this run loads them; a gated --init with learned ones brings its threshold
        init = _gates_of_this_design(init, arch, cfg)
        cfg = init_threshold(cfg, model, stage, init, given)
    build_model(model, cfg, stage, init, resumed=resume is not None)
    cfg = safe_layout(cfg, model, dist.device)
    teacher = load_teacher(cfg.distill, data, cfg.channels_last, dist.device) if cfg.distill else None
    cost = cost_model(model)
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(model, cfg, total, steps_per_epoch)
    return RunSetup(
        cfg=cfg,
        stage=stage,
        dist=dist,
        resume=resume,
        resume_path=resume_path,
        data=data,
        data_fingerprint=fingerprint,
        model=model,
        cost=cost,
        teacher=teacher,
        steps_per_epoch=steps_per_epoch,
        total=total,
        optimizer=optimizer,
        scheduler=scheduler,
    )


# ------------------------------------------------------------------------------------------ 1. config
def resolve_config(
    cfg: TrainConfig, given: set[str], main: bool = True
) -> tuple[TrainConfig, dict[str, Any] | None, Path | None]:
    """``(config, checkpoint, its path)`` of the run to continue (``--resume`` with a checkpoint: the saved config
    with the options ``given`` that may change applied, :func:`~skipnet.trainconfig.resumed_config`), or
    ``(cfg, None, None)`` for a new run."""
    path = resume_source(cfg, main)
    if path is None:
        return cfg, None, None
    ckpt = load_checkpoint(path)
    try:
        saved = TrainConfig.from_dict(ckpt["train_config"])
    except (KeyError, TypeError, AttributeError):
        raise SkipnetError(f"{path} has no usable run configuration to resume from") from None
    return resumed_config(cfg, saved, given, cfg.out), ckpt, path


def check_no_run(out: Path) -> None:
    """A new run may not start in a directory that holds one (it would be overwritten)."""
    if out.exists() and not out.is_dir():
        raise SkipnetError(f"--out {out} is a file, not a run directory; choose another --out")
    held = [f for f in RUN_FILES if (out / f).exists()]
    if held:
        raise SkipnetError(
            f"--out {out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "or choose another --out"
        )


def resume_source(cfg: TrainConfig, main: bool = True) -> Path | None:
    """The checkpoint ``--resume`` continues from: ``last.pt``; or ``best.pt`` of a run stopped (killed, disk
    full) during its first checkpoint, after ``best.pt`` was written and before ``last.pt``: the two hold the
    same state. ``None``: a new run (``--resume`` on a directory without a checkpoint yet clears it first)."""
    out = Path(cfg.out)
    if not cfg.resume:
        check_no_run(out)
        return None
    last, best = out / LAST, out / BEST
    if last.exists():
        return last
    if not best.exists():
        start_afresh(out, main)
        return None
    try:
        step = load_checkpoint(best)["step"]
    except SkipnetError as exc:
        raise SkipnetError(
            f"--resume: {out} holds a best.pt but no last.pt to continue from, and best.pt cannot be "
            f"resumed ({first_line(exc)}); choose another --out (or remove what is there)"
        ) from None
    log.warning(
        "--resume: %s has no last.pt (stopped during its first checkpoint); continuing from best.pt (step %d), "
        "the same state",
        out,
        step,
    )
    return best


def start_afresh(out: Path, main: bool) -> None:
    """``--resume`` on a directory without a checkpoint (a job preempted before its first one, re-queued with the
    same command line): start a new run there, dropping what the first attempt left."""
    leftovers = [n for n in (METRICS, SUMMARY) if (out / n).exists()]  # best.pt: refused
    log.warning("--resume: %s holds no checkpoint yet; starting a new run", out)
    if main:
        for name in leftovers:
            (out / name).unlink()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message that says something (not a header ending in a colon)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return next((ln for ln in lines if not ln.endswith(":")), lines[0] if lines else type(exc).__name__)[:200]


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if cfg.iters is not None:
        return int(cfg.iters)
    return max(1, int(round(cfg.epochs * steps_per_epoch)))


# ------------------------------------------------------------------------------------------ 2. data
def load_run_data(
    cfg: TrainConfig, arch: ArchConfig, dist: DistContext, saved: dict[str, Any] | None, *, resumed: bool = False
) -> DataBundle:
    """This process's share of the data (``cfg.batch_size`` is the global batch), normalised as ``saved`` (the
    resumed or ``--init`` checkpoint) was; a resumed run's images made S x S as they were (new data, under
    ``--init``, is read as it is)."""
    stats = checkpoint_stats(saved) if saved is not None else None
    with dist.main_first():  # one process per machine extracts and caches the data first
        return load_data(
            cfg.data,
            data_dir=cfg.data_dir,
            download=cfg.download,
            batch_size=cfg.batch_size // dist.world,
            eval_batch_size=cfg.eval_batch_size,
            val_split=cfg.val_split,
            seed=cfg.seed,
            workers=cfg.workers,
            rank=dist.rank,
            world=dist.world,
            limit_train=cfg.limit_train,
            limit_test=cfg.limit_test,
            image_size=cfg.image_size or (arch.image_size if arch.family == "imagenet" else None),
            stats=stats,
            prepare=data_record(saved or {}).get("prepare") if resumed else None,
        )


def check_new_data(cfg: TrainConfig, data: DataBundle, init: dict[str, Any] | None, resumed: bool) -> None:
    """One line for a ``--val-split`` that carves no image (validation would silently be off) and for an
    ``--init`` checkpoint whose classes have other names."""
    if cfg.val_split > 0 and not resumed and data.val is None:
        n = data.info.get("train_images", 0)
        raise SkipnetError(
            f"--val-split {cfg.val_split:g} of {n} training images is no image: ask for at least {1 / max(n, 1):.2g} "
            "(one image), or pass --val-split 0 to train without a validation split"
        )
    if init is not None:
        require_same_class_names(_recorded_classes(init), data, f"--init {cfg.init}", SAME_CLASSES)


# ------------------------------------------------------------------------------------------ 3. model
def build_model(model: GatedResNet, cfg: TrainConfig, stage: Stage, init: dict[str, Any] | None, resumed: bool) -> None:
    """Initialise the new ``model`` (zero residuals, gate bias, ``--init`` weights, ``--init-torchvision``) and set
    its threshold, keep ratio and the stage's gate mode."""
    arch = model.config
    if cfg.zero_init_residual:  # never with --init (refused: its tensors would replace these)
        model.zero_init_residual()
        if stage.train_mode == GateMode.HARD and not (cfg.gate_bias or 0) > 0:
            log.warning(
                "--zero-init-residual with gates that may start closed: in SP a closed gate's zero branch gets "
                "no gradient and the gate none either; pass --gate-bias 2 so that the gates start open"
            )
    if init is not None:
        init = _gates_of_this_design(init, arch, cfg)
        untrained = untrained_gates(model, init)
        if cfg.freezes_gates and untrained is not None:
            raise SkipnetError(
                f"--freeze {cfg.freeze} keeps the gates as --init brings them, but {cfg.init} has no trained "
                f"{arch.gate} gates{untrained}: they would stay at random; pass --init with trained gates (stage sp "
                "or hrl)"
            )
        if cfg.gate_bias is not None and untrained is None:
            raise SkipnetError(
                f"--gate-bias sets the bias of gates that start untrained; --init {cfg.init} brings its gates' own "
                "(trained ones): leave --gate-bias out"
            )
        left = load_weights_into(model, init, cfg.init)
        log.info("initialised from %s (%d tensors left at their initial values)", cfg.init, len(left))
    if cfg.gate_bias is not None and arch.gated:  # after --init: its untrained gates' bias is replaced too
        model.set_gate_bias(cfg.gate_bias)
    if cfg.init_torchvision and not resumed:
        init_torchvision(model, cfg.init_torchvision)
    model.threshold = cfg.threshold
    model.keep_ratio = cfg.keep
    model.detach_gate_inputs = cfg.detach_gates
    model.mode = stage.eval_mode if arch.gated or stage.eval_mode == GateMode.RANDOM else GateMode.ALL_ON


def untrained_gates(model: GatedResNet, init: dict[str, Any]) -> str | None:
    """Why the gates ``init`` brings the gated ``model`` are not trained ones, as a parenthesis (``""``: it holds
    none), or ``None`` where they are: the rule of :func:`skipnet.evaluate.require_learned_gates` (no gates, mode
    ``all_on`` -- a base stage ran every block -- or ``random``, SDV) applied to ``init``'s gates and mode."""
    if model.gates is None or not any(k.startswith("gates.") for k in init["state_dict"]):
        return ""
    own = model.mode
    model.mode = GateMode(init.get("mode", own))
    try:
        require_learned_gates(model, "--init", "training from its gates")
    except SkipnetError:
        stage = init.get("stage") or (init.get("train_config") or {}).get("stage")
        return f" (mode {model.mode.value}{f' from stage {stage}' if stage else ''})"
    finally:
        model.mode = own
    return None


def init_threshold(
    cfg: TrainConfig, model: GatedResNet, stage: Stage, init: dict[str, Any], given: set[str]
) -> TrainConfig:
    """``cfg`` with the greedy threshold of ``--init`` (a calibrated checkpoint's own, as ``skipnet sweep`` keeps
    it) where its gates are learned ones that this stage's gates decide with and no ``--threshold`` was
    ``given``; an explicit ``--threshold`` wins."""
    if "threshold" in given or not stage.eval_mode.computes_gates or untrained_gates(model, init) is not None:
        return cfg
    threshold = float(init.get("threshold", cfg.threshold))
    if threshold == cfg.threshold:
        return cfg
    if threshold == ALL_SKIP_THRESHOLD:
        raise SkipnetError(
            f"--init {cfg.init} is calibrated to skip every gated block (threshold {threshold:g}): no block would "
            "run to train; pass --threshold (e.g. 0.5) to train from it"
        )
    j = cfg.threshold_jitter
    if j and not j < threshold < 1 - j:
        raise SkipnetError(
            f"--threshold-jitter {j:g} needs a threshold within ({j:g}, {1 - j:g}); --init {cfg.init} brings "
            f"{threshold:g}: pass --threshold"
        )
    log.info(
        "--init %s brings its threshold %g: the run trains and validates at it (--threshold: another)",
        cfg.init,
        threshold,
    )
    return replace(cfg, threshold=threshold)


def _gates_of_this_design(init: dict[str, Any], arch: ArchConfig, cfg: TrainConfig) -> dict[str, Any]:
    """``init`` as ``--init`` loads it: a gated checkpoint of another gate design gives its backbone only (a tensor
    of its gates that happens to fit one of these would be a meaningless start), with a warning."""
    theirs = (init.get("arch") or {}).get("gate")
    if (
        {theirs, arch.gate} & {None, "none"}  # a plain network on either side
        or theirs == arch.gate
        or not any(k.startswith("gates.") for k in init["state_dict"])
    ):
        return init
    log.warning(
        "--init %s has %s gates, %s %s ones: its backbone is loaded, the gates start untrained",
        cfg.init,
        theirs,
        arch.name,
        arch.gate,
    )
    return init | {"state_dict": {k: v for k, v in init["state_dict"].items() if not k.startswith("gates.")}}


# oneDNN's AVX-512 kernel for the weight gradient of a 1x1, stride-2 convolution in channels_last crashes the
# process (SIGSEGV/SIGABRT, PyTorch 2.14.1 on CPU) when the convolution reads fewer than 16 channels and its input
# is 56 px or more: the shortcuts of the tiny_* networks (width 8). Such networks train in NCHW on the CPU.
NARROW_CHANNELS = 16


def narrow_strided_1x1(model: torch.nn.Module) -> list[str]:
    """The 1x1, stride-2 convolutions of ``model`` that read fewer than :data:`NARROW_CHANNELS` channels."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.stride != (1, 1)
        and m.in_channels < NARROW_CHANNELS
    ]


def safe_layout(cfg: TrainConfig, model: GatedResNet, device: torch.device) -> TrainConfig:
    """``cfg`` with channels_last turned off (and a warning) where the CPU kernels would crash the run."""
    narrow = narrow_strided_1x1(model) if cfg.channels_last and device.type == "cpu" else []
    if not narrow:
        return cfg
    log.info(
        "%s trains in NCHW, not channels_last: its %d-channel 1x1 stride-2 shortcut convolutions (%s) crash "
        "oneDNN's CPU kernels in channels_last (PyTorch 2.14)",
        model.config.name,
        model.get_submodule(narrow[0]).in_channels,
        ", ".join(narrow),
    )
    return replace(cfg, channels_last=False)


SAME_CLASSES = "it needs a checkpoint trained on data with the same classes, in the same order"


def _recorded_classes(ckpt: dict[str, Any]) -> Any:
    return data_record(ckpt).get("classes")


def load_teacher(spec: str, data: DataBundle, channels_last: bool, device: torch.device) -> GatedResNet:
    """The frozen network whose predictions ``--distill`` matches (eval mode, its own gate mode): it must see the
    same classes and the same input normalisation as the student, or the targets would be wrong."""
    try:
        teacher, ckpt = load_model(spec)
    except SkipnetError as exc:  # say which of the run's checkpoints it is
        raise SkipnetError(f"--distill {spec} (the teacher): {exc}"[:400]) from None
    if teacher.config.num_classes != data.num_classes:
        raise SkipnetError(
            f"--distill {spec} predicts {teacher.config.num_classes} classes; the data has {data.num_classes}"
        )
    if teacher.config.in_channels != data.in_channels:
        raise SkipnetError(
            f"--distill {spec} takes {teacher.config.in_channels}-channel images; the data has "
            f"{data.in_channels}-channel ones"
        )
    require_same_class_names(_recorded_classes(ckpt), data, f"--distill {spec}", SAME_CLASSES)
    stats = data_record(ckpt)
    if stats.get("mean") is None:
        log.warning("--distill %s records no input normalisation: it is taken to be this run's", spec)
    elif not _same_stats(stats, data):
        raise SkipnetError(
            f"--distill {spec} was trained on inputs normalised with mean {stats['mean']} and std {stats['std']}; "
            f"this run normalises with {list(data.mean)} and {list(data.std)}"
        )
    teacher.requires_grad_(False)
    teacher.to(device)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher.eval()


def _same_stats(saved: dict[str, Any], data: DataBundle) -> bool:
    pairs = list(zip(saved["mean"], data.mean)) + list(zip(saved["std"], data.std))
    return len(saved["mean"]) == len(data.mean) and all(abs(a - b) <= 1e-4 for a, b in pairs)


def init_torchvision(model: GatedResNet, path: str) -> None:
    """``--init-torchvision``: a torchvision ResNet's state dict into an ImageNet backbone (the classifier only
    when its classes match)."""
    if model.config.family != "imagenet":
        raise SkipnetError("--init-torchvision needs an imagenet_* architecture")
    if not Path(path).is_file():
        what = "is a directory; give the file torch.save wrote" if Path(path).is_dir() else "does not exist"
        raise SkipnetError(f"--init-torchvision: {path!r} {what}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SkipnetError(f"--init-torchvision: cannot read {path} ({type(exc).__name__})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not (isinstance(sd, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items())):
        raise SkipnetError(f"--init-torchvision: {path} is not a state dict (names to tensors) of a torchvision ResNet")
    weights = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    odd = next((k for k, v in weights.items() if not v.is_floating_point()), None)
    if odd is not None:
        raise SkipnetError(f"--init-torchvision: {path} holds {sd[odd].dtype} values in {odd}; weights are floats")
    odd = next((k for k, v in weights.items() if not bool(torch.isfinite(v).all())), None)
    if odd is not None:
        raise SkipnetError(f"--init-torchvision: {path} holds NaN or infinite values in {odd}")
    fc = sd.get("fc.weight")
    if fc is not None and fc.dim() == 2 and fc.shape[0] != model.config.num_classes:
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        log.info("--init-torchvision: classifier has a different number of classes; fc left at random init")
    mine = model.backbone.state_dict()
    # older state dicts lack BatchNorm's counters (loading fills them); fc may be left out (other classes)
    bad = [k for k in mine if k not in sd and not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    bad += [k for k in sd if k not in mine]
    bad += [
        f"{k} is {tuple(sd[k].shape)}, not {tuple(v.shape)}" for k, v in mine.items() if sd.get(k, v).shape != v.shape
    ]
    if bad:
        raise SkipnetError(f"--init-torchvision: {path} is not a matching torchvision ResNet state dict ({bad[0]})")
    model.backbone.load_state_dict(sd, strict=False)


# ------------------------------------------------------------------------------------------ 4. optimizer
def make_optimizer(
    model: GatedResNet, cfg: TrainConfig, total: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over two parameter groups (the gates at ``--gate-lr-mult`` times the lr; ``--freeze`` leaves one out)
    and its lr schedule over ``total`` steps."""
    gate_params = list(model.gates.parameters()) if model.gates is not None else []
    gate_ids = {id(q) for q in gate_params}
    backbone = [q for q in model.parameters() if id(q) not in gate_ids]
    frozen = {"backbone": backbone, "gates": gate_params, "policy": gate_params}.get(cfg.freeze, [])
    for q in frozen:  # --freeze: no gradient, no update, no weight decay
        q.requires_grad_(False)
    groups = [] if cfg.freeze == "backbone" else [{"params": backbone}]
    if gate_params and not cfg.freezes_gates:  # the policy may learn faster than the features (--gate-lr-mult)
        groups.append({"params": gate_params, "lr": cfg.lr * cfg.gate_lr_mult})
    nesterov = cfg.nesterov and cfg.momentum > 0
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, weight_decay=cfg.weight_decay)
    imagenet = model.config.family == "imagenet"
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(cfg.schedule, s, total, cfg.warmup_iters, imagenet, steps_per_epoch)
    )
    return opt, schedule


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
