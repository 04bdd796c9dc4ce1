"""Per-image routing on CIFAR-10 (issue 31): which mechanism makes SkipNet-38's policy depend on the image, and
at what accuracy, against the static frontier of plain ResNet-20/26/32/38.

    python benchmarks/dynamic_routing.py [--data PATH] [--out runs/dyn] [--only NAME ...] [--no-train]

Every run starts from the shipped plain ResNet-38 (``pretrained:cifar10_resnet_38``, 30 epochs): a policy
stage learns the gates with the backbone frozen (``--freeze backbone``: BlockDrop's first stage), then a joint
stage trains both, distilled from the same plain network. Runs are declared below and run by
:class:`skipnet.experiments.Runner` (resumable; ``--no-train`` only collects). Each row is ``skipnet eval
--json`` on the test split of the run's ``best.pt`` (chosen on the validation split), with its route
statistics; the chosen run is also calibrated on validation to 20, 30, 40 and 50% fewer MACs. The plain
networks' points are the 30-epoch rows of ``benchmarks/results/headline30_cifar10_cpu.json``.

Writes ``benchmarks/results/dynamic_routing.{json,md}`` and ``docs/figures/dynamic_routing.png``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

from skipnet import results
from skipnet.experiments import Run, Runner, select

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FIGURE = REPO / "docs" / "figures" / "dynamic_routing.png"
DEFAULT_DATA = "../shared/data/cifar10-jpeg.tar.gz"
BASE = "pretrained:cifar10_resnet_38"
# the policy on the frozen plain network: gates start open (p = 0.88), sampled with a 5% floor, self-critical
POLICY = ("cifar10_rnn_gate_38", "--stage", "hrl", "--init", BASE, "--freeze", "backbone", "--gate-bias", "2")
POLICY += ("--baseline", "self-critical", "--explore", "0.05", "--lr", "0.05", "--schedule", "cosine", "--threads", "1")
SHAPE = ("--batch-shape", "0.65", "--batch-shape-weight", "20")
# the joint stage: policy and backbone together, distilled from the plain network, the batch-shape term kept
JOINT = (*f"--stage hrl --distill {BASE} --baseline self-critical --explore 0.05".split(), *SHAPE)
JOINT += ("--reward", "hybrid", "--alpha", "1", "--lr", "0.02", "--schedule", "cosine", "--threads", "2")
# the policy on the shipped SkipNet-38's frozen backbone, each gate's own rate with a 10% floor
FLOOR = ("cifar10_rnn_gate_38", "--stage", "hrl", "--init", "pretrained:cifar10_rnn_gate_38", "--freeze", "backbone")
FLOOR += ("--baseline", "self-critical", "--explore", "0.05", "--lr", "0.05", "--schedule", "cosine")
FLOOR += ("--eval-every", "176", "--batch-shape-floor", "0.1", "--batch-shape-weight", "20")
# the joint stage after a floor policy: backbone and policy together, distilled from the plain network
FLOOR_JOINT = ("--stage", "hrl", "--distill", BASE, "--baseline", "self-critical", "--explore", "0.05", "--lr", "0.005")
FLOOR_JOINT += ("--schedule", "cosine", "--eval-every", "176", "--batch-shape-floor", "0.1")
FLOOR_JOINT += ("--batch-shape-weight", "20", "--reward", "hybrid", "--alpha", "2", "--threads", "2")
# ConvNet-AIG's recipe: gates and backbone trained together from the plain network by straight-through hard
# gates (the SP stage), the batch-shape term as each gate's target rate, distilled from the plain network
AIG = ("--stage", "sp", "--init", BASE, "--distill", BASE, *SHAPE, "--lr", "0.02", "--schedule", "cosine")
AIG += ("--eval-every", "176", "--epochs", "2", "--threads", "1")
AIG_MORE = ("--stage", "sp", "--distill", BASE, *SHAPE, "--lr", "0.01", "--schedule", "cosine", "--eval-every", "351")
AIG_MORE += ("--epochs", "3", "--threads", "1")
ORDER_MORE = ("--epochs", "2", "--threads", "1", "--difficulty-spread", "0.3")
FLOOR_ORDER = ("--stage", "sp", "--distill", BASE, "--batch-shape-floor", "0.1", "--batch-shape-weight", "20")
FLOOR_ORDER += ("--difficulty-spread", "0.3", "--lr", "0.005", "--schedule", "cosine", "--eval-every", "176")
FLOOR_ORDER += ("--epochs", "1", "--threads", "2")
FLOOR_ORDER_WIDE = tuple("0.5" if a == "0.3" else a for a in FLOOR_ORDER)  # the widest --difficulty-spread
BUDGETS = (20.0, 30.0, 40.0, 50.0)
# the backbone adapting to a fixed policy (BlockDrop's decoupling reversed): gates frozen, distilled
BACKBONE_ONLY = ("--stage", "sp", "--freeze", "gates", "--distill", BASE, "--lr", "0.01", "--schedule", "cosine")
BACKBONE_ONLY += ("--eval-every", "176", "--epochs", "2", "--threads", "1")
# the same with the policy exactly as inference runs it (a ConvNet-AIG gate's BatchNorm on its running statistics)
POLICY_FIXED = tuple("policy" if a == "gates" else a for a in BACKBONE_ONLY)
# a longer schedule: the backbone on its frozen gates for eight epochs at the joint stages' lr (and the plain
# networks given the same eight, one thread each)
BACKBONE_LONG = ("--stage", "sp", "--freeze", "gates", "--distill", BASE, "--lr", "0.02", "--schedule", "cosine")
BACKBONE_LONG += ("--eval-every", "351", "--epochs", "8", "--threads", "1")
PLAIN_LONG = ("--distill", BASE, "--schedule", "cosine", "--threads", "1", "--lr", "0.02", "--epochs", "8")
# the plain networks' match for a third alternation (one joint epoch at lr 0.005, two backbone epochs at 0.01)
PLAIN_LONG3 = ("--distill", BASE, "--schedule", "cosine", "--threads", "1", "--lr", "0.01", "--epochs", "3")
JITTER = ("--epochs", "2", "--threads", "1", "--threshold-jitter", "0.4")
# a backbone made robust to skipping before any gate is trained (stochastic depth, the SDV stage): each gated
# block dropped per image with probability 0.35 (the rate the gates will be given), distilled from the plain network
SDV_BACKBONE = ("--stage", "sdv", "--keep", "0.65", "--init", BASE, "--distill", BASE, "--lr", "0.02")
SDV_BACKBONE += ("--schedule", "cosine", "--eval-every", "176", "--epochs", "2", "--threads", "1")
# then the gates alone on that frozen backbone: the target rate and the difficulty ordering of the ordered model
GATES_ONLY = ("--stage", "sp", "--freeze", "backbone", "--distill", BASE, *SHAPE, "--difficulty-spread", "0.5")
GATES_ONLY += ("--lr", "0.02", "--schedule", "cosine", "--eval-every", "176", "--epochs", "2", "--threads", "1")
# The matched control (criterion 2): plain ResNet-26, the plain network nearest the SkipNets' cost, on the
# headline's 30-epoch schedule (headline30's base_r26, here in float32: this CPU has no AVX-512 for bf16), then
# the same five extra epochs and teacher as aig_sp_floor_order's chain (2 at lr 0.02, 2 at 0.01, 1 at 0.005,
# cosine, distilled from the plain ResNet-38)
PLAIN26 = ("cifar10_resnet_26", "--stage", "base", "--threads", "2")
PLAIN_SCHEDULE = ("--epochs", "30", "--schedule", "onecycle", "--nesterov", "--weight-decay", "5e-4")
PLAIN_MORE = ("--distill", BASE, "--schedule", "cosine", "--threads", "2")


# the plain ResNet-20 and -32 beside it (one thread each while the suite or another run shares the CPU), for the
# static line between ResNet-20, -26 and -32 at matched training: the same 30 epochs, then the same chain
PLAIN20 = ("cifar10_resnet_20", "--stage", "base")
PLAIN32 = ("cifar10_resnet_32", "--stage", "base")
# the ResNet-26 chain's steps (name suffix, lr, epochs), given to ResNet-20 and -32 too
KD_CHAIN = (
    ("kd2", "0.02", "2"),
    ("kd4", "0.01", "2"),
    ("kd5", "0.005", "1"),
    ("kd6", "0.005", "1"),
    ("kd7", "0.005", "1"),
)


def plain_more(name: str, after: str, lr: str, epochs: str, what: str, net: tuple[str, ...] = PLAIN26) -> Run:
    """A step of the matched plain control: the plain run ``after`` given the SkipNets' distilled epochs. ``after``
    may be a shipped model (``pretrained:NAME``, the run's ``best.pt`` as the zoo holds it): the step then needs no
    run of this machine."""
    shipped = after.startswith("pretrained:")
    init = after if shipped else f"{{runs}}/{after}/best.pt"
    args = (*net, "--init", init, *PLAIN_MORE, "--lr", lr, "--epochs", epochs)
    return Run(name, args, needs=() if shipped else (after,), note=f"{after} given {what}")


def aig_after(name: str, after: str, recipe: tuple[str, ...], note: str, budgets: tuple[float, ...] = ()) -> Run:
    """A SkipNet-38 (ConvNet-AIG gate) run that continues the run ``after`` from its ``best.pt`` with ``recipe``;
    ``after`` may be a shipped model (``pretrained:NAME``), which needs no run of this machine."""
    shipped = after.startswith("pretrained:")
    args = ("cifar10_aig_gate_38", "--init", after if shipped else f"{{runs}}/{after}/best.pt", *recipe)
    return Run(name, args, needs=() if shipped else (after,), budgets=budgets, note=note)


def plain_chain(first: str, net: tuple[str, ...], what: dict[str, str] | None = None, shipped: str = "") -> list[Run]:
    """``first`` (a finished 30-epoch plain run) given the chain of distilled epochs, step by step; ``what`` says
    which SkipNet epochs a step matches (by default, plain_r26's step of that name). With ``shipped`` (the zoo's
    copy of ``first``'s ``best.pt``) the chain starts from it, so it runs where ``first``'s directory is gone."""
    names = [first] + [f"{first}_{step}" for step, _, _ in KD_CHAIN]
    afters = [shipped or first, *names[1:]]
    said = "plain_r26's distilled step {} (--lr {}, --epochs {})"
    return [
        plain_more(n, after, lr, e, (what or {}).get(s) or said.format(s, lr, e), net)
        for n, after, (s, lr, e) in zip(names[1:], afters, KD_CHAIN)
    ]


# finished runs whose best.pt the zoo holds: their row is the zoo copy's where the run's directory is gone
SHIPPED = {"plain_r32": "pretrained:cifar10_resnet_32"}

RUNS = [
    Run(
        "pol_bd1_static",
        (*POLICY, "--reward", "blockdrop", "--wrong-penalty", "1", "--entropy-bonus", "0.01", "--epochs", "4"),
        note="policy, frozen backbone: BlockDrop reward (gamma 1), self-critical, entropy 0.01; stopped after "
        "its first evaluation (epoch 1 of 4)",
    ),
    Run(
        "pol_h1_static",
        (*POLICY, "--reward", "hybrid", "--alpha", "1", "--entropy-bonus", "0.01", "--epochs", "4"),
        note="policy, frozen backbone: hybrid reward (alpha 1), self-critical, entropy 0.01; stopped after its "
        "first evaluation (epoch 1 of 4)",
    ),
    Run(
        "pol_bd1_bs",
        (*POLICY, "--reward", "blockdrop", "--wrong-penalty", "1", *SHAPE, "--epochs", "3"),
        note="policy, frozen backbone: BlockDrop reward (gamma 1), self-critical, --batch-shape 0.65",
    ),
    Run(
        "pol_h1_bs",
        (*POLICY, "--reward", "hybrid", "--alpha", "1", *SHAPE, "--epochs", "3"),
        note="policy, frozen backbone: hybrid reward (alpha 1), self-critical, --batch-shape 0.65",
    ),
    Run(
        "joint_h1_bs",
        ("cifar10_rnn_gate_38", "--init", "{runs}/pol_h1_bs/best.pt", *JOINT, "--epochs", "1", "--eval-every", "176"),
        needs=("pol_h1_bs",),
        note="joint: pol_h1_bs's policy and backbone trained together one epoch, distilled from the plain "
        "ResNet-38, --batch-shape kept",
    ),
    Run(
        "joint_h1_bs_more3",
        ("cifar10_rnn_gate_38", "--init", "{runs}/joint_h1_bs/best.pt", *JOINT, "--epochs", "3"),
        needs=("joint_h1_bs",),
        budgets=BUDGETS,
        note="joint_h1_bs given three more joint epochs (four in all)",
    ),
    Run(
        "pol_hrl38_floor0.1",
        (*FLOOR, "--reward", "hybrid", "--alpha", "2", "--epochs", "2", "--threads", "1"),
        note="policy on the shipped SkipNet-38's frozen backbone (static route): hybrid reward (alpha 2), "
        "self-critical, --batch-shape-floor 0.1 (each gate's own rate, at least 10% of images the other way)",
    ),
    Run(
        "pol_hrl38_floor0.1_bd",
        (*FLOOR, "--reward", "blockdrop", "--wrong-penalty", "1", "--epochs", "1", "--threads", "2"),
        note="as pol_hrl38_floor0.1 with BlockDrop's reward (gamma 1: only right predictions are paid for "
        "skipping), one epoch",
    ),
    Run(
        "pol_hrl38_floor0.1_sc",
        (*FLOOR, "--reward", "hybrid", "--alpha", "2", "--skip-reward", "correct", "--epochs", "2", "--threads", "1"),
        note="as pol_hrl38_floor0.1 with --skip-reward correct (a wrong prediction earns nothing for skipping, "
        "only for lowering its loss)",
    ),
    Run(
        "joint_hrl38_floor0.1",
        ("cifar10_rnn_gate_38", "--init", "{runs}/pol_hrl38_floor0.1/best.pt", *FLOOR_JOINT, "--epochs", "2"),
        needs=("pol_hrl38_floor0.1",),
        note="joint: pol_hrl38_floor0.1's policy and backbone trained together two epochs, distilled from the "
        "plain ResNet-38, the 10% floor kept, lr 0.005 (at lr 0.02 it diverged: loss 6e8 by step 100, 10.8% "
        "validation accuracy at step 176; stopped)",
    ),
    Run(
        "aig_sp_bs",
        ("cifar10_aig_gate_38", *AIG),
        note="ConvNet-AIG's gate (pool, linear, BatchNorm, ReLU, linear), SP stage (straight-through hard gates) "
        "from the plain ResNet-38 with --batch-shape 0.65 as the target rate, distilled, two epochs",
    ),
    aig_after(
        "aig_sp_bs_more3",
        "aig_sp_bs",
        (*AIG_MORE,),
        budgets=BUDGETS,
        note="aig_sp_bs given three more epochs at lr 0.01 (cosine), five in all",
    ),
    Run(
        "aig_sp_order",
        ("cifar10_aig_gate_38", *AIG, "--difficulty-spread", "0.2"),
        note="as aig_sp_bs with --difficulty-spread 0.2: each image's executed share pulled to the batch mean "
        "+- 0.2 by the rank of the plain ResNet-38's loss on it (hard images execute more)",
    ),
    aig_after(
        "aig_sp_order_more2",
        "aig_sp_order",
        (*AIG_MORE[:-4], *ORDER_MORE),
        note="aig_sp_order given two more epochs at lr 0.01 with a wider spread (--difficulty-spread 0.3)",
    ),
    aig_after(
        "aig_sp_floor_order",
        "aig_sp_order_more2",
        (*FLOOR_ORDER,),
        note="aig_sp_order_more2 given one epoch with each gate's own rate (--batch-shape-floor 0.1) instead of the "
        "fixed 0.65, --difficulty-spread 0.3, lr 0.005",
    ),
    aig_after(
        "aig_sp_floor_order_wide",
        "aig_sp_floor_order",
        (*FLOOR_ORDER_WIDE,),
        note="aig_sp_floor_order given one more epoch with the widest spread, --difficulty-spread 0.5 (the "
        "hardest image of a batch pulled to execute every block, the easiest none), lr 0.005: does the "
        "wrong-minus-right gap (+0.80 blocks) grow past one block?",
    ),
    aig_after(
        "aig_sp_floor_order_wide2",
        "aig_sp_floor_order_wide",
        (*FLOOR_ORDER_WIDE,),
        note="aig_sp_floor_order_wide given one more epoch the same way (its gap, +0.98 blocks, was still growing)",
    ),
    aig_after(
        "aig_sp_floor_order_wide3",
        "aig_sp_floor_order_wide2",
        (*FLOOR_ORDER_WIDE,),
        note="aig_sp_floor_order_wide2 given one more epoch the same way (does the saving keep growing at no cost?)",
    ),
    aig_after(
        "aig_ordered_backbone",
        "aig_sp_floor_order_wide2",
        (*BACKBONE_ONLY,),
        budgets=BUDGETS,
        note="decoupling, the other way round: aig_sp_floor_order_wide2 (the shipped per-input model) with its "
        "gates frozen (--freeze gates) and the backbone given two distilled epochs at lr 0.01 to adapt to the "
        "routes: does the 2-3 points the routing costs come back?",
    ),
    aig_after(
        "aig_alt_order",
        "aig_ordered_backbone",
        (*FLOOR_ORDER_WIDE[:-1], "1"),
        note="alternation: aig_ordered_backbone's gates and backbone given one more epoch of "
        "aig_sp_floor_order_wide2's recipe (--difficulty-spread 0.5, each gate's own rate, lr 0.005), one thread",
    ),
    aig_after(
        "aig_alt_backbone",
        "aig_alt_order",
        (*BACKBONE_ONLY,),
        note="alternation: aig_alt_order with its gates frozen again and the backbone given two distilled epochs",
    ),
    aig_after(
        "aig_sp_jitter",
        "aig_sp_bs_more3",
        (*AIG_MORE[:-4], *JITTER),
        budgets=BUDGETS,
        note="aig_sp_bs_more3 given two more epochs at lr 0.01 with --threshold-jitter 0.4: each step's hard gates "
        "thresholded at 0.5 + U(-0.4, 0.4), the range its calibrations to 20-50% chose (0.35-0.91)",
    ),
    Run(
        "aig_sp_bs_more5",
        ("cifar10_aig_gate_38", "--init", "{runs}/aig_sp_bs_more3/best.pt", *AIG_MORE[:-4], *JITTER[:-2]),
        needs=("aig_sp_bs_more3",),
        budgets=BUDGETS[2:],
        note="aig_sp_jitter's control: the same two epochs without --threshold-jitter (calibrated to 40 and 50%, "
        "where the two differ)",
    ),
    aig_after(
        "aig_sp_jitter_wide",
        "aig_sp_bs_more3",
        (*AIG_MORE[:-4], *JITTER[:-1], "0.45"),
        budgets=BUDGETS,
        note="aig_sp_jitter with a wider range, --threshold-jitter 0.45 (0.05-0.95): aig_sp_jitter's calibration "
        "curve falls off past its range's end, 0.9, and the 50% budget needs a threshold of about 0.94",
    ),
    Run("plain_r26", (*PLAIN26, *PLAIN_SCHEDULE), note="plain ResNet-26, the headline's 30-epoch schedule (float32)"),
    Run(
        "plain_r20",
        (*PLAIN20, "--threads", "1", *PLAIN_SCHEDULE),
        note="plain ResNet-20, the same 30 epochs: the static line's low end, to be shipped for continuations",
    ),
    Run(
        "plain_r32",
        (*PLAIN32, "--threads", "1", *PLAIN_SCHEDULE),
        note="plain ResNet-32, the same 30 epochs: the static line between ResNet-26 and -38, to be shipped",
    ),
    *plain_chain(
        "plain_r26",
        PLAIN26,
        {
            "kd2": "aig_sp_order's two distilled epochs (lr 0.02, cosine)",
            "kd4": "aig_sp_order_more2's two distilled epochs (lr 0.01)",
            "kd5": "aig_sp_floor_order's distilled epoch (lr 0.005): the matched control of aig_sp_floor_order "
            "(30 + 5 epochs, the same teacher)",
            "kd6": "aig_sp_floor_order_wide's distilled epoch (lr 0.005)",
            "kd7": "aig_sp_floor_order_wide2's distilled epoch (lr 0.005): the matched control of "
            "aig_sp_floor_order_wide2 (30 + 7 epochs, the same teacher)",
        },
    ),
    *plain_chain("plain_r20", PLAIN20),
    *plain_chain("plain_r32", PLAIN32, shipped=SHIPPED["plain_r32"]),
    Run(
        "aig_scratch",
        ("cifar10_aig_gate_38", "--stage", "sp", *SHAPE, "--threads", "2", *PLAIN_SCHEDULE),
        budgets=BUDGETS,
        note="ConvNet-AIG's own recipe: gates and backbone trained together from scratch by straight-through hard "
        "gates, --batch-shape 0.65 as the target rate, no teacher, on the plain networks' 30-epoch schedule "
        "(matched training against plain_r20/26/32 as they are)",
    ),
    Run(
        "sdv_backbone",
        ("cifar10_aig_gate_38", *SDV_BACKBONE),
        note="decoupling, backbone first: the plain ResNet-38 given two distilled epochs of stochastic depth (each "
        "gated block dropped per image with probability 0.35, --stage sdv --keep 0.65), so that it tolerates "
        "skipping before any gate is trained (row: random routes at keep 0.65)",
    ),
    aig_after(
        "sdv_gates",
        "sdv_backbone",
        (*GATES_ONLY,),
        note="sdv_backbone's backbone frozen, the ConvNet-AIG gates trained alone for two epochs (SP stage, "
        "--batch-shape 0.65, --difficulty-spread 0.5, distilled)",
    ),
    aig_after(
        "sdv_alt_backbone",
        "sdv_gates",
        (*BACKBONE_ONLY,),
        budgets=BUDGETS,
        note="sdv_gates with its gates frozen and the backbone given two distilled epochs to adapt to the routes "
        "(30 + 6 epochs: matched by the plain networks' kd6)",
    ),
    Run(
        "aig_policy_backbone",
        ("cifar10_aig_gate_38", "--init", "pretrained:cifar10_aig_gate_38_ordered", *POLICY_FIXED),
        budgets=BUDGETS,
        note="aig_ordered_backbone with the policy fixed as inference runs it (--freeze policy: the gates' "
        "BatchNorm on its running statistics too), so the saving cannot drift: does the accuracy come back at "
        "the ordered model's 38.7%?",
    ),
    Run(
        "aig_alt2_order",
        ("cifar10_aig_gate_38", "--init", "pretrained:cifar10_aig_gate_38_adapted", *FLOOR_ORDER_WIDE[:-1], "1"),
        note="a second alternation from the shipped adapted model (aig_alt_backbone): one more epoch of the ordering "
        "recipe on gates and backbone, as aig_alt_order",
    ),
    aig_after(
        "aig_alt2_backbone",
        "aig_alt2_order",
        (*BACKBONE_ONLY,),
        budgets=BUDGETS,
        note="aig_alt2_order with its gates frozen and the backbone given two distilled epochs, as aig_alt_backbone "
        "(30 + 15 epochs): does each alternation close more of the gap?",
    ),
    aig_after(
        "aig_alt2_jitter",
        "aig_alt2_backbone",
        (*BACKBONE_ONLY, "--threshold-jitter", "0.45"),
        budgets=BUDGETS,
        note="aig_alt2_backbone's backbone given two more distilled epochs on its frozen gates thresholded at 0.5 + "
        "U(-0.45, 0.45) each step: the routes of every budget's threshold trained, for one checkpoint at 20-50%",
    ),
    aig_after(
        "aig_alt2_long",
        "aig_alt2_backbone",
        (*BACKBONE_LONG,),
        budgets=BUDGETS,
        note="aig_alt2_backbone's backbone given eight more distilled epochs at lr 0.02 on its frozen gates (30 + 23 "
        "epochs): a longer schedule, the lever the two-epoch steps left untried; matched by plain_r32_long",
    ),
    Run(
        "plain_r32_long",
        (*PLAIN32, "--init", "{runs}/plain_r32_kd7/best.pt", *PLAIN_LONG),
        needs=("plain_r32_kd7",),
        note="plain_r32_kd7 given aig_alt2_long's eight distilled epochs (lr 0.02, cosine, the same teacher)",
    ),
    Run(
        "plain_r26_long",
        (*PLAIN26[:-2], "--init", "pretrained:cifar10_resnet_26", *PLAIN_LONG),
        note="the shipped 30-epoch plain ResNet-26 (its kd chain's directories are gone) given aig_alt2_long's eight "
        "distilled epochs: 30 + 8 epochs against the SkipNet's 30 + 23, at the SkipNets' cost",
    ),
    aig_after(
        "aig_alt3_order",
        "aig_alt2_long",
        (*FLOOR_ORDER_WIDE[:-1], "1"),
        note="a third alternation, after the long schedule: one epoch of the ordering recipe on gates and backbone "
        "(as aig_alt2_order), to bring back the saving and the spread that the long backbone stage let drift",
    ),
    aig_after(
        "aig_alt3_backbone",
        "aig_alt3_order",
        (*BACKBONE_ONLY,),
        budgets=BUDGETS,
        note="aig_alt3_order with its gates frozen and the backbone given two distilled epochs, as aig_alt2_backbone "
        "(30 + 26 epochs): does the long schedule's gain survive an alternation at a saving over 30%?",
    ),
    aig_after(
        "aig_alt2_long_detach",
        "aig_alt2_backbone",
        (*BACKBONE_LONG, "--detach-gates"),
        budgets=BUDGETS,
        note="aig_alt2_long with --detach-gates: no gradient from the frozen gates into the backbone, so that it "
        "cannot move its features to open more blocks (is that the saving's drift?); matched by plain_r32_long",
    ),
    aig_after(
        "aig_detach_order",
        "pretrained:cifar10_aig_gate_38_detach",
        (*FLOOR_ORDER_WIDE[:-1], "1"),
        note="a detached alternation from the shipped _detach model (aig_alt2_long_detach): one epoch of the "
        "ordering recipe on gates and backbone, as aig_alt3_order",
    ),
    aig_after(
        "aig_detach_backbone",
        "aig_detach_order",
        (*BACKBONE_ONLY, "--detach-gates"),
        budgets=BUDGETS,
        note="aig_detach_order with its gates frozen and detached, the backbone given two distilled epochs (30 + 26 "
        "epochs, as aig_alt3_backbone): does the alternation's gain add to the detached schedule's saving?",
    ),
    aig_after(
        "aig_detach_jitter",
        "pretrained:cifar10_aig_gate_38_detach",
        (*BACKBONE_ONLY, "--detach-gates", "--threshold-jitter", "0.45"),
        budgets=BUDGETS,
        note="the shipped _detach model's backbone given two distilled epochs on its frozen, detached gates "
        "thresholded at 0.5 + U(-0.45, 0.45) each step (as aig_alt2_jitter): one checkpoint for 20-50%",
    ),
    aig_after(
        "aig_alt2_long_detach_jitter",
        "aig_alt2_backbone",
        (*BACKBONE_LONG, "--detach-gates", "--threshold-jitter", "0.45"),
        budgets=BUDGETS,
        note="aig_alt2_long_detach with threshold jitter (0.5 + U(-0.45, 0.45) each step) through its eight epochs: "
        "the far budgets' routes trained from the start of the long schedule, not after it (aig_detach_jitter)",
    ),
    aig_after(
        "aig_detach_order_jitter",
        "aig_detach_order",
        (*BACKBONE_ONLY, "--detach-gates", "--threshold-jitter", "0.45"),
        budgets=BUDGETS,
        note="item 23's detached alternation with item 24's jitter: aig_detach_order's backbone given two distilled "
        "epochs on its frozen, detached gates thresholded at 0.5 + U(-0.45, 0.45) each step",
    ),
    aig_after(
        "aig_ldj_order",
        "aig_alt2_long_detach_jitter",
        (*FLOOR_ORDER_WIDE[:-1], "1"),
        note="a detached alternation from the jittered long schedule (aig_alt2_long_detach_jitter): one epoch of the "
        "ordering recipe on gates and backbone, as aig_detach_order",
    ),
    aig_after(
        "aig_ldj_backbone",
        "aig_ldj_order",
        (*BACKBONE_ONLY, "--detach-gates", "--threshold-jitter", "0.45"),
        budgets=BUDGETS,
        note="aig_ldj_order's backbone given two distilled epochs on its frozen, detached, jittered gates: the "
        "alternation after the schedule that gave the best 50% budget",
    ),
    aig_after(
        "aig_ldj2_order",
        "aig_ldj_backbone",
        (*FLOOR_ORDER_WIDE[:-1], "1"),
        note="a second detached alternation after the jittered long schedule: one epoch of the ordering recipe from "
        "aig_ldj_backbone (each alternation so far raised the 50% budget)",
    ),
    aig_after(
        "aig_ldj2_backbone",
        "aig_ldj2_order",
        (*BACKBONE_ONLY, "--detach-gates", "--threshold-jitter", "0.45"),
        budgets=BUDGETS,
        note="aig_ldj2_order's backbone given two distilled epochs on its frozen, detached, jittered gates",
    ),
    Run(
        "plain_r20_long",
        (*PLAIN20, "--init", "pretrained:cifar10_resnet_20", *PLAIN_LONG),
        note="the shipped 30-epoch plain ResNet-20 given aig_alt2_long's eight distilled epochs: with plain_r26_long, "
        "the matched line past 34% (aig_alt2_long_detach saves 40%)",
    ),
    Run(
        "plain_r32_long3",
        (*PLAIN32, "--init", "{runs}/plain_r32_long/best.pt", *PLAIN_LONG3),
        needs=("plain_r32_long",),
        note="plain_r32_long given three more distilled epochs (lr 0.01, cosine): aig_alt3's three",
    ),
    Run(
        "plain_r26_long3",
        (*PLAIN26[:-2], "--init", "{runs}/plain_r26_long/best.pt", *PLAIN_LONG3),
        needs=("plain_r26_long",),
        note="plain_r26_long given three more distilled epochs (lr 0.01, cosine): aig_alt3's three",
    ),
    Run(
        "rnn_sp_bs",
        ("cifar10_rnn_gate_38", *AIG),
        note="as aig_sp_bs with the paper's recurrent gate (the gate design's control)",
    ),
]
PLAIN = {"base_r20": "ResNet-20", "base_r26": "ResNet-26", "base_r32": "ResNet-32", "base": "ResNet-38"}


NAMES = [r.name for r in RUNS]
# the runs whose calibrated budgets the figure draws as curves: where threshold jitter began and the first jittered
# model, the shipped _long and _detach models, the detached alternation and the detached, jittered model (_budgets)
CURVES = ("aig_sp_bs_more3", "aig_alt3_backbone", "aig_alt2_long_detach", "aig_detach_backbone", "aig_detach_jitter")
CURVES += ("aig_ldj2_backbone",)


def plain_points(results: Path) -> dict[str, dict]:
    """The plain networks' 30-epoch test rows (headline30)."""
    runs = json.loads((results / "headline30_cifar10_cpu.json").read_text())["runs"]
    got = {r["name"]: r for r in runs if r["name"] in PLAIN}
    return {PLAIN[n]: {k: got[n][k] for k in ("accuracy", "macs_reduction", "macs")} for n in PLAIN}


def frontier(plain: dict[str, dict], reduction: float) -> float:
    """The straight line between the plain ResNet-20/26/32/38 points at ``reduction`` (``nan`` beyond ResNet-20's
    saving: no plain point to interpolate)."""
    return results.frontier([(p["macs_reduction"], p["accuracy"]) for p in plain.values()], reduction)


def table(rows: dict[str, dict], plain: dict[str, dict]) -> str:
    head = "| run | test accuracy | MACs saved | frontier there | routes | top route | std | wrong - right |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ro = r["routes"]
        gap = (ro["executed_mean_wrong"] or 0.0) - (ro["executed_mean_correct"] or 0.0)
        front = frontier(plain, r["macs_reduction"])
        lines.append(
            f"| `{name}` | {r['accuracy']:.2f}% | {r['macs_reduction']:.1f}% | {front:.2f}% | {ro['distinct_routes']} "
            f"| {100 * ro['top_route_share']:.1f}% | {ro['executed_std']:.2f} | {gap:+.2f} |"
        )
    return "\n".join(lines)


ZOOM = ((15.0, 45.0), (84.0, 88.6))  # the right panel: the 20-40% budgets beside the static line (criterion 3)


def plot(rows: dict[str, dict], plain: dict[str, dict], path: Path) -> None:
    """Accuracy against MACs saved: the whole range, and beside it the 20-40% budgets near the plain networks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax in (whole, zoom):
        _draw(ax, rows, plain)
        ax.set_xlabel("MACs saved vs ResNet-38 (%)")
        ax.grid(alpha=0.3)
    whole.set_ylabel("CIFAR-10 test accuracy (%)")
    whole.legend(fontsize=7, loc="lower left")
    zoom.set_xlim(*ZOOM[0])
    zoom.set_ylim(*ZOOM[1])
    zoom.set_title("the same, 15-45% fewer MACs", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _draw(ax, rows: dict[str, dict], plain: dict[str, dict]) -> None:
    """The plain networks (30 epochs, and given the SkipNets' extra epochs) and the calibrated CURVES on ``ax``."""
    xs = [p["macs_reduction"] for p in plain.values()]
    ax.plot(xs, [p["accuracy"] for p in plain.values()], "o--", color="gray", label="plain ResNet-20/26/32/38")
    for label, p in plain.items():
        ax.annotate(label, (p["macs_reduction"], p["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    matched = [r for n, r in rows.items() if n.startswith("plain_r26_kd")]  # the extra epochs so far
    for k, r in enumerate(matched):  # one cost: the points stack
        label = "ResNet-26, matched training (2-7 extra epochs)" if k == 0 else "_nolegend_"
        ax.plot(r["macs_reduction"], r["accuracy"], "D", color="black", label=label)
    long3 = sorted((r["macs_reduction"], r["accuracy"]) for n, r in rows.items() if n.endswith("_long3"))
    if long3:  # the plain ResNet-32 and -26 given aig_alt3_backbone's 30 + 11 epochs
        ax.plot(*zip(*long3), "v:", color="black", label="ResNet-32/26, 30 + 11 epochs (matched to aig_alt3)")
    for k, run in enumerate(CURVES):
        curve = sorted((r["macs_reduction"], r["accuracy"]) for n, r in rows.items() if n.split("@")[0] == run)
        if curve:
            ax.plot(*zip(*curve), "s-", color=f"C{k}", label=f"SkipNet-38 {run}, calibrated")


def collect(runner: Runner, path: Path, plain_macs: float) -> dict[str, dict]:
    """Rows of every declared run here (and its budgets), the recorded rows of the others, in declaration order.
    A plain control is a row once finished, its saving counted against the plain ResNet-38's ``plain_macs``."""
    here = {name: {"name": name} | row for name, row in runner.rows(RUNS).items()}
    here = {n: r for n, r in here.items() if not (n.startswith("plain_") and not r["finished"])}
    rows = results.recorded(path)
    for name, model in SHIPPED.items():  # a finished run whose directory is gone: its zoo copy, evaluated once
        if name not in rows and name not in here:
            note = next(r.note for r in RUNS if r.name == name)
            here[name] = {"name": name} | runner.evaluate_once(model) | {"note": note, "finished": True}
    for r in here.values():
        r["checkpoint"] = results.portable(r["checkpoint"], REPO)  # a run started elsewhere records its full path
        if r["name"].startswith("plain_"):
            r["macs_reduction"] = round(100 * (1 - r["macs_mean"] / plain_macs), 2)
    rows |= here
    names = sorted((n for n in rows if n.split("@")[0] in NAMES), key=_declared)
    return {n: {k: v for k, v in rows[n].items() if k != "name"} for n in names}


def _declared(name: str) -> tuple[int, float]:
    """Rows in declaration order, a run's own row before its budgets, the budgets from the smallest."""
    run, _, budget = name.partition("@")
    return NAMES.index(run), float(budget.rstrip("%")) if budget else -1.0


def main(argv: list[str] | None = None) -> int:
    p = results.group_parser(__doc__, "runs/dyn", DEFAULT_DATA, RESULTS)
    p.add_argument("--figure", default=str(FIGURE), help="where the accuracy/MACs figure is written")
    p.add_argument("--parallel", type=int, default=1, help="train up to this many runs at once (default 1)")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel must be at least 1, not {args.parallel}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out_dir = Path(args.results)
    runner = Runner(Path(args.out), args.data)
    if not args.no_train:
        runner.train(RUNS if args.only is None else select(RUNS, args.only), parallel=args.parallel)
    plain = plain_points(out_dir)
    rows = collect(runner, out_dir / "dynamic_routing.json", plain["ResNet-38"]["macs"])
    out = {
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/dynamic_routing.py --data " + args.data,
        "plain": plain,
        "commands": {r.name: " ".join(runner.command(r)) for r in RUNS},
        "runs": [{"name": name} | row for name, row in rows.items()],
    }
    (out_dir / "dynamic_routing.json").write_text(json.dumps(out, indent=1) + "\n")
    (out_dir / "dynamic_routing.md").write_text(table(rows, plain) + "\n")
    plot(rows, plain, Path(args.figure))
    print(table(rows, plain))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
