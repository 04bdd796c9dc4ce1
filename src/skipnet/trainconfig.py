"""The options of a training run (:class:`TrainConfig`): their defaults, their ranges, and the paper's settings
that fill the ones left unset (:func:`resolve_defaults`). The CLI's ``skipnet train`` options are these."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from skipnet.config import IMAGENET_LAYERS, ArchConfig
from skipnet.data.sources import BUILTINS
from skipnet.errors import SkipnetError, check_value
from skipnet.runlog import left_unset

SCHEDULES = ("paper", "step", "cosine", "onecycle", "constant")
BN_MODES = ("update", "frozen")
# HRL/RL from --init freeze BatchNorm by default up to this learning rate (frozen measured better at the paper's
# 1e-4 on CIFAR-10 and digits, worse at 3e-3 on CIFAR-10 by 3.1 and 8.7 points: benchmarks/RESULTS.md).
BN_FREEZE_MAX_LR = 1e-3
SELECT_RULES = ("accuracy", "reward", "last")
SKIP_REWARDS = ("all", "correct")  # --skip-reward: who earns Eq. 5's skip reward
RL_STAGES = ("hrl", "rl")  # the stages that sample routes and learn them by REINFORCE (stages.Stage.uses_rl)
GATED_STAGES = ("hrl", "rl", "sp", "soft")  # the stages that train gates (stages.Stage.needs_gates)
REWARDS = ("hybrid", "blockdrop")  # --reward: Eq. 5-6, or BlockDrop's 1 - u^2 if right else -penalty
FREEZE = ("none", "backbone", "gates", "policy")  # --freeze: which parameters do not train (policy: the gates
# as inference routes, a ConvNet-AIG gate's BatchNorm statistics included)
BASELINES = ("none", "batch", "ema", "self-critical")  # --baseline (losses.Baseline)
OPEN_GATE_BIAS = 2.0  # sp/soft from scratch: gates start open, p = sigmoid(2) = 0.88 (beyond the paper)
MAX_THREADS = 256  # --threads beyond this starts that many OpenMP threads per process (a crash under task limits)
MAX_WORKERS = 64  # DataLoader worker processes
MAX_IMAGE_SIZE = 1024  # px, as skipnet flops: a training input larger than this only fails in the allocator
MAX_BATCH = 65536
# The built-in data sets and their images' side: they are not resized, so --image-size must be that or unset.


class _UnsetThreshold(float):
    """``--threshold`` left unset: 0.5, unless a trained ``--init`` brings its own (:func:`skipnet.runsetup.
    init_threshold`). A number like any other, that also says it was not given, so that ``config.json`` records
    the threshold the run took as derived (a ``--config`` replay takes its own ``--init``'s again) and a
    ``--threshold 0.5`` given stays given. :func:`resolve_defaults` makes it a plain float (nothing saved holds
    one)."""

    given = False  # runlog.left_unset

    def __copy__(self) -> _UnsetThreshold:
        return self

    def __deepcopy__(self, memo: dict) -> _UnsetThreshold:
        return self

    def __reduce__(self) -> tuple:
        return float, (float(self),)


UNSET_THRESHOLD = _UnsetThreshold(0.5)


@dataclass
class TrainConfig:
    """Every option of ``skipnet train``; ``None`` means "the paper's default for this stage and data"."""

    arch: str
    stage: str
    data: str
    out: str
    data_dir: str | None = None
    download: bool = False
    init: str | None = None
    init_torchvision: str | None = None
    epochs: float | None = None
    iters: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None
    schedule: str | None = None
    warmup_iters: int = 0
    alpha: float | None = None
    beta: float | None = None
    rl_weight: float = 1.0
    gate_lr_mult: float = 1.0
    baseline: str = "none"
    explore: float = 0.0
    skip_target: float | None = None
    skip_budget: float | None = None
    skip_reward: str = "all"
    alpha_lr: float = 0.01
    reward: str = "hybrid"
    wrong_penalty: float = 1.0
    entropy_bonus: float = 0.0
    freeze: str = "none"
    detach_gates: bool = False
    batch_shape: float | None = None
    batch_shape_weight: float = 1.0
    batch_shape_floor: float | None = None
    difficulty_spread: float | None = None
    zero_init_residual: bool = False
    gate_bias: float | None = None
    paper_gate_init: bool = False
    bn: str | None = None
    select: str | None = None
    keep: float = 0.5
    threshold: float = UNSET_THRESHOLD  # 0.5, or a trained --init's own
    threshold_jitter: float = 0.0
    val_split: float = 0.1
    seed: int = 0
    eval_every: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    image_size: int | None = None
    workers: int = 4
    threads: int | None = None
    amp: str = "none"
    compile: bool = False
    sync_bn: bool = False
    channels_last: bool = True
    log_every: int = 50
    resume: bool = False
    device: str = "auto"
    checkpoint_minutes: float = 10.0
    tensorboard: bool = False
    distill: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 4.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default (the CLI's defaults are these; ``None``: the stage's paper default)."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    def validate(self) -> None:
        """Raise a one-line error for an option out of its range, before anything is loaded or written."""
        for name, test, what in RULES:
            check_value(name, getattr(self, name), test, what)
        for name, choices in (
            ("schedule", SCHEDULES),
            ("bn", BN_MODES),
            ("select", SELECT_RULES),
            ("skip_reward", SKIP_REWARDS),
            ("reward", REWARDS),
            ("freeze", FREEZE),
            ("baseline", BASELINES),
        ):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise SkipnetError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.skip_budget is not None and self.skip_target is not None:
            raise SkipnetError("--skip-budget and --skip-target are alternatives (a mean budget or a per-sample cap)")
        rl_only = (
            ("--skip-budget", self.skip_budget is not None),
            ("--skip-reward", self.skip_reward != "all"),
            ("--reward", self.reward != "hybrid"),
            ("--entropy-bonus", self.entropy_bonus != 0),
            ("--baseline self-critical", self.baseline == "self-critical"),
        )
        for flag, on in rl_only:
            if on and self.stage not in RL_STAGES:
                raise SkipnetError(f"{flag} changes the HRL/RL reward or its estimator; stage {self.stage} has none")
        self._validate_freeze()
        self._validate_init()
        self._validate_unused()
        if self.device.startswith("cpu:") and self.device != "cpu:0":
            raise SkipnetError(f"--device {self.device}: the CPU is one device; pass --device cpu")
        from skipnet.registry import check_image_size, get_config

        check_image_size(get_config(self.arch), self.image_size)
        native = BUILTINS[self.data].size if self.data in BUILTINS else None
        if self.image_size is not None and native is not None and self.image_size != native:
            raise SkipnetError(
                f"--image-size {self.image_size}: the built-in data set {self.data} has {native}x{native} images and "
                f"is not resized; drop --image-size (or give an image folder, which is resized to it)"
            )

    @property
    def freezes_gates(self) -> bool:
        """``--freeze gates`` or ``policy``: the gates' parameters do not train."""
        return self.freeze in ("gates", "policy")

    def _validate_unused(self) -> None:
        """An option set where nothing reads it is refused, not silently ignored; unless its value is the one this
        run gives it when unset (:func:`resolve_defaults`): a replayed ``config.json`` or a resumed run restates it."""
        d, stage, rl = TrainConfig.defaults(), self.stage, self.stage in RL_STAGES
        scored = rl or self.select == "reward"  # the hybrid return: HRL/RL's reward, --select reward's score
        hybrid = f"it is the hybrid reward's (Eq. 5-6), which stage {stage} neither trains nor selects on"
        no_gates = stage not in GATED_STAGES
        unused = (
            ("--explore", "explore", not rl, f"stage {stage} samples no gates"),
            ("--alpha", "alpha", not scored, hybrid),
            ("--beta", "beta", not scored, hybrid),
            ("--skip-target", "skip_target", not scored, hybrid),
            ("--rl-weight", "rl_weight", not rl, f"it scales the REINFORCE term; stage {stage} has none"),
            ("--baseline", "baseline", not rl, f"it is REINFORCE's baseline; stage {stage} has no REINFORCE term"),
            (
                "--select",
                "select",
                self.val_split == 0 and self.select != "last",
                "with --val-split 0 there is no validation split to choose on: best.pt is the last checkpoint "
                "(as --select last)",
            ),
            ("--threshold", "threshold", no_gates, f"it thresholds the gates; stage {stage} decides by none"),
            (
                "--gate-lr-mult",
                "gate_lr_mult",
                no_gates or self.freezes_gates,
                f"stage {stage} trains no gate" if no_gates else f"--freeze {self.freeze} keeps the gates fixed",
            ),
            ("--alpha-lr", "alpha_lr", self.skip_budget is None, "it adapts --skip-budget's alpha; none is given"),
            ("--wrong-penalty", "wrong_penalty", self.reward != "blockdrop", "it is --reward blockdrop's gamma"),
            ("--distill-weight", "distill_weight", self.distill is None, "it weighs --distill; none is given"),
            ("--distill-temperature", "distill_temperature", self.distill is None, "it is --distill's; none is given"),
            ("--keep", "keep", stage != "sdv", f"it is stage sdv's keep ratio; stage {stage} has none"),
            (
                "--paper-gate-init",
                "paper_gate_init",
                stage not in ("sp", "soft") or self.init is not None or self.init_torchvision is not None,
                "it keeps the gates' initialisation of SP from scratch",
            ),
        )
        for flag, name, idle, why in unused:  # its value as this run would fill it (a replayed config.json's)
            value = getattr(self, name)
            if idle and value != d[name] and value != _filled_default(self, name):
                shown = "" if isinstance(value, bool) else f" {value}" if isinstance(value, str) else f" {value:g}"
                raise SkipnetError(f"{flag}{shown} has no effect here: {why}")

    def _validate_init(self) -> None:
        """Options that set a network's first weights, against each other and against ``--init``, which brings them:
        one that the other would overwrite is refused, not ignored."""
        start = self.init or self.init_torchvision
        if self.init and self.init_torchvision:
            raise SkipnetError(
                f"--init {self.init} and --init-torchvision {self.init_torchvision} both set the backbone's weights "
                f"(torchvision's would replace the checkpoint's): leave one out"
            )
        if self.zero_init_residual and start:
            raise SkipnetError(
                f"--zero-init-residual zeroes each block's last BatchNorm of a network trained from scratch; --init "
                f"{start} replaces them: leave one out"
            )
        if self.paper_gate_init and self.gate_bias is not None:
            raise SkipnetError(
                "--paper-gate-init and --gate-bias are alternatives (the paper's gate initialisation, or a bias of "
                "your choice): leave one out"
            )

    def _validate_freeze(self) -> None:
        if self.reward == "blockdrop" and (self.skip_target is not None or self.skip_reward != "all"):
            raise SkipnetError("--skip-target and --skip-reward shape the hybrid reward; --reward blockdrop is another")
        if self.reward == "blockdrop" and self.skip_budget is not None:
            raise SkipnetError("--skip-budget adapts the hybrid reward's alpha; --reward blockdrop has no alpha")
        if self.freeze == "backbone":
            if self.stage not in GATED_STAGES:
                raise SkipnetError(f"--freeze backbone trains the gates alone; stage {self.stage} trains none")
            if self.init is None and self.init_torchvision is None:
                raise SkipnetError("--freeze backbone needs a trained backbone: pass --init (e.g. the plain network)")
            if self.bn == "update":
                raise SkipnetError("--freeze backbone keeps BatchNorm frozen too; --bn update contradicts it")
        if self.batch_shape is not None and self.batch_shape_floor is not None:
            raise SkipnetError(
                "--batch-shape (one rate) and --batch-shape-floor (each gate's own rate) are alternatives"
            )
        shaped = self.batch_shape is not None or self.batch_shape_floor is not None
        if shaped and self.stage not in GATED_STAGES:
            raise SkipnetError(f"--batch-shape shapes the gates' probabilities; stage {self.stage} trains no gate")
        if shaped and self.freezes_gates:
            raise SkipnetError(f"--batch-shape trains the gates; --freeze {self.freeze} keeps them fixed")
        if self.difficulty_spread is not None:
            if self.stage not in GATED_STAGES or self.freezes_gates:
                raise SkipnetError("--difficulty-spread orders the gates' executed shares; this run trains no gate")
            if self.distill is None:
                raise SkipnetError("--difficulty-spread ranks images by the teacher's loss: pass --distill TEACHER")
        if self.threshold_jitter and self.stage != "sp":
            raise SkipnetError("--threshold-jitter moves the hard gates' threshold; only stage sp thresholds them")
        if self.threshold_jitter and not self.threshold_jitter < self.threshold < 1 - self.threshold_jitter:
            raise SkipnetError("--threshold-jitter J needs --threshold within (J, 1 - J)")
        if self.detach_gates and self.stage not in GATED_STAGES:
            stage = self.stage
            raise SkipnetError(f"--detach-gates stops the gates' gradient into the backbone; stage {stage} has none")
        if self.freezes_gates and self.stage not in GATED_STAGES:
            stage = self.stage
            raise SkipnetError(f"--freeze {self.freeze} needs a stage that trains gates; stage {stage} trains none")
        if self.freezes_gates and self.init is None:
            raise SkipnetError(
                f"--freeze {self.freeze} keeps the gates as --init brings them: pass --init with trained gates"
            )


# Options a resumed run takes from its new command line (``--resume``): where the data is (the same data set: its
# record in the checkpoint is checked), how often it logs and checkpoints, what it writes besides, the machine it uses,
# and a new length (extending or shortening the schedule, never below the step reached). Any other option given with
# another value than the saved run's changes what the run means and is refused, naming it; none is ignored.
RESUME_MAY_CHANGE = frozenset(
    {
        "epochs",
        "iters",
        "threads",
        "resume",
        "out",
        "data",
        "data_dir",
        "download",
        "device",
        "workers",
        "log_every",
        "checkpoint_minutes",
        "tensorboard",
        "eval_batch_size",
    }
)


def options_set(cfg: TrainConfig) -> set[str]:
    """The options of ``cfg`` a caller set, as far as the values tell: those that are not their defaults, and a
    threshold given (a ``--init``'s does not replace it; the CLI knows better, from its command line:
    :func:`skipnet.runlog.explicit_options`)."""
    d = TrainConfig.defaults()
    given = {k for k, v in cfg.to_dict().items() if v is not None and (k not in d or v != d[k])}
    return given | ({"threshold"} if not left_unset(cfg.threshold) else set())


def _filled_default(cfg: TrainConfig, name: str) -> Any:
    """The value :func:`resolve_defaults` gives option ``name`` of ``cfg`` left unset (its declared default,
    or the stage's paper setting where that is ``None``)."""
    from skipnet.registry import get_config

    arch = get_config(cfg.arch)
    unset = replace(cfg, **{name: TrainConfig.defaults()[name]})
    return getattr(resolve_defaults(unset, arch.family, arch.dataset, gated_blocks(arch), 1), name)


def gated_blocks(arch: ArchConfig) -> int:
    """N, the gated blocks of ``arch`` (every residual block but the first): ``GatedResNet(arch).num_gates``
    without building it."""
    per_stage = (arch.depth - 2) // 6 if arch.family == "cifar" else IMAGENET_LAYERS[arch.depth][1]
    return (3 * per_stage if arch.family == "cifar" else sum(per_stage)) - 1


# Paths a resumed run may give anew where the file moved: its contents are checked instead (RunState's teacher
# SHA-256), so not in RESUME_MAY_CHANGE, which also says what a sweep rerun may change.
RESUME_MAY_MOVE = frozenset({"distill"})


def changed_option(cfg: TrainConfig, saved: TrainConfig, given: set[str]) -> tuple[str, Any, Any] | None:
    """``(option, saved value, new value)`` of the first option ``given`` that a resumed run may not change and
    ``cfg`` sets to another value than ``saved`` (lengths excepted, and a moved file of ``RESUME_MAY_MOVE``), or
    ``None``."""
    for name in sorted(given & {f.name for f in fields(TrainConfig)}):
        value, before = getattr(cfg, name), getattr(saved, name)
        moved = name in RESUME_MAY_MOVE and before is not None
        if value is not None and name not in ("epochs", "iters", *RESUME_MAY_CHANGE) and not moved and value != before:
            return name.replace("_", "-"), before, value
    return None


def resumed_config(cfg: TrainConfig, saved: TrainConfig, given: set[str], out: str) -> TrainConfig:
    """The saved run's options with those of ``RESUME_MAY_CHANGE`` that the new command line gives (``given``)
    applied; a length (``--epochs`` or ``--iters``) replaces the saved one, whichever it was. Any other option
    given with a value other than the saved run's is refused in one line naming it."""
    changed = changed_option(cfg, saved, given)
    if changed is not None:
        name, before, value = changed
        raise SkipnetError(
            f"--resume: the run in {out} has {name} {before!r}, not {value!r}, and changing "
            "it would make it another run; resume it with its own options (or choose another --out)"
        )
    merged = TrainConfig(**asdict(saved))
    for name in sorted(given & {f.name for f in fields(TrainConfig)} & (RESUME_MAY_CHANGE | RESUME_MAY_MOVE)):
        if getattr(cfg, name) is not None:
            setattr(merged, name, getattr(cfg, name))
    if cfg.epochs is not None or cfg.iters is not None:
        merged.epochs, merged.iters = cfg.epochs, cfg.iters
    merged.resume, merged.out = True, cfg.out
    return merged


def check_resumed_length(cfg: TrainConfig, step: int, total: int, out: str) -> None:
    """A resumed run may be given a new length, but not one shorter than the step it has reached."""
    if step > total:
        length = f"--iters {cfg.iters}" if cfg.iters is not None else f"--epochs {cfg.epochs:g}"
        raise SkipnetError(
            f"--resume: {length} is {total} steps, but the run in {out} has already reached step {step}; give a "
            "length of at least that (or leave it out)"
        )


def default_batch_size(family: str) -> int:
    """The global batch when ``--batch-size`` is not given: 256 on ImageNet, 128 otherwise (§4)."""
    return 256 if family == "imagenet" else 128


def resolve_defaults(cfg: TrainConfig, family: str, dataset: str, num_gates: int, steps_per_epoch: int) -> TrainConfig:
    """Fill ``None`` options with the paper's settings (§4; the authors' scripts) for this stage and data."""
    c = TrainConfig(**asdict(cfg))
    c.threshold = float(c.threshold)  # left unset: 0.5 (a trained --init's replaces it: runsetup.init_threshold)
    imagenet = family == "imagenet"
    finetune = c.stage == "hrl" and (c.init is not None or c.init_torchvision is not None)
    if c.batch_size is None:
        c.batch_size = default_batch_size(family)
    if c.weight_decay is None:
        c.weight_decay = 1e-4
    if c.alpha is None:
        c.alpha = 0.01 if imagenet else 0.1
    if c.beta is None:
        c.beta = c.alpha / max(1, num_gates) if imagenet else 1.0
    if finetune:  # HRL after SP: lr 1e-4, constant, 10k iterations (CIFAR), 50 epochs SVHN, 40 ImageNet
        c.lr = 1e-4 if c.lr is None else c.lr
        c.schedule = c.schedule or "constant"
        if c.iters is None and c.epochs is None:
            if imagenet:
                c.epochs = 40
            elif dataset == "svhn":
                c.epochs = 50
            else:
                c.iters = 10_000
    else:  # base / sp / soft / rl / sdv / hrl from scratch: the ResNet recipe
        c.lr = 0.1 if c.lr is None else c.lr
        c.schedule = c.schedule or "paper"
        if c.iters is None and c.epochs is None:
            if imagenet:
                c.epochs = 120
            else:
                c.iters = 64_000
    if c.eval_every is None:
        c.eval_every = steps_per_epoch if steps_per_epoch <= 2000 else 2000
    from_scratch = c.init is None and c.init_torchvision is None
    if c.gate_bias is None and c.stage in ("sp", "soft") and from_scratch and not c.paper_gate_init:
        # Beyond the paper: gates start open (p = 0.88). With the paper's initialisation SP from scratch closes
        # almost every gate in its first epoch, and a closed block gets no gradient (benchmarks/RESULTS.md).
        c.gate_bias = OPEN_GATE_BIAS
    rl = c.stage in RL_STAGES
    if c.bn is None and c.freeze == "backbone":  # nothing of the backbone learns, its statistics included
        c.bn = "frozen"
    if c.bn is None:
        # Routed RL from a trained network at a fine-tuning lr: BatchNorm statistics frozen, so that training
        # normalises as greedy inference does (updating them from sampled, routed executions drifts them). At a
        # larger lr the weights move too and the updated statistics follow them: measured better (RESULTS.md).
        c.bn = "frozen" if rl and not from_scratch and c.lr <= BN_FREEZE_MAX_LR else "update"
    if c.select is None:  # HRL is reported at what it optimises, not at its least-skipping epoch
        c.select = "reward" if rl else "accuracy"
    return c


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _unit(v) -> bool:
    return 0.0 <= v <= 1.0


def _unit_open(v) -> bool:
    return 0.0 <= v < 1.0


# (option, test, what it must be): every numeric option that has a valid range.
RULES: list[tuple[str, Any, str]] = [
    ("epochs", _positive, "positive"),
    ("iters", _positive, "positive"),
    ("batch_size", lambda v: 0 < v <= MAX_BATCH, f"in [1, {MAX_BATCH}]"),
    ("eval_batch_size", lambda v: 0 < v <= MAX_BATCH, f"in [1, {MAX_BATCH}]"),
    ("lr", _positive, "positive"),
    ("eval_every", _positive, "positive"),
    ("limit_train", _positive, "positive"),
    ("limit_test", _positive, "positive"),
    ("threads", lambda v: 0 < v <= MAX_THREADS, f"in [1, {MAX_THREADS}]"),
    ("image_size", lambda v: 0 < v <= MAX_IMAGE_SIZE, f"in [1, {MAX_IMAGE_SIZE}]"),
    ("log_every", _positive, "positive"),
    ("gate_lr_mult", _positive, "positive"),
    ("alpha", _non_negative, ">= 0"),
    ("beta", _non_negative, ">= 0"),
    ("weight_decay", _non_negative, ">= 0"),
    ("rl_weight", _non_negative, ">= 0"),
    ("warmup_iters", _non_negative, ">= 0"),
    ("workers", lambda v: 0 <= v <= MAX_WORKERS, f"in [0, {MAX_WORKERS}]"),
    ("threshold", _unit, "in [0, 1]"),
    ("distill_weight", _unit, "in [0, 1]"),
    ("distill_temperature", _positive, "positive"),
    ("keep", _unit, "in [0, 1]"),
    ("momentum", _unit_open, "in [0, 1)"),
    ("val_split", _unit_open, "in [0, 1)"),
    ("explore", lambda v: 0.0 <= v < 0.5, "in [0, 0.5)"),
    ("skip_target", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    ("skip_budget", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    ("alpha_lr", _positive, "positive"),
    ("wrong_penalty", lambda v: 0.0 <= v < float("inf"), ">= 0 and finite"),
    ("entropy_bonus", lambda v: 0.0 <= v < float("inf"), ">= 0 and finite"),
    ("batch_shape", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    ("batch_shape_weight", lambda v: 0.0 <= v < float("inf"), ">= 0 and finite"),
    ("batch_shape_floor", lambda v: 0.0 < v < 0.5, "in (0, 0.5)"),
    ("difficulty_spread", lambda v: 0.0 < v <= 0.5, "in (0, 0.5]"),
    ("threshold_jitter", lambda v: 0.0 <= v < 0.5, "in [0, 0.5)"),
    ("gate_bias", lambda v: abs(v) < float("inf"), "finite"),
    ("checkpoint_minutes", _positive, "positive"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
]
