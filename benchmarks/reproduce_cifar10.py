"""Reproduce the paper's CIFAR-10 claims at CPU scale (or on the paper's schedule), resumably.

    python benchmarks/reproduce_cifar10.py --scale cpu [--data PATH] [--out DIR] [--only NAME ...]

Every experiment is a normal ``skipnet train`` run in its own run directory under ``--out``; running the
command again resumes a killed run from its ``last.pt`` and skips finished ones. Test accuracy is read from
each run's ``summary.json``: the test split evaluated once, on the checkpoint chosen on the validation split.
Writes ``benchmarks/results/reproduce_cifar10_<scale>.{json,md,png}`` and prints the tables.

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
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from skipnet.results import command_line, fmt, lesion, lesion_table, test_fields, with_recorded, write_json
from skipnet.results import portable as results_portable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
RESULTS = REPO / "benchmarks" / "results"


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


def rnn38(name: str, group: str, stage: str, args: list[str], init: str | None = None, **extra) -> dict:
    """One SkipNet-38 (recurrent gate) experiment."""
    r = {"name": name, "group": group, "arch": "cifar10_rnn_gate_38", "stage": stage, "args": args}
    return r | ({"init": init} if init else {}) | extra


def experiments(scale: str, data: str, out: Path) -> list[dict]:
    s = SCALES[scale]
    c = ["--data", data, *s["common"]]
    d = s["abl_arch"]
    runs = [
        {"name": "base_r38", "group": "1", "arch": "cifar10_resnet_38", "stage": "base", "args": s["base"]},
        {
            "name": "sp_r38_rnn",
            "group": "2",
            "arch": "cifar10_rnn_gate_38",
            "stage": "sp",
            "args": s["sp"],
            "init": "base_r38",
        },
    ]
    for a in s["alphas"]:
        runs.append(rnn38(f"hrl_r38_rnn_a{a}", "2", "hrl", [*s["hrl"], "--alpha", str(a)], "sp_r38_rnn", alpha=a))
    # Beyond the paper: the same HRL with an exploration floor, gates drawn from eps + (1 - 2 eps) p, so that every
    # block keeps being skipped in training (the backbone learns to do without it) and REINFORCE keeps seeing skips.
    eps = s["explore"]
    for a in s["explore_alphas"]:
        runs.append(
            rnn38(
                f"hrl_r38_rnn_x{eps}_a{a}",
                "2",
                "hrl",
                [*s["hrl_explore"], "--alpha", str(a), "--explore", str(eps)],
                "sp_r38_rnn",
                alpha=a,
            )
        )
    # The authors' recipe: SP from scratch on the base schedule (the backbone learns with blocks skipped and the
    # gates become block-specific), then HRL. SP from the base weights (above) leaves one undiscriminating gate
    # probability above 0.5, and HRL then pushes every gate to "execute": skips cost more CE than alpha repays.
    runs.append(
        {"name": "sp_r38_rnn_scratch", "group": "2", "arch": "cifar10_rnn_gate_38", "stage": "sp", "args": s["base"]}
    )
    for a in s["scratch_alphas"]:
        runs.append(
            rnn38(
                f"hrl_r38_rnn_scratch_a{a}", "2", "hrl", [*s["hrl"], "--alpha", str(a)], "sp_r38_rnn_scratch", alpha=a
            )
        )
    # Beyond the paper: the same SP from scratch with every gate starting open (p = sigmoid(2) = 0.88), so the
    # blocks train from the first step instead of waiting for their gates to reopen (SP from scratch with the
    # default init skips ~93% of the blocks after its first epoch), then HRL at larger alphas.
    if s["gate_bias"] is not None:
        gb = f"gb{s['gate_bias']:g}"
        runs.append(rnn38(f"sp_r38_rnn_scratch_{gb}", "2", "sp", [*s["base"], "--gate-bias", str(s["gate_bias"])]))
        for a in s["gate_bias_alphas"]:
            runs.append(
                rnn38(
                    f"hrl_r38_rnn_scratch_{gb}_a{a}",
                    "2",
                    "hrl",
                    [*s["hrl"], "--alpha", str(a)],
                    f"sp_r38_rnn_scratch_{gb}",
                    alpha=a,
                )
            )
        for a in s["hrl_long_alphas"]:
            runs.append(
                rnn38(
                    f"hrl_r38_rnn_scratch_{gb}_long_a{a}",
                    "2",
                    "hrl",
                    [*s["hrl_long"], "--alpha", str(a)],
                    f"sp_r38_rnn_scratch_{gb}",
                    alpha=a,
                )
            )
    runs += [
        {
            "name": "sp_r38_ff",
            "group": "2",
            "arch": "cifar10_feedforward_38",
            "stage": "sp",
            "args": s["sp"],
            "init": "base_r38",
        },
        {
            "name": f"hrl_r38_ff_a{s['ff_alpha']}",
            "group": "2",
            "arch": "cifar10_feedforward_38",
            "stage": "hrl",
            "args": [*s["hrl"], "--alpha", str(s["ff_alpha"])],
            "init": "sp_r38_ff",
            "alpha": s["ff_alpha"],
        },
        {
            "name": "soft_r38_rnn",
            "group": "3",
            "arch": "cifar10_rnn_gate_38",
            "stage": "soft",
            "args": s["sp"],
            "init": "base_r38",
        },
        {
            "name": f"abl_base_r{d}",
            "group": "4",
            "arch": f"cifar10_resnet_{d}",
            "stage": "base",
            "args": [*s["abl_base"], *s["abl_limit"]],
        },
        {
            "name": f"abl_sp_r{d}",
            "group": "4",
            "arch": f"cifar10_rnn_gate_{d}",
            "stage": "sp",
            "args": [*s["abl_sp"], *s["abl_limit"]],
            "init": f"abl_base_r{d}",
        },
        {
            "name": f"abl_hrl_sp_r{d}",
            "group": "4",
            "arch": f"cifar10_rnn_gate_{d}",
            "stage": "hrl",
            "args": [*s["abl_hrl"], *s["abl_limit"], "--alpha", "0.1"],
            "init": f"abl_sp_r{d}",
            "alpha": 0.1,
        },
        {
            "name": f"abl_hrl_scratch_r{d}",
            "group": "4",
            "arch": f"cifar10_rnn_gate_{d}",
            "stage": "hrl",
            "args": [*s["abl_scratch"], *s["abl_limit"], "--alpha", "0.1"],
            "alpha": 0.1,
        },
        {
            "name": f"abl_rl_scratch_r{d}",
            "group": "4",
            "arch": f"cifar10_rnn_gate_{d}",
            "stage": "rl",
            "args": [*s["abl_scratch"], *s["abl_limit"], "--alpha", "0.1"],
            "alpha": 0.1,
        },
    ]
    # SDV from scratch on the base schedule, at the keep ratio of the SP-from-scratch HRL models: the same starting
    # point as SkipNet's authors' recipe (the SDV runs above fine-tune the trained plain network instead).
    runs.append(
        {
            "name": f"sdv_r38_scratch_k{s['sdv_scratch_keep']}",
            "group": "5",
            "arch": "cifar10_resnet_38",
            "stage": "sdv",
            "args": [*s["base"], "--keep", str(s["sdv_scratch_keep"])],
            "keep": s["sdv_scratch_keep"],
        }
    )
    for k in s["sdv_keeps"]:
        runs.append(
            {
                "name": f"sdv_r38_k{k}",
                "group": "5",
                "arch": "cifar10_resnet_38",
                "stage": "sdv",
                "args": [*s["sdv"], "--keep", str(k)],
                "init": "base_r38",
                "keep": k,
            }
        )
    # The headline's gap against schedule length: the plain network and the best recipe above (SP from scratch with
    # the gates starting open, then HRL) on a schedule twice the base one, each held against the other.
    if s["long"]:
        e = s["long"][s["long"].index("--epochs") + 1]
        gb = f"gb{s['gate_bias']:g}"
        runs += [
            {"name": f"base_r38_e{e}", "group": "7", "arch": "cifar10_resnet_38", "stage": "base", "args": s["long"]},
            rnn38(f"sp_r38_rnn_scratch_{gb}_e{e}", "7", "sp", [*s["long"], "--gate-bias", str(s["gate_bias"])]),
        ]
        for a in s["long_alphas"]:
            runs.append(
                rnn38(
                    f"hrl_r38_rnn_scratch_{gb}_e{e}_a{a}",
                    "7",
                    "hrl",
                    [*s["hrl"], "--alpha", str(a)],
                    f"sp_r38_rnn_scratch_{gb}_e{e}",
                    alpha=a,
                )
            )
    for r in runs:
        cmd = ["skipnet", "train", r["arch"], "--stage", r["stage"], *c, *r["args"], "--out", str(out / r["name"])]
        if r.get("init"):
            cmd += ["--init", str(out / r["init"] / "best.pt")]
        r["cmd"] = cmd
    return runs


def run_all(runs: list[dict], out: Path, jobs: int) -> None:
    """Run every pending experiment, ``jobs`` at a time, each after the run it starts from has finished."""
    done = lambda name: (out / name / "summary.json").exists()  # noqa: E731
    pending = [r for r in runs if not done(r["name"])]
    running: dict[str, subprocess.Popen] = {}
    failed: set[str] = set()
    while pending or running:
        for r in list(pending):
            if len(running) >= jobs:
                break
            dep = r.get("init")
            if dep and not done(dep):
                if dep in failed or (dep not in running and all(p["name"] != dep for p in pending)):
                    print(f"[skip] {r['name']}: {dep} did not finish", flush=True)
                    pending.remove(r)
                    failed.add(r["name"])
                continue
            if (out / r["name"] / "last.pt").exists():  # killed earlier: continue it
                r["cmd"] = [*r["cmd"], "--resume"]
            print(f"[run ] {shlex.join(r['cmd'])}", flush=True)
            log = open(out / f"{r['name']}.log", "a")  # noqa: SIM115 - closed with the process
            running[r["name"]] = subprocess.Popen(r["cmd"], stdout=log, stderr=subprocess.STDOUT)
            pending.remove(r)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0 or not done(name):
                failed.add(name)
                print(f"[fail] {name} (exit {proc.returncode}); see {out / (name + '.log')}", flush=True)
            else:
                print(f"[done] {name}", flush=True)
        time.sleep(2)


def calibrate(r: dict, data: str, target: float, out: Path) -> dict | None:
    """SkipNet's compute knob on a trained model: the threshold meeting ``target``% fewer MACs on val."""
    src = out / r["name"] / "best.pt"
    dst = out / r["name"] / f"calibrated_{int(target)}.pt"
    cache = out / f"{r['name']}.cal{int(target)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    cal = [
        "skipnet",
        "calibrate",
        str(src),
        "--data",
        data,
        "--target-reduction",
        str(target),
        "--out",
        str(dst),
        "--json",
    ]
    ev = ["skipnet", "eval", str(dst), "--data", data, "--json"]
    for cmd in (cal, ev):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"[fail] {shlex.join(cmd)}: {res.stderr.strip()[-300:]}", flush=True)
            return None
    d = {"test": json.loads(res.stdout.strip().splitlines()[-1]), "commands": [portable(cal), portable(ev)]}
    cache.write_text(json.dumps(d))
    return d


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


def row(r: dict, summary: dict | None) -> dict:
    d = {
        "name": r["name"],
        "group": r["group"],
        "arch": r["arch"],
        "stage": r["stage"],
        "command": portable(r["cmd"]),
    }
    for k in ("alpha", "keep"):
        if k in r:
            d[k] = r[k]
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


def base_of(name: str) -> str:
    """The plain network trained on the same schedule as run ``name`` (``..._e12_...`` -> ``base_r38_e12``)."""
    m = re.search(r"_e(\d+)(?:_|$)", name)
    return f"base_r38_e{m.group(1)}" if m else "base_r38"


def best_pair(rows: dict[str, dict], runs: list[dict]) -> tuple[dict, dict, bool] | None:
    """The headline's pick among ``runs``, each against the plain network on its own schedule: the largest saving
    among those within 0.5 points of it at >= 30% fewer MACs; failing that, the one closest to its plain network
    among those saving >= 30%; failing that, the one saving the most. Returns (run, its base, reproduced)."""
    paired = [(r, rows[base_of(r["name"])]) for r in runs if rows.get(base_of(r["name"]), {}).get("accuracy")]
    if not paired:
        return None
    gap = lambda rb: rb[1]["accuracy"] - rb[0]["accuracy"]  # noqa: E731
    ok = [rb for rb in paired if rb[0]["macs_reduction"] >= 30 and gap(rb) <= 0.5]
    cheap = [rb for rb in paired if rb[0]["macs_reduction"] >= 30]
    if ok:
        return (*max(ok, key=lambda rb: rb[0]["macs_reduction"]), True)
    if cheap:
        return (*min(cheap, key=gap), False)
    return (*max(paired, key=lambda rb: rb[0]["macs_reduction"]), False)


def verdicts(rows: dict[str, dict], scale: str) -> tuple[dict, list[str]]:
    out = []
    hrl_all = [
        r
        for n, r in rows.items()
        if n.startswith("hrl_r38_rnn") and r["stage"] == "hrl" and r.get("accuracy") is not None
    ]
    hrl = [r for r in hrl_all if base_of(r["name"]) == "base_r38"]  # the base schedule's runs (the other claims)
    cal_all = [r for r in rows.values() if r["stage"] == "hrl+cal"]
    headline: dict = {}
    # Each SkipNet is held against the plain network trained on its own schedule.
    h = best_pair(rows, hrl_all)
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
    h = best_pair(rows, cal_all)
    if h:
        best, b, ok = h
        out.append(
            f"- **Headline with the compute knob** ({'Reproduced' if ok else 'Not reproduced'}): SkipNet-38 + SP + "
            f"HRL (α = {best.get('alpha')}, `{best['name']}`) with its gate threshold calibrated on the validation "
            f"split to a 30% budget: {best['accuracy']:.2f}% at {best['macs_reduction']:.1f}% fewer MACs on the test "
            f"split (threshold {best.get('threshold'):.3g}) vs `{b['name']}` {b['accuracy']:.2f}%."
        )
    sp, soft = rows.get("sp_r38_rnn", {}), rows.get("soft_r38_rnn", {})
    if sp.get("accuracy") is not None and soft.get("accuracy") is not None:
        gap = sp["accuracy"] - soft["accuracy"]
        word = "Reproduced" if gap > 5 else ("Partly" if gap > 0 else "Not reproduced")
        out.append(
            f"- **Hard vs soft gating** ({word}): hard (SP) {sp['accuracy']:.2f}% at {sp['macs']:.3g} MACs vs "
            f"soft {soft['accuracy']:.2f}% at {soft['macs']:.3g} MACs, both with 0.5-threshold decisions."
        )
    abl = {k: r for k, r in rows.items() if k.startswith("abl_") and r.get("accuracy") is not None}
    hsp = next((r for k, r in abl.items() if k.startswith("abl_hrl_sp")), None)
    hsc = next((r for k, r in abl.items() if k.startswith("abl_hrl_scratch")), None)
    rl = next((r for k, r in abl.items() if k.startswith("abl_rl_scratch")), None)
    if rl:
        word = "Reproduced" if rl["accuracy"] < 20 else "Not reproduced"
        out.append(f"- **Pure RL stays near chance** ({word}): {rl['accuracy']:.2f}% (chance 10%).")
    if hsp and hsc:
        word = "Reproduced" if hsp["accuracy"] > hsc["accuracy"] else "Not reproduced"
        out.append(
            f"- **HRL + SP beats HRL from scratch** ({word}): {hsp['accuracy']:.2f}% at "
            f"{hsp['macs_reduction']:.1f}% fewer MACs vs {hsc['accuracy']:.2f}% at {hsc['macs_reduction']:.1f}%."
        )
    sdv = [r for k, r in rows.items() if k.startswith("sdv_") and r.get("accuracy") is not None]
    if sdv and hrl:
        pairs = []
        for s_ in sdv:  # SDV from scratch is matched with SkipNet from scratch (SP from scratch + HRL) only
            pool = [h for h in hrl if "scratch" in h["name"]] if "scratch" in s_["name"] else hrl
            closest = min(pool or hrl, key=lambda h: abs(h["macs"] - s_["macs"]))
            pairs.append((s_, closest))
        wins = sum(h["accuracy"] > s_["accuracy"] for s_, h in pairs)
        word = "Reproduced" if wins == len(pairs) else ("Partly" if wins else "Not reproduced")
        detail = "; ".join(
            f"SDV{' from scratch' if 'scratch' in s_['name'] else ''} keep {s_.get('keep')} {s_['accuracy']:.2f}% "
            f"at {s_['macs']:.3g} MACs vs "
            f"{h['name']} {h['accuracy']:.2f}% at {h['macs']:.3g}"
            for s_, h in pairs
        )
        out.append(f"- **SkipNet beats SDV at matched MACs** ({word}): {detail}.")
    # every skipping model counts, whatever its gate; those the bench did not time are named, not dropped
    skipping = [
        r for r in rows.values() if r["stage"] in ("hrl", "hrl+cal", "rl") and (r.get("macs_reduction") or 0) > 5
    ]
    sp_rows = [r for r in skipping if r.get("speedup_b64")]
    untimed = [r["name"] for r in skipping if not r.get("speedup_b64")]
    if sp_rows:
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
        out.append(
            f"- **Speed-up within 15% of the MACs reduction** ({word}, {passed} of {len(sp_rows)} models): "
            + "; ".join(parts)
            + "."
            + (f" Skipping but not timed (no latency measured): {', '.join(untimed)}." if untimed else "")
        )
    return headline, out


def _category(r: dict) -> str:
    if base_of(r["name"]) != "base_r38" and r["stage"] in ("base", "sp", "hrl"):
        epochs = base_of(r["name"]).rsplit("_e", 1)[1]
        return {"base": "plain ResNet-38", "sp": "SP from scratch", "hrl": "HRL"}[r["stage"]] + f", {epochs} epochs"
    if r["stage"] == "hrl+cal":
        return "HRL, threshold calibrated to 30%"
    if r["stage"] in ("sp", "hrl") and "_gb" in r["name"]:
        return f"{r['stage'].upper()} (SP from scratch, gates start open)"
    if r["stage"] in ("sp", "hrl") and "scratch" in r["name"]:
        return f"{r['stage'].upper()} (SP from scratch)"
    if r["stage"] == "hrl" and "_x" in r["name"]:
        return "HRL (SP from base), exploration floor"
    if r["stage"] in ("sp", "hrl"):
        return f"{r['stage'].upper()} (SP from base)" + (", FFGate-I" if "_ff" in r["name"] else "")
    names = {"base": "plain ResNet-38", "soft": "soft gating", "sdv": "SDV (random skipping)"}
    return names.get(r["stage"], r["stage"])


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy vs MACs of every ResNet-38 run: the whole range, and a zoom on the region near the plain network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
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
    pts = [r for r in rows if r.get("accuracy") is not None and r["arch"].endswith("38")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    seen: set[str] = set()
    for k, ax in enumerate(axes):
        placed: list[tuple[float, float]] = []
        for r in sorted(pts, key=lambda r: -r["accuracy"]):
            cat = _category(r)
            color, marker, filled = styles.get(cat, ("k", "o", True))
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
        dashed = "".join(f"; dashed: {_category(r)} - 0.5" for r in longer)
        corner = "headline corner, >= 30% fewer MACs within 0.5 pts"
        axes[1].set_title(f"Zoom (dotted: {corner}{dashed})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_calibrated(runs: list[dict], results: dict[str, dict], here: set[str], out: Path, args) -> None:
    """The rows of the HRL runs here calibrated to the scale's budget (``NAME_calB``)."""
    target = SCALES[args.scale]["calibrate"]
    for r in runs:
        if r["stage"] != "hrl" or not r["name"].startswith("hrl_r38_rnn") or results[r["name"]].get("accuracy") is None:
            continue
        if r["name"] not in here or (args.no_train and not (out / f"{r['name']}.cal{int(target)}.json").exists()):
            continue
        cal = calibrate(r, args.data, target, out)
        if cal:
            name = f"{r['name']}_cal{int(target)}"
            here.add(name)
            t = cal["test"]
            results[name] = {
                "name": name,
                "group": r["group"],
                "arch": r["arch"],
                "stage": "hrl+cal",
                "alpha": r.get("alpha"),
                "command": " && ".join(cal["commands"]),
                **test_fields(t),
                "threshold": t.get("threshold"),
                "train_time_s": results[r["name"]].get("train_time_s"),
            }


def add_bench(results: dict[str, dict], here: set[str], out: Path, data: str) -> None:
    """Latency (``skipnet bench``, batch 1 and 64) of the ResNet-38 rows collected here."""
    for name, d in results.items():
        if (
            name not in here
            or d.get("accuracy") is None
            or d["stage"] not in ("hrl", "hrl+cal", "base")
            or not d["arch"].endswith("38")
        ):
            continue
        for b in (1, 64):
            ckpt = out / name / "best.pt"
            if d["stage"] == "hrl+cal":
                ckpt = out / name.rsplit("_cal", 1)[0] / f"calibrated_{name.rsplit('_cal', 1)[1]}.pt"
            res = bench(ckpt, b, out, data, keep=1.0 if d["stage"] == "base" else None)
            if res:
                d[f"speedup_b{b}"] = res["speedup"]
                d[f"ideal_speedup_b{b}"] = res["ideal_speedup"]
                d[f"latency_ms_routed_b{b}"] = res["latency_ms_routed"]
                d[f"latency_ms_plain_b{b}"] = res["latency_ms_plain"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 ImageFolder root or its .tar.gz")
    ap.add_argument(
        "--out", default=None, help="parent of the run directories (default runs/reproduce_cifar10_<scale>)"
    )
    ap.add_argument("--only", nargs="*", default=None, help="run only these experiment names (others are reported)")
    ap.add_argument("--no-train", action="store_true", help="only collect results of runs that exist")
    ap.add_argument("--no-bench", action="store_true", help="skip the latency measurements")
    ap.add_argument("--jobs", type=int, default=2, help="experiments run at once (1 thread each at cpu scale)")
    ap.add_argument("--results", default=str(RESULTS), help="where the results files are read and written")
    args = ap.parse_args(argv)
    results_dir = Path(args.results)
    if not args.no_train and not Path(args.data).exists():
        print(f"reproduce_cifar10: error: data {args.data} not found", file=sys.stderr)
        return 2
    out = Path(args.out or REPO / "runs" / f"reproduce_cifar10_{args.scale}")
    out.mkdir(parents=True, exist_ok=True)
    runs = experiments(args.scale, args.data, out)
    selected = [r for r in runs if args.only is None or r["name"] in args.only]
    if not args.no_train:
        run_all(selected, out, args.jobs)
    results: dict[str, dict] = {}
    for r in runs:
        summary_path = out / r["name"] / "summary.json"
        if summary_path.exists():
            results[r["name"]] = row(r, json.loads(summary_path.read_text()))
    here = set(results)  # rows of runs not on this machine are the recorded ones
    results = with_recorded(results, results_dir / f"reproduce_cifar10_{args.scale}.json")
    results |= {r["name"]: row(r, None) for r in runs if r["name"] not in results}
    add_calibrated(runs, results, here, out, args)
    if not args.no_bench:
        add_bench(results, here, out, args.data)
    rows = list(results.values())
    headline, claims = verdicts(results, args.scale)
    # How much a plain network can lose with no per-image choice: the static lesion curve of each plain ResNet-38.
    bases = [r["name"] for r in runs if r["stage"] == "base" and r["arch"].endswith("_38")]
    earlier = with_recorded({}, results_dir / f"reproduce_cifar10_{args.scale}.json", key="lesion", name="run")
    curves = [c for c in (lesion(out / n, args.data, out / f"{n}.lesion.json") or earlier.get(n) for n in bases) if c]
    stamp = dt.date.today().isoformat()
    payload = {
        "scale": args.scale,
        "date": stamp,
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
    write_json(results_dir / f"reproduce_cifar10_{args.scale}.json", payload, newline=False)
    plot(rows, results_dir / f"reproduce_cifar10_{args.scale}.png")
    groups = {
        "1": "Plain ResNet-38",
        "2": "SkipNet-38: SP and SP + HRL",
        "3": "Hard vs soft gating (Table 3)",
        "4": "Algorithm ablation (Fig. 10b)",
        "5": "SDV (Fig. 6)",
        "7": "Schedule length: the headline's gap at twice the base schedule",
    }
    md = [f"Run on {stamp}: `{payload['command']}`", ""]
    for g, title in groups.items():
        if any(r["group"] == g for r in rows):
            md += [f"#### {g}. {title}", "", table([r for r in rows if r["group"] == g], with_speed=g in "127"), ""]
    if curves:
        md += [
            "#### Static lesion of the plain networks (beyond the paper)",
            "",
            "The blocks removed for every image alike, greedily, each the one whose removal raises the validation "
            "loss least (first 1,000 validation images); test accuracy after each removal.",
            "",
            lesion_table(curves),
            "",
        ]
    md += ["#### Claims", "", *claims, "", "Commands:", ""]
    md += [f"- `{r['name']}`: `{r['command']}`" for r in rows]
    (results_dir / f"reproduce_cifar10_{args.scale}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"\n(total {time.time() - t0:.0f}s)")
    raise SystemExit(rc)
