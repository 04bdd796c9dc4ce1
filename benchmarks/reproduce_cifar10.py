"""Reproduce the paper's CIFAR-10 claims at CPU scale (or on the paper's schedule), resumably.

    python benchmarks/reproduce_cifar10.py --scale cpu [--data PATH] [--out DIR] [--only NAME ...] [--no-train]

Every experiment is a normal ``skipnet train`` run in its own run directory under ``--out``, declared as a
:class:`skipnet.experiments.Run` and run by :class:`skipnet.experiments.Runner`: one at a time, each after the run
it starts from (``--init``), resuming a killed run from its ``last.pt`` and skipping finished ones (there is no
``--jobs`` option any more: the runner trains sequentially). ``--only`` trains the named runs and the runs they
need. Test accuracy is read from each run's ``summary.json``: the test split evaluated once, on the checkpoint
chosen on the validation split. Each SkipNet-38 HRL run is also calibrated by the runner to the scale's budget
(``best.pt`` -> ``budget30.pt``, on the validation split; its test evaluation cached): the row ``NAME_cal30``.
What a row's tables, verdicts and figure need to know of its run (group, schedule length, starting point, gates
starting open, ...) is declared beside the run as a :class:`Setting`, never read back from its name. Writes
``benchmarks/results/reproduce_cifar10_<scale>.{json,md,png}`` and prints the tables.

Experiments (SkipNet-38, recurrent gate, unless stated):
  1. plain ResNet-38                         4. ablation (ResNet-20 at CPU scale): HRL+SP vs HRL from
  2. SP, SP + HRL at alpha 0.05/0.1/0.2,        scratch vs pure RL from scratch, same total steps
     SP + HRL with FFGate-I                  5. SDV at keep ratios around SkipNet's
  3. hard (SP) vs soft gating                6. real time: skipnet bench at batch 1 and 64
  7. (cpu) the plain network and SP from scratch (gates starting open) + HRL on a schedule twice as long:
     how the headline's gap moves with training length
Beyond the paper (group 2, cpu): HRL with an exploration floor; SP from scratch with the gates starting open
(``--gate-bias 2``) and HRL from it at five alphas and, longer and slower, at two.
Every SkipNet is held against the plain network trained on its own schedule. Beyond the paper, each plain
ResNet-38 also gets a static lesion curve (``skipnet.analysis.static_lesion``): the accuracy left after removing
the k least useful blocks for every image alike, the bar a per-image policy has to clear.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from skipnet.experiments import Run, RunFailed, Runner, select
from skipnet.results import (
    command_line,
    fmt,
    group_parser,
    lesion,
    lesion_table,
    option,
    pick_headline,
    test_fields,
    with_recorded,
    write_json,
)
from skipnet.results import portable as results_portable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
RESULTS = REPO / "benchmarks" / "results"
R38, RNN38, FF38 = "cifar10_resnet_38", "cifar10_rnn_gate_38", "cifar10_feedforward_38"


def portable(cmd: list[str] | str) -> str:
    """A command line as recorded in results (:func:`skipnet.results.portable`)."""
    return results_portable(cmd, REPO)


# Per scale: the options of each kind of run. "cpu" fits a 2-core machine in about two hours of compute.
SCALES = {
    "cpu": {
        "base": ["--epochs", "6", "--schedule", "onecycle", "--nesterov", "--weight-decay", "5e-4"],
        "sp": ["--epochs", "2", "--schedule", "onecycle", "--lr", "0.05", "--nesterov", "--weight-decay", "5e-4"],
        "hrl": ["--epochs", "1", "--lr", "0.003", "--schedule", "constant", "--baseline", "ema"],
        "sdv": ["--epochs", "1.5", "--schedule", "onecycle", "--lr", "0.05", "--nesterov", "--weight-decay", "5e-4"],
        # ablation at ResNet-20 on a 15k-image subset, equal total steps for the three algorithms
        "abl_arch": "20",
        "abl_limit": ["--limit-train", "15000"],
        "abl_base": ["--epochs", "3", "--schedule", "onecycle", "--nesterov", "--weight-decay", "5e-4"],
        "abl_sp": ["--epochs", "1", "--schedule", "onecycle", "--lr", "0.05", "--nesterov", "--weight-decay", "5e-4"],
        "abl_hrl": ["--epochs", "1", "--lr", "0.003", "--schedule", "constant", "--baseline", "ema"],
        "abl_scratch": [
            "--epochs",
            "5",
            "--schedule",
            "onecycle",
            "--nesterov",
            "--weight-decay",
            "5e-4",
            "--baseline",
            "ema",
        ],
        "common": ["--batch-size", "128", "--val-split", "0.1", "--threads", "1"],
        "alphas": [0.05, 0.1, 0.2, 1.0, 3.0],
        "scratch_alphas": [0.05, 0.1, 0.2, 0.5],
        "ff_alpha": 1.0,
        "sdv_keeps": [0.5, 0.8],
        "sdv_scratch_keep": 0.67,
        # beyond the paper: HRL from SP-from-base with an exploration floor (--explore)
        "explore": 0.1,
        "explore_alphas": [1.0, 2.0],
        "hrl_explore": ["--epochs", "2", "--lr", "0.003", "--schedule", "constant", "--baseline", "ema"],
        "calibrate": 30,
        # beyond the paper: SP from scratch with the gates starting open (--gate-bias), then HRL
        "gate_bias": 2.0,
        "gate_bias_alphas": [0.5, 1.0, 1.5, 2.0, 3.0],
        # a longer, slower HRL from the same SP (closer to the paper's 10k iterations at lr 1e-4)
        "hrl_long": ["--epochs", "3", "--lr", "0.001", "--schedule", "constant", "--baseline", "ema"],
        "hrl_long_alphas": [1.25, 1.5],
        # the headline's gap against schedule length: base and SP from scratch at twice the base schedule
        "long": ["--epochs", "12", "--schedule", "onecycle", "--nesterov", "--weight-decay", "5e-4"],
        "long_alphas": [1.0, 1.25, 1.5, 2.0],
    },
    "paper": {  # the paper's schedule (a machine with a GPU): 64k SP iterations, 10k HRL at lr 1e-4
        "base": [],
        "sp": [],
        "hrl": [],
        "sdv": [],
        "abl_arch": "38",
        "abl_limit": [],
        "abl_base": [],
        "abl_sp": [],
        "abl_hrl": [],
        "abl_scratch": ["--iters", "80000"],
        "common": ["--batch-size", "128", "--val-split", "0.1"],
        "alphas": [0.05, 0.1, 0.2],
        "scratch_alphas": [0.05, 0.1, 0.2],
        "ff_alpha": 0.1,
        "sdv_keeps": [0.5, 0.7],
        "sdv_scratch_keep": 0.7,
        "explore": 0.1,
        "explore_alphas": [0.2, 0.5],
        "hrl_explore": [],
        "calibrate": 30,
        "gate_bias": None,
        "gate_bias_alphas": [],
        "hrl_long": [],
        "hrl_long_alphas": [],
        "long": None,  # the paper's schedule is already the long one
        "long_alphas": [],
    },
}


class Setting(NamedTuple):
    """What the tables, verdicts and figure need to know of a row, declared with its run (never parsed back out
    of its name). (Not a dataclass: the tests load this script without registering it as a module.)"""

    group: str
    arch: str
    stage: str
    alpha: float | None = None
    keep: float | None = None
    base: str = "base_r38"  # the plain network trained on the same schedule, which the row is held against
    epochs: str | None = None  # the schedule's length in epochs, where it is not the base schedule (group 7)
    scratch: bool = False  # trained from scratch, not from the plain network's weights (for HRL: its SP was)
    open_gates: bool = False  # SP from scratch with the gates starting open (--gate-bias), or HRL from it
    explore: bool = False  # HRL with an exploration floor (--explore)
    ff: bool = False  # the feed-forward gate (FFGate-I)
    candidate: bool = False  # a SkipNet-38 (recurrent gate) HRL run: calibrated, and a headline candidate
    of: str | None = None  # a calibrated row: the run it calibrates, to ``budget`` % fewer MACs
    budget: float | None = None


def cal_name(name: str, budget: float) -> str:
    """The row of run ``name`` calibrated to ``budget`` % fewer MACs."""
    return f"{name}_cal{int(budget)}"


class Plan:
    """The runs of one scale and the :class:`Setting` of each row they make (their calibrated rows included)."""

    def __init__(self, s: dict) -> None:
        self.s = s
        self.runs: list[Run] = []
        self.settings: dict[str, Setting] = {}

    def add(self, name: str, setting: Setting, args: list[str], init: str | None = None) -> None:
        """Run ``name``: ``skipnet train`` of the setting's arch and stage with ``args``, from ``init``'s
        ``best.pt`` if given; a candidate is calibrated to the scale's budget."""
        start = ["--init", f"{{runs}}/{init}/best.pt"] if init else []
        cmd = (setting.arch, "--stage", setting.stage, *self.s["common"], *args, *start)
        budgets = (float(self.s["calibrate"]),) if setting.candidate else ()
        self.runs.append(Run(name, cmd, needs=(init,) if init else (), budgets=budgets))
        self.settings[name] = setting
        for b in budgets:
            self.settings[cal_name(name, b)] = setting._replace(stage="hrl+cal", of=name, budget=b)

    def run(self, name: str) -> Run:
        return next(r for r in self.runs if r.name == name)

    def of(self, r: dict) -> Setting:
        """The setting of row ``r`` (a recorded row of a run no longer declared: its recorded fields only)."""
        found = self.settings.get(r["name"])
        return found or Setting(r["group"], r["arch"], r["stage"], alpha=r.get("alpha"), keep=r.get("keep"))


def hrl38(group: str, alpha: float, **fields) -> Setting:
    """A SkipNet-38 (recurrent gate) HRL run."""
    return Setting(group, RNN38, "hrl", alpha=alpha, candidate=True, **fields)


def declare_from_base(p: Plan) -> None:
    """Group 1 and group 2's SP and HRL from the plain network's weights."""
    s = p.s
    p.add("base_r38", Setting("1", R38, "base"), s["base"])
    p.add("sp_r38_rnn", Setting("2", RNN38, "sp"), s["sp"], "base_r38")
    for a in s["alphas"]:
        p.add(f"hrl_r38_rnn_a{a}", hrl38("2", a), [*s["hrl"], "--alpha", str(a)], "sp_r38_rnn")
    # Beyond the paper: the same HRL with an exploration floor, gates drawn from eps + (1 - 2 eps) p, so that every
    # block keeps being skipped in training (the backbone learns to do without it) and REINFORCE keeps seeing skips.
    eps = s["explore"]
    for a in s["explore_alphas"]:
        args = [*s["hrl_explore"], "--alpha", str(a), "--explore", str(eps)]
        p.add(f"hrl_r38_rnn_x{eps}_a{a}", hrl38("2", a, explore=True), args, "sp_r38_rnn")


def declare_scratch(p: Plan) -> None:
    """Group 2's SP from scratch and HRL from it."""
    s = p.s
    # The authors' recipe: SP from scratch on the base schedule (the backbone learns with blocks skipped and the
    # gates become block-specific), then HRL. SP from the base weights (above) leaves one undiscriminating gate
    # probability above 0.5, and HRL then pushes every gate to "execute": skips cost more CE than alpha repays.
    p.add("sp_r38_rnn_scratch", Setting("2", RNN38, "sp", scratch=True), s["base"])
    for a in s["scratch_alphas"]:
        hrl = [*s["hrl"], "--alpha", str(a)]
        p.add(f"hrl_r38_rnn_scratch_a{a}", hrl38("2", a, scratch=True), hrl, "sp_r38_rnn_scratch")
    # Beyond the paper: the same SP from scratch with every gate starting open (p = sigmoid(2) = 0.88), so the
    # blocks train from the first step instead of waiting for their gates to reopen (SP from scratch with the
    # default init skips ~93% of the blocks after its first epoch), then HRL at larger alphas.
    if s["gate_bias"] is None:
        return
    gb = f"gb{s['gate_bias']:g}"
    sp = f"sp_r38_rnn_scratch_{gb}"
    opened = Setting("2", RNN38, "sp", scratch=True, open_gates=True)
    p.add(sp, opened, [*s["base"], "--gate-bias", str(s["gate_bias"])])
    for a in s["gate_bias_alphas"]:
        hrl = [*s["hrl"], "--alpha", str(a)]
        p.add(f"hrl_r38_rnn_scratch_{gb}_a{a}", hrl38("2", a, scratch=True, open_gates=True), hrl, sp)
    for a in s["hrl_long_alphas"]:
        hrl = [*s["hrl_long"], "--alpha", str(a)]
        p.add(f"hrl_r38_rnn_scratch_{gb}_long_a{a}", hrl38("2", a, scratch=True, open_gates=True), hrl, sp)


def declare_others(p: Plan) -> None:
    """Group 2's FFGate-I runs, group 3 (soft gating) and group 4 (the algorithm ablation)."""
    s, d = p.s, p.s["abl_arch"]
    a = s["ff_alpha"]
    p.add("sp_r38_ff", Setting("2", FF38, "sp", ff=True), s["sp"], "base_r38")
    p.add(f"hrl_r38_ff_a{a}", Setting("2", FF38, "hrl", alpha=a, ff=True), [*s["hrl"], "--alpha", str(a)], "sp_r38_ff")
    p.add("soft_r38_rnn", Setting("3", RNN38, "soft"), s["sp"], "base_r38")
    gated, lim = f"cifar10_rnn_gate_{d}", s["abl_limit"]
    p.add(f"abl_base_r{d}", Setting("4", f"cifar10_resnet_{d}", "base"), [*s["abl_base"], *lim])
    p.add(f"abl_sp_r{d}", Setting("4", gated, "sp"), [*s["abl_sp"], *lim], f"abl_base_r{d}")
    hrl = [*s["abl_hrl"], *lim, "--alpha", "0.1"]
    p.add(f"abl_hrl_sp_r{d}", Setting("4", gated, "hrl", alpha=0.1), hrl, f"abl_sp_r{d}")
    scratch = [*s["abl_scratch"], *lim, "--alpha", "0.1"]
    p.add(f"abl_hrl_scratch_r{d}", Setting("4", gated, "hrl", alpha=0.1, scratch=True), scratch)
    p.add(f"abl_rl_scratch_r{d}", Setting("4", gated, "rl", alpha=0.1, scratch=True), scratch)


def declare_sdv(p: Plan) -> None:
    """Group 5: SDV from scratch, and fine-tuned from the plain network."""
    s = p.s
    # SDV from scratch on the base schedule, at the keep ratio of the SP-from-scratch HRL models: the same starting
    # point as SkipNet's authors' recipe (the SDV runs below fine-tune the trained plain network instead).
    k = s["sdv_scratch_keep"]
    p.add(f"sdv_r38_scratch_k{k}", Setting("5", R38, "sdv", keep=k, scratch=True), [*s["base"], "--keep", str(k)])
    for k in s["sdv_keeps"]:
        p.add(f"sdv_r38_k{k}", Setting("5", R38, "sdv", keep=k), [*s["sdv"], "--keep", str(k)], "base_r38")


def declare_long(p: Plan) -> None:
    """Group 7, the headline's gap against schedule length: the plain network and the best recipe above (SP from
    scratch with the gates starting open, then HRL) on a schedule twice the base one, each held against the
    other."""
    s = p.s
    if not s["long"]:
        return
    e, gb = option(s["long"], "--epochs"), f"gb{s['gate_bias']:g}"
    sched = {"base": f"base_r38_e{e}", "epochs": e}
    p.add(f"base_r38_e{e}", Setting("7", R38, "base", **sched), s["long"])
    sp, opened = f"sp_r38_rnn_scratch_{gb}_e{e}", {"scratch": True, "open_gates": True, **sched}
    p.add(sp, Setting("7", RNN38, "sp", **opened), [*s["long"], "--gate-bias", str(s["gate_bias"])])
    for a in s["long_alphas"]:
        p.add(f"hrl_r38_rnn_scratch_{gb}_e{e}_a{a}", hrl38("7", a, **opened), [*s["hrl"], "--alpha", str(a)], sp)


def declare(scale: str) -> Plan:
    """Every run of ``scale``, in the order of the results."""
    p = Plan(SCALES[scale])
    for group in (declare_from_base, declare_scratch, declare_others, declare_sdv, declare_long):
        group(p)
    return p


def bench(ckpt: Path, batch: int, out: Path, data: str, keep: float | None = None) -> dict | None:
    """``skipnet bench`` of a checkpoint on the first ``batch`` test images (the learned gates decide as in use);
    ``keep`` forces decisions (needed for a plain ResNet, which has no gates)."""
    cache = out / f"{ckpt.parent.name}.{ckpt.stem}.bench{batch}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    cmd = ["skipnet", "bench", str(ckpt), "--batch-size", str(batch), "--threads", "1", "--json", "--data", data]
    cmd += ["--keep", str(keep)] if keep is not None else []
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        print(f"[fail] bench {ckpt} b{batch}: {res.stderr.strip()[-300:]}", flush=True)
        return None
    d = json.loads(res.stdout.strip().splitlines()[-1])
    cache.write_text(json.dumps(d))
    return d


def row(name: str, st: Setting, command: str, summary: dict | None) -> dict:
    """The results row of run ``name`` (its test figures from the run's ``summary.json``, if finished)."""
    d = {"name": name, "group": st.group, "arch": st.arch, "stage": st.stage, "command": command}
    d |= {k: v for k, v in (("alpha", st.alpha), ("keep", st.keep)) if v is not None}
    if summary:
        d |= test_fields(summary["test"]) | {
            "train_time_s": summary.get("train_time_s"),
            "best_val_accuracy": summary.get("best_val_accuracy"),
            "steps": summary.get("steps"),
        }
    return d


def table(rows: list[dict], with_speed: bool = False) -> str:
    head = "| run | arch | stage | test acc % | MACs/img | MACs red. % | CP % |"
    sep = "|---|---|---|---|---|---|---|"
    if with_speed:
        head += " speed-up b1 | speed-up b64 |"
        sep += "---|---|"
    head += " train time |"
    sep += "---|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['name']} | {r['arch']} | {r['stage']} | {fmt(r.get('accuracy'))} | {fmt(r.get('macs'), '.3g')} | "
            f"{fmt(r.get('macs_reduction'), '.1f')} | {fmt(r.get('computation_percentage'), '.1f')} |"
        )
        if with_speed:
            line += f" {fmt(r.get('speedup_b1'), '.2f')} | {fmt(r.get('speedup_b64'), '.2f')} |"
        t = r.get("train_time_s")
        line += f" {fmt(t / 60 if t else None, '.0f')} min |"
        lines.append(line)
    return "\n".join(lines)


def pairs(rows: dict[str, dict], picks: list[dict], plan: Plan) -> list[tuple[dict, dict]]:
    """Each of ``picks`` with the row of the plain network trained on its own schedule (where there is one)."""
    bases = [rows.get(plan.of(r).base, {}) for r in picks]
    return [(r, b) for r, b in zip(picks, bases) if b.get("accuracy")]


def hrl_rows(rows: dict[str, dict], plan: Plan) -> list[dict]:
    """The SkipNet-38 (recurrent gate) HRL rows with a test accuracy: the headline's candidates."""
    return [r for r in rows.values() if plan.of(r).candidate and r["stage"] == "hrl" and r.get("accuracy") is not None]


def headline_claims(rows: dict[str, dict], plan: Plan) -> tuple[dict, list[str]]:
    """The headline (each SkipNet against the plain network on its own schedule), without and with the compute
    knob."""
    out, headline = [], {}
    h = pick_headline(pairs(rows, hrl_rows(rows, plan), plan))
    if h:
        best, b, ok = h
        headline = {
            "base_accuracy": b["accuracy"],
            "skipnet_accuracy": best["accuracy"],
            "macs_reduction": best["macs_reduction"],
            "alpha": best.get("alpha"),
            "run": best["name"],
            "base_run": b["name"],
            "reproduced": ok,
        }
        out.append(
            f"- **Headline** ({'Reproduced' if ok else 'Not reproduced'}): SkipNet-38 + SP + HRL at α = "
            f"{best.get('alpha')} (`{best['name']}`) reaches {best['accuracy']:.2f}% at {best['macs_reduction']:.1f}% "
            f"fewer MACs vs the plain ResNet-38 on the same schedule (`{b['name']}`) {b['accuracy']:.2f}% (target: "
            "≥ 30% fewer MACs within 0.5 points)."
        )
    h = pick_headline(pairs(rows, [r for r in rows.values() if r["stage"] == "hrl+cal"], plan))
    if h:
        best, b, ok = h
        out.append(
            f"- **Headline with the compute knob** ({'Reproduced' if ok else 'Not reproduced'}): SkipNet-38 + SP + "
            f"HRL (α = {best.get('alpha')}, `{best['name']}`) with its gate threshold calibrated on the validation "
            f"split to a 30% budget: {best['accuracy']:.2f}% at {best['macs_reduction']:.1f}% fewer MACs on the test "
            f"split (threshold {best.get('threshold'):.3g}) vs `{b['name']}` {b['accuracy']:.2f}%."
        )
    return headline, out


def gating_claims(rows: dict[str, dict], plan: Plan) -> list[str]:
    """Hard vs soft gating (Table 3) and the algorithm ablation (Fig. 10b)."""
    out = []
    sp, soft = rows.get("sp_r38_rnn", {}), rows.get("soft_r38_rnn", {})
    if sp.get("accuracy") is not None and soft.get("accuracy") is not None:
        gap = sp["accuracy"] - soft["accuracy"]
        word = "Reproduced" if gap > 5 else ("Partly" if gap > 0 else "Not reproduced")
        out.append(
            f"- **Hard vs soft gating** ({word}): hard (SP) {sp['accuracy']:.2f}% at {sp['macs']:.3g} MACs vs "
            f"soft {soft['accuracy']:.2f}% at {soft['macs']:.3g} MACs, both with 0.5-threshold decisions."
        )
    abl = [r for r in rows.values() if plan.of(r).group == "4" and r.get("accuracy") is not None]
    hsp = next((r for r in abl if r["stage"] == "hrl" and not plan.of(r).scratch), None)
    hsc = next((r for r in abl if r["stage"] == "hrl" and plan.of(r).scratch), None)
    rl = next((r for r in abl if r["stage"] == "rl"), None)
    if rl:
        word = "Reproduced" if rl["accuracy"] < 20 else "Not reproduced"
        out.append(f"- **Pure RL stays near chance** ({word}): {rl['accuracy']:.2f}% (chance 10%).")
    if hsp and hsc:
        word = "Reproduced" if hsp["accuracy"] > hsc["accuracy"] else "Not reproduced"
        out.append(
            f"- **HRL + SP beats HRL from scratch** ({word}): {hsp['accuracy']:.2f}% at "
            f"{hsp['macs_reduction']:.1f}% fewer MACs vs {hsc['accuracy']:.2f}% at {hsc['macs_reduction']:.1f}%."
        )
    return out


def sdv_claims(rows: dict[str, dict], plan: Plan) -> list[str]:
    """SkipNet against SDV at matched MACs (Fig. 6): each SDV row with the base schedule's SkipNet-38 HRL row
    closest in MACs (SDV from scratch only with SkipNet from scratch: SP from scratch + HRL)."""
    hrl = [r for r in hrl_rows(rows, plan) if plan.of(r).base == "base_r38"]  # the base schedule's
    sdv = [r for r in rows.values() if r["stage"] == "sdv" and r.get("accuracy") is not None]
    if not (sdv and hrl):
        return []
    found = []
    for s_ in sdv:
        pool = [h for h in hrl if plan.of(h).scratch] if plan.of(s_).scratch else hrl
        found.append((s_, min(pool or hrl, key=lambda h: abs(h["macs"] - s_["macs"]))))
    wins = sum(h["accuracy"] > s_["accuracy"] for s_, h in found)
    word = "Reproduced" if wins == len(found) else ("Partly" if wins else "Not reproduced")
    detail = "; ".join(
        f"SDV{' from scratch' if plan.of(s_).scratch else ''} keep {s_.get('keep')} {s_['accuracy']:.2f}% "
        f"at {s_['macs']:.3g} MACs vs "
        f"{h['name']} {h['accuracy']:.2f}% at {h['macs']:.3g}"
        for s_, h in found
    )
    return [f"- **SkipNet beats SDV at matched MACs** ({word}): {detail}."]


def speed_claims(rows: dict[str, dict]) -> list[str]:
    """Measured speed-up against the MACs reduction, for every skipping model (those the bench did not time are
    named, not dropped)."""
    skipping = [
        r for r in rows.values() if r["stage"] in ("hrl", "hrl+cal", "rl") and (r.get("macs_reduction") or 0) > 5
    ]
    sp_rows = [r for r in skipping if r.get("speedup_b64")]
    untimed = [r["name"] for r in skipping if not r.get("speedup_b64")]
    if not sp_rows:
        return []
    parts, passed = [], 0
    for r in sp_rows:
        # the bench's own MACs ratio, on the images it timed (the first 64 test images)
        ideal = r.get("ideal_speedup_b64") or 100.0 / (100.0 - r["macs_reduction"])
        good = r["speedup_b64"] >= 0.85 * ideal
        passed += good
        parts.append(
            f"{r['name']}: {r['speedup_b64']:.2f}x measured (batch 64) vs {ideal:.2f}x from its MACs "
            f"({'within' if good else 'not within'} 15%)"
        )
    word = "Reproduced" if passed == len(sp_rows) else ("Partly" if passed else "Not reproduced")
    return [
        f"- **Speed-up within 15% of the MACs reduction** ({word}, {passed} of {len(sp_rows)} models): "
        + "; ".join(parts)
        + "."
        + (f" Skipping but not timed (no latency measured): {', '.join(untimed)}." if untimed else "")
    ]


def verdicts(rows: dict[str, dict], plan: Plan) -> tuple[dict, list[str]]:
    """The headline and the claims' verdicts."""
    headline, out = headline_claims(rows, plan)
    return headline, out + gating_claims(rows, plan) + sdv_claims(rows, plan) + speed_claims(rows)


def _category(r: dict, st: Setting) -> str:
    if st.epochs and r["stage"] in ("base", "sp", "hrl"):
        return {"base": "plain ResNet-38", "sp": "SP from scratch", "hrl": "HRL"}[r["stage"]] + f", {st.epochs} epochs"
    if r["stage"] == "hrl+cal":
        return "HRL, threshold calibrated to 30%"
    if r["stage"] in ("sp", "hrl") and st.open_gates:
        return f"{r['stage'].upper()} (SP from scratch, gates start open)"
    if r["stage"] in ("sp", "hrl") and st.scratch:
        return f"{r['stage'].upper()} (SP from scratch)"
    if r["stage"] == "hrl" and st.explore:
        return "HRL (SP from base), exploration floor"
    if r["stage"] in ("sp", "hrl"):
        return f"{r['stage'].upper()} (SP from base)" + (", FFGate-I" if st.ff else "")
    names = {"base": "plain ResNet-38", "soft": "soft gating", "sdv": "SDV (random skipping)"}
    return names.get(r["stage"], r["stage"])


# the figure's marker of each row's category: (colour, marker, filled)
STYLES = {
    "plain ResNet-38": ("k", "s", True),
    "SP (SP from base)": ("tab:blue", "o", True),
    "HRL (SP from base)": ("tab:red", "^", True),
    "SP (SP from base), FFGate-I": ("tab:cyan", "o", True),
    "HRL (SP from base), FFGate-I": ("tab:pink", "^", True),
    "HRL (SP from base), exploration floor": ("tab:purple", "^", False),
    "SP (SP from scratch)": ("tab:blue", "o", False),
    "HRL (SP from scratch)": ("tab:orange", "^", True),
    "SP (SP from scratch, gates start open)": ("tab:red", "o", False),
    "HRL (SP from scratch, gates start open)": ("darkred", "^", True),
    "HRL, threshold calibrated to 30%": ("tab:brown", "P", False),
    "soft gating": ("tab:gray", "v", True),
    "SDV (random skipping)": ("tab:green", "D", True),
    "plain ResNet-38, 12 epochs": ("dimgray", "s", False),
    "SP from scratch, 12 epochs": ("tab:olive", "o", False),
    "HRL, 12 epochs": ("tab:olive", "^", True),
}


def plot(rows: list[dict], path: Path, plan: Plan) -> None:
    """Accuracy vs MACs of every ResNet-38 run: the whole range, and a zoom on the region near the plain network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("accuracy") is not None and r["arch"].endswith("38")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    seen: set[str] = set()
    for k, ax in enumerate(axes):
        placed: list[tuple[float, float]] = []
        for r in sorted(pts, key=lambda r: -r["accuracy"]):
            cat = _category(r, plan.of(r))
            color, marker, filled = STYLES.get(cat, ("k", "o", True))
            x, y = r["macs"] / 1e6, r["accuracy"]
            label = cat if k == 0 and cat not in seen else None
            seen.add(cat)
            kw = {"c": color} if filled or marker == "P" else {"facecolors": "none", "edgecolors": color}
            ax.scatter(x, y, marker=marker, s=60, label=label, linewidths=1.5, **kw)
            if k == 1 and all(abs(x - px) > 4 or abs(y - py) > 1.2 for px, py in placed):  # no overlapping labels
                placed.append((x, y))
                name = r["name"].replace("_r38", "")
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel("mean multiply-adds per image (millions, gates included)")
        ax.grid(alpha=0.3)
    base = next((r for r in pts if r["name"] == "base_r38"), None)
    axes[0].set_ylabel("CIFAR-10 test accuracy (%)")
    axes[0].set_title("All ResNet-38 runs (CPU-scale schedule)")
    axes[0].legend(fontsize=7, loc="lower right")
    zoom = [r for r in pts if r["accuracy"] >= 60]
    if zoom:
        axes[1].set_xlim(min(r["macs"] for r in zoom) / 1e6 - 5, max(r["macs"] for r in zoom) / 1e6 + 12)
        axes[1].set_ylim(min(r["accuracy"] for r in zoom) - 2, max(r["accuracy"] for r in zoom) + 2)
    if base:
        for ax in axes:
            ax.axhline(base["accuracy"] - 0.5, color="k", lw=0.8, ls=":")
            ax.axvline(0.7 * base["macs"] / 1e6, color="k", lw=0.8, ls=":")
        longer = [r for r in pts if r["stage"] == "base" and r is not base]  # other schedules' plain networks
        for r in longer:
            axes[1].axhline(r["accuracy"] - 0.5, color="dimgray", lw=0.8, ls="--")
        dashed = "".join(f"; dashed: {_category(r, plan.of(r))} - 0.5" for r in longer)
        corner = "headline corner, >= 30% fewer MACs within 0.5 pts"
        axes[1].set_title(f"Zoom (dotted: {corner}{dashed})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_calibrated(runner: Runner, plan: Plan, results: dict[str, dict], here: set[str], no_train: bool) -> None:
    """The rows of the runs here calibrated to their budgets (``NAME_calB``): ``skipnet calibrate`` on the
    validation split, then the test split evaluated once at the threshold found (both kept by the runner); when
    only collecting, only the runs already calibrated."""
    for run in plan.runs:
        for b in run.budgets:
            ckpt = runner.calibrated_path(run, b)
            if run.name not in here or results[run.name].get("accuracy") is None or (no_train and not ckpt.exists()):
                continue
            try:
                t = runner.evaluate(runner.calibrated(run, b))
            except RunFailed as e:
                print(f"[fail] {e}", flush=True)
                continue
            name, st = cal_name(run.name, b), plan.settings[cal_name(run.name, b)]
            here.add(name)
            results[name] = {
                "name": name,
                "group": st.group,
                "arch": st.arch,
                "stage": st.stage,
                "alpha": st.alpha,
                "command": portable(runner.calibrate_command(run, b)) + " && " + portable(runner.eval_command(ckpt)),
                **test_fields(t),
                "threshold": t.get("threshold"),
                "train_time_s": results[run.name].get("train_time_s"),
            }


def add_bench(runner: Runner, plan: Plan, results: dict[str, dict], here: set[str], data: str) -> None:
    """Latency (``skipnet bench``, batch 1 and 64) of the ResNet-38 rows collected here."""
    for name, d in results.items():
        if (
            name not in here
            or d.get("accuracy") is None
            or d["stage"] not in ("hrl", "hrl+cal", "base")
            or not d["arch"].endswith("38")
        ):
            continue
        st = plan.of(d)
        ckpt = runner.dir(name) / "best.pt" if st.of is None else runner.calibrated_path(plan.run(st.of), st.budget)
        for b in (1, 64):
            res = bench(ckpt, b, runner.out, data, keep=1.0 if d["stage"] == "base" else None)
            if res:
                d[f"speedup_b{b}"] = res["speedup"]
                d[f"ideal_speedup_b{b}"] = res["ideal_speedup"]
                d[f"latency_ms_routed_b{b}"] = res["latency_ms_routed"]
                d[f"latency_ms_plain_b{b}"] = res["latency_ms_plain"]


def collect(runner: Runner, plan: Plan, path: Path, args) -> dict[str, dict]:
    """The rows of the runs here (from their ``summary.json``), calibrated and timed, with the recorded rows of
    ``path`` for the runs that are not (and an empty row for a run never recorded)."""
    results: dict[str, dict] = {}
    for run in plan.runs:
        summary = runner.dir(run.name) / "summary.json"
        if summary.exists():
            command = portable(runner.command(run))
            results[run.name] = row(run.name, plan.settings[run.name], command, json.loads(summary.read_text()))
    here = set(results)  # rows of runs not on this machine are the recorded ones
    results = with_recorded(results, path)
    for run in plan.runs:
        if run.name not in results:
            results[run.name] = row(run.name, plan.settings[run.name], portable(runner.command(run)), None)
    add_calibrated(runner, plan, results, here, args.no_train)
    if not args.no_bench:
        add_bench(runner, plan, results, here, args.data)
    return results


GROUPS = {
    "1": "Plain ResNet-38",
    "2": "SkipNet-38: SP and SP + HRL",
    "3": "Hard vs soft gating (Table 3)",
    "4": "Algorithm ablation (Fig. 10b)",
    "5": "SDV (Fig. 6)",
    "7": "Schedule length: the headline's gap at twice the base schedule",
}


def write_md(path: Path, payload: dict) -> None:
    """The markdown tables of ``payload`` (the results JSON's content), printed too."""
    rows, curves = payload["runs"], payload["lesion"]
    md = [f"Run on {payload['date']}: `{payload['command']}`", ""]
    for g, title in GROUPS.items():
        if any(r["group"] == g for r in rows):
            md += [f"#### {g}. {title}", "", table([r for r in rows if r["group"] == g], with_speed=g in "127"), ""]
    if curves:
        md += [
            "#### Static lesion of the plain networks (beyond the paper)",
            "",
            "The blocks removed for every image alike, greedily, each the one whose removal raises the validation "
            "loss least (1,000 validation images: for these curves the first 1,000, which are of three classes; later "
            "runs spread them over the split, `results.spread_batches`); test accuracy after each removal.",
            "",
            lesion_table(curves),
            "",
        ]
    md += ["#### Claims", "", *payload["claims"], "", "Commands:", ""]
    md += [f"- `{r['name']}`: `{r['command']}`" for r in rows]
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))


def parser() -> argparse.ArgumentParser:
    p = group_parser(__doc__, None, str(DEFAULT_DATA), RESULTS)  # --out: runs/reproduce_cifar10_<scale> if not given
    p.add_argument("--scale", choices=list(SCALES), default="cpu", help="runs under runs/reproduce_cifar10_<scale>")
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurements")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    results_dir = Path(args.results)
    if not args.no_train and not Path(args.data).exists():
        print(f"reproduce_cifar10: error: data {args.data} not found", file=sys.stderr)
        return 2
    out = Path(args.out or REPO / "runs" / f"reproduce_cifar10_{args.scale}")
    out.mkdir(parents=True, exist_ok=True)
    plan, runner, rc = declare(args.scale), Runner(out, args.data), 0
    if not args.no_train:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        try:
            runner.train(plan.runs if args.only is None else select(plan.runs, args.only))
        except RunFailed as e:  # collect what finished
            print(f"[fail] {e}", file=sys.stderr, flush=True)
            rc = 1
    path = results_dir / f"reproduce_cifar10_{args.scale}.json"
    results = collect(runner, plan, path, args)
    rows = list(results.values())
    headline, claims = verdicts(results, plan)
    # How much a plain network can lose with no per-image choice: the static lesion curve of each plain ResNet-38.
    bases = [r.name for r in plan.runs if plan.settings[r.name].stage == "base" and plan.settings[r.name].arch == R38]
    earlier = with_recorded({}, path, key="lesion", name="run")
    curves = [c for c in (lesion(out / n, args.data, out / f"{n}.lesion.json") or earlier.get(n) for n in bases) if c]
    payload = {
        "scale": args.scale,
        "date": dt.date.today().isoformat(),
        "command": command_line(__file__, argv, REPO),
        "headline": headline,
        "claims": claims,
        "runs": rows,
        "lesion": curves,
    }
    # the headline of the longest schedule is the 30-epoch group's (headline30.py); this group's own pick is kept
    # as the shorter schedules'
    group = results_dir / "headline30_cifar10_cpu.json"
    if args.scale == "cpu" and group.exists() and json.loads(group.read_text()).get("headline"):
        payload["headline"] = json.loads(group.read_text())["headline"]
        payload["headline_short"] = headline
    write_json(path, payload, newline=False)
    plot(rows, results_dir / f"reproduce_cifar10_{args.scale}.png", plan)
    write_md(results_dir / f"reproduce_cifar10_{args.scale}.md", payload)
    return rc


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"\n(total {time.time() - t0:.0f}s)")
    raise SystemExit(rc)
