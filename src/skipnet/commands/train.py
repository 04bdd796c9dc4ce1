"""``skipnet train ARCH --stage STAGE --data SPEC --out DIR``: every training stage of the paper."""

from __future__ import annotations

import argparse
import logging
import os

from skipnet.commands._common import add_data_args, add_optim_args
from skipnet.commands._common import check_out as check_out_path
from skipnet.cost import fewer_macs
from skipnet.errors import SkipnetError
from skipnet.fileio import json_text
from skipnet.stages import STAGES
from skipnet.train import TrainConfig, train
from skipnet.trainconfig import BN_MODES, FREEZE, OPEN_GATE_BIAS, REWARDS, SELECT_RULES, SKIP_REWARDS

DOCS = "docs/training.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a stage (base, sp, hrl, soft, rl, sdv)",
        description="Train one stage of SkipNet. Paper defaults apply to every option left unset "
        "(each option's help names its value): CIFAR base/SP 64k iterations, lr 0.1 stepped at 50%/75%; HRL after SP "
        "lr 1e-4 constant for 10k iterations, alpha 0.1, beta 1; ImageNet alpha 0.01, beta alpha/N.",
    )
    p.add_argument("arch", nargs="?", help="architecture name (see 'skipnet models')")
    run_group = _group(p, "the run", "docs/training.md")
    run_group.add_argument("--stage", choices=list(STAGES), help="; ".join(f"{k}: {s.help}" for k, s in STAGES.items()))
    run_group.add_argument("--out", help="run directory (config.json, metrics.jsonl, last.pt, best.pt)")
    _add_start_args(run_group)
    run_group.add_argument("--json", action="store_true", help="print the final summary as JSON")
    data = _group(p, "data", "docs/training.md")
    add_data_args(data)
    d = TrainConfig.defaults()
    data.add_argument(
        "--val-split", type=float, default=d["val_split"], help="fraction of train held out for model selection"
    )
    add_optim_args(_group(p, "optimisation", "docs/training.md"))
    _add_reward_args(_group(p, "SkipNet's reward and gates", "docs/options.md"))
    _add_routing_args(_group(p, "per-image routing, beyond the paper", "docs/routing.md"))
    _add_model_args(_group(p, "the network and its selection", "docs/options.md"))
    _add_runtime_args(_group(p, "the machine and the logs", "docs/scale.md"))
    p.set_defaults(func=run, parser=p)
    for action in p._actions:  # ARCH, --stage, --data and --out may come from --config (checked in run)
        if action.dest == "data":
            action.required = False


# The train options come in groups, each titled with the docs page that explains its options (tests/test_help.py).
def _group(p: argparse.ArgumentParser, title: str, page: str) -> argparse._ArgumentGroup:
    return p.add_argument_group(f"{title} (explained in {page})")


def _add_start_args(p: argparse._ArgumentGroup) -> None:
    """Where a run starts: a config file, another stage's checkpoint, torchvision weights, or its own last.pt."""
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="take every option not given on the command line from FILE (JSON or YAML, option names as keys; a "
        "run's own config.json works as is): 'skipnet train --config runs/x/config.json --out runs/y' repeats run x",
    )
    p.add_argument(
        "--init",
        default=None,
        help="start from another stage's checkpoint (e.g. SP from base, HRL from SP): .pt, .safetensors or "
        "pretrained:NAME",
    )
    p.add_argument("--init-torchvision", default=None, help="ImageNet: start from a torchvision ResNet state-dict file")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt (a new run if it holds no checkpoint yet)",
    )


def _add_reward_args(p: argparse._ArgumentGroup) -> None:
    """What is particular to SkipNet's training: the cost weight, how the gates learn and what they are paid."""
    d = TrainConfig.defaults()
    p.add_argument("--alpha", type=float, default=None, help="HRL cost weight alpha (paper: 0.1 CIFAR, 0.01 ImageNet)")
    p.add_argument(
        "--gate-lr-mult",
        type=float,
        default=d["gate_lr_mult"],
        help="learning-rate multiplier for the gate parameters (paper: 1; short CPU HRL runs: 10-30)",
    )
    p.add_argument(
        "--explore",
        type=float,
        default=d["explore"],
        help="hrl/rl: exploration floor eps, gates sampled from eps + (1 - 2 eps) p (beyond the paper; 0 = paper)",
    )
    p.add_argument(
        "--skip-target",
        type=float,
        default=d["skip_target"],
        metavar="S",
        help="hrl/rl: the skip reward stops growing once a sample skips this fraction of its gated blocks, so the "
        "policy settles near S instead of skipping ever more (beyond the paper; default: no cap, Eq. 5)",
    )
    p.add_argument(
        "--skip-budget",
        type=float,
        default=d["skip_budget"],
        metavar="S",
        help="hrl/rl: adapt alpha during training (dual ascent, from --alpha) so that the gated blocks skipped "
        "average S over the data: easy images may skip more, hard ones less (beyond the paper; an alternative to "
        "--skip-target)",
    )
    p.add_argument(
        "--skip-reward",
        choices=SKIP_REWARDS,
        default=d["skip_reward"],
        help="hrl/rl: who earns the skip reward of Eq. 5: every sample (all, the paper) or only those predicted "
        "right (correct: a wrong image is paid only for lowering its loss; beyond the paper)",
    )
    p.add_argument(
        "--alpha-lr",
        type=float,
        default=d["alpha_lr"],
        help="step size of --skip-budget's alpha update, per step and unit of budget missed (default: 0.01)",
    )


def _add_routing_args(p: argparse._ArgumentGroup) -> None:
    """Beyond the paper, for a policy that depends on the image: the reward, the estimator, which part trains."""
    d = TrainConfig.defaults()
    p.add_argument(
        "--reward",
        choices=REWARDS,
        default=d["reward"],
        help="hrl/rl: what a sampled route earns: hybrid (the paper's Eq. 5-6, -beta CE + alpha x skipped) or "
        "blockdrop (1 - u^2 if the prediction is right, u the executed share of the gated MACs, else "
        "-WRONG_PENALTY; beyond the paper, from BlockDrop)",
    )
    p.add_argument(
        "--wrong-penalty",
        type=float,
        default=d["wrong_penalty"],
        help="--reward blockdrop: gamma, what a wrong prediction earns is -gamma (larger: fewer skips)",
    )
    p.add_argument(
        "--entropy-bonus",
        type=float,
        default=d["entropy_bonus"],
        help="hrl/rl: weight of the gate policies' mean entropy added to the objective, keeping the gates from "
        "saturating (beyond the paper; 0 = off)",
    )
    _add_shape_args(p)
    p.add_argument(
        "--freeze",
        choices=FREEZE,
        default=d["freeze"],
        help="parameters that do not train: backbone (hrl/rl from --init: the policy learns on a fixed network, "
        "BatchNorm frozen too; BlockDrop's first stage), gates (the backbone adapts to fixed gate weights) or policy "
        "(the gates in eval mode: the backbone trains on the routes inference takes, a ConvNet-AIG gate's "
        "BatchNorm statistics fixed too)",
    )
    p.add_argument(
        "--detach-gates",
        action="store_true",
        default=d["detach_gates"],
        help="the gates read their inputs detached: no gradient reaches the backbone through a gate, so it cannot "
        "move its features to open or close blocks (with --freeze gates it learns only the routes it is given; "
        "beyond the paper)",
    )


def _add_shape_args(p: argparse._ArgumentGroup) -> None:
    """Beyond the paper: terms that shape the gates' probabilities across a batch."""
    d = TrainConfig.defaults()
    p.add_argument(
        "--batch-shape",
        type=float,
        default=d["batch_shape"],
        metavar="RATE",
        help="per gate and batch, push the RATE share of the images the gate ranks highest to p = 0.9 and the "
        "others to 0.1 (a static gate cannot satisfy it; beyond the paper, after batch-shaping; default: off)",
    )
    p.add_argument(
        "--batch-shape-floor",
        type=float,
        default=d["batch_shape_floor"],
        metavar="M",
        help="--batch-shape with each gate's own batch-mean rate, clipped to [M, 1 - M]: the reward sets how much a "
        "gate executes, and at least the share M of the images go the other way (beyond the paper; default: off)",
    )
    p.add_argument(
        "--difficulty-spread",
        type=float,
        default=d["difficulty_spread"],
        metavar="S",
        help="pull each image's share of executed blocks towards the batch mean +- S by how hard the --distill "
        "teacher finds it (hardest +S, easiest -S; beyond the paper, docs/routing.md; default: off)",
    )
    p.add_argument(
        "--threshold-jitter",
        type=float,
        default=d["threshold_jitter"],
        metavar="J",
        help="sp: each step thresholds the hard gates at --threshold + U(-J, J) instead of --threshold, so the "
        "network learns the routes of nearby thresholds and one checkpoint serves several budgets (skipnet "
        "calibrate; beyond the paper, docs/routing.md; default: 0, off)",
    )
    p.add_argument(
        "--batch-shape-weight",
        type=float,
        default=d["batch_shape_weight"],
        help="weight of the --batch-shape and --difficulty-spread terms (default: %(default)s)",
    )


def _add_model_args(p: argparse._ArgumentGroup) -> None:
    """How the network starts and is kept: initialisation, BatchNorm under routing, model selection, distillation."""
    d = TrainConfig.defaults()
    p.add_argument(
        "--zero-init-residual",
        action="store_true",
        help="start every residual branch at zero (last BN scale 0; beyond the paper, for short SP-from-scratch runs)",
    )
    p.add_argument(
        "--gate-bias",
        type=float,
        default=None,
        help="initial bias of the gates' output layer: gates start at p = sigmoid(B) (beyond the paper; "
        f"default for sp/soft from scratch: {OPEN_GATE_BIAS:g}, gates open, see --paper-gate-init)",
    )
    p.add_argument(
        "--paper-gate-init",
        action="store_true",
        help="sp/soft from scratch: keep the paper's gate initialisation (its gates close in the first epoch on "
        "short schedules; the default starts them open)",
    )
    p.add_argument(
        "--bn",
        choices=BN_MODES,
        default=None,
        help="BatchNorm in training: update its running statistics, or freeze them (eval mode; scale and shift "
        "still learn). Default: frozen for hrl/rl from --init at --lr up to 1e-3 (routed sampling drifts them away "
        "from greedy inference), update otherwise",
    )
    p.add_argument(
        "--select",
        choices=SELECT_RULES,
        default=None,
        help="how best.pt is chosen on the validation split: accuracy, the mean return HRL maximises "
        "(-beta CE + alpha x fraction skipped, Eq. 6; with --skip-budget: the most accurate evaluation that "
        "meets the budget), or the last evaluation. Default: reward for hrl/rl, accuracy otherwise",
    )
    p.add_argument(
        "--distill",
        default=None,
        metavar="TEACHER",
        help="also match the predictions of a frozen TEACHER (a checkpoint or pretrained:NAME, e.g. the plain "
        "network): the per-sample loss becomes (1 - w) CE + w T^2 KL (beyond the paper)",
    )
    p.add_argument("--distill-weight", type=float, default=d["distill_weight"], help="w, the weight of --distill")
    p.add_argument(
        "--distill-temperature", type=float, default=d["distill_temperature"], help="T, the softmax temperature"
    )
    p.add_argument("--keep", type=float, default=d["keep"], help="SDV keep ratio (stage sdv)")
    p.add_argument(
        "--threshold", type=float, default=d["threshold"], help="greedy gate threshold (a trained --init: its own)"
    )


def _add_runtime_args(p: argparse._ArgumentGroup) -> None:
    """How the run uses the machine, and what it writes besides its checkpoints."""
    d = TrainConfig.defaults()
    p.add_argument(
        "--amp", choices=["none", "bf16", "fp16"], default=d["amp"], help="mixed precision: bf16 (CPU or CUDA), fp16"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the whole training module (routed stages break the graph at each gated block)",
    )
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes")
    p.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep the NCHW memory layout (default: channels-last, NHWC)",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=d["checkpoint_minutes"],
        help="also write last.pt every M minutes of training, between evaluations (a kill loses at most that)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to OUT/tensorboard (needs the tensorboard package); per-step "
        "scalars go to OUT/steps.csv every --log-every steps in any case",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    keys = {f for f in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in keys})


# What a run needs, from the command line or --config: (as named in messages, destination)
REQUIRED = (("ARCH", "arch"), ("--stage", "stage"), ("--data", "data"), ("--out", "out"))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from skipnet.runlog import apply_config, explicit_options

    argv = getattr(args, "command_argv", [])
    given = explicit_options(args.parser, argv)  # what --resume applies or refuses: never ignored
    if args.config:
        apply_config(args, args.parser, argv, args.config)
        given |= set(getattr(args, "from_config", ()))
    missing = [name for name, dest in REQUIRED if getattr(args, dest, None) is None]
    if missing:
        raise SkipnetError(f"the following arguments are required: {', '.join(missing)} (or give them in --config)")
    if args.tensorboard:
        from skipnet.runlog import check_tensorboard

        check_tensorboard()
    check_out_path(args.out)
    cfg = config_from_args(args)
    cfg.validate()
    summary = train(cfg, progress_bar=True, given=given)  # holding the directory's lock
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    if args.json:
        print(json_text(summary))
    elif summary.get("test"):
        t = summary["test"]
        print(
            f"{cfg.out}: test accuracy {t['accuracy']:.2f}%  MACs/image {t['macs_mean']:.4g} "
            f"({fewer_macs(t['macs_reduction'])})  computation percentage {t['computation_percentage']:.1f}%"
        )
    return 0
