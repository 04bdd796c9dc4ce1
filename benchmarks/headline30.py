"""The headline on a 30-epoch schedule (issue 19): a plain ResNet-38 against SkipNet-38 (SP from scratch with the
gates starting open, then HRL), on the bundled CIFAR-10, resumably.

    python benchmarks/headline30.py [--data PATH] [--out runs/h30] [--jobs 2] [--only NAME ...] [--no-train]

Every run is a plain ``skipnet train`` command in its own directory under ``--out`` (base, sp, then one HRL run
per variant below); running the command again resumes a killed run and skips finished ones. Test figures are
each run's ``summary.json``: the test split evaluated once, on the checkpoint chosen on the validation split.
Each finished HRL run is then calibrated (``skipnet calibrate``: the greedy threshold chosen on the validation
split for a 30% budget) and evaluated once on the test split at it, a row ``NAME@30%``. Rows of runs that did
not finish on this machine (earlier sessions': run directories are not kept) are carried over from the JSON.
Writes ``benchmarks/results/headline30_cifar10_cpu.{json,md}`` and sets the ``headline`` of
``benchmarks/results/reproduce_cifar10_cpu.json`` from this group (the shorter schedules' pick is kept there as
``headline_short``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_cifar10 import DEFAULT_DATA, RESULTS, lesion, lesion_table, portable, test_fields  # noqa: E402

COMMON = ["--batch-size", "128", "--val-split", "0.1", "--threads", "1", "--amp", "bf16"]
SCHEDULE = ["--epochs", "30", "--schedule", "onecycle", "--nesterov", "--weight-decay", "5e-4"]
# HRL from the SP checkpoint: the CPU recipe of the shorter schedules (one epoch at lr 3e-3, EMA baseline), with
# BatchNorm statistics updated (measured better than frozen at this lr on CIFAR-10, RESULTS.md), two evaluations.
HRL = ["--epochs", "1", "--lr", "0.003", "--schedule", "constant", "--baseline", "ema", "--bn", "update"]
HRL += ["--eval-every", "176"]
KD = ["--distill", "{out}/base/best.pt"]  # distillation from the plain network of the same schedule
COS = [*KD, "--schedule", "cosine"]
KD8 = [*COS, "--epochs", "8"]
# name -> (alpha, extra options). "kd": distillation from the plain network of the same schedule (beyond the paper).
VARIANTS = {
    "hrl_a1.5": (1.5, []),
    "hrl_kd_a1.5": (1.5, KD),
    "hrl_kd_a2.5": (2.5, KD),
    "hrl_kd_a3.5": (3.5, KD),
    # from here on, --distill keeps the paper's CE inside the HRL return (the KD term trains the backbone only)
    "hrl_a3": (3.0, []),
    "hrl_kdce_a3": (3.0, KD),
    "hrl_kdce_a2": (2.0, KD),
    "hrl_kdce_a2.5": (2.5, KD),
    # the learning rate decays to 0 over the epoch (cosine), so that the policy and the backbone settle
    "hrl_kdce_cos_a2": (2.0, COS),
    "hrl_kdce_cos_a2.5": (2.5, COS),
    # three HRL epochs instead of one (the cosine decay spread over all three): the backbone has longer to adapt
    "hrl_kdce_cos3_a2": (2.0, [*COS, "--epochs", "3"]),
    "hrl_kdce_cos3_a2.5": (2.5, [*COS, "--epochs", "3"]),
    # eight epochs, closer to the paper's HRL length (10k iterations, ~28 epochs of 45k images)
    "hrl_kdce_cos8_a1.5": (1.5, KD8),
    "hrl_kdce_cos8_a2": (2.0, KD8),
    # the BatchNorm default from --init (statistics frozen) against the --bn update of the rows above
    "hrl_kdce_cos_a2.5_bnfrozen": (2.5, [*COS, "--bn", "frozen"]),
    # beyond the paper: the skip reward capped at 40% of the blocks (--skip-target), so that the policy settles
    # near a 30% budget instead of switching from nothing to 60-70% with alpha
    "hrl_kdce_cos8_a2_t0.4": (2.0, [*KD8, "--skip-target", "0.4"]),
    "hrl_kdce_cos8_a2_t0.33": (2.0, [*KD8, "--skip-target", "0.33"]),
    # smaller skip rewards on the eight-epoch schedule, aiming the policy itself nearer the 30% budget
    "hrl_kdce_cos8_a1.25": (1.25, KD8),
    "hrl_kdce_cos8_a1": (1.0, KD8),
    "hrl_kdce_cos8_a0.5": (0.5, KD8),
}
# Beyond the paper: HRL straight from the plain ResNet-38 (no SP stage; the gates start open, --gate-bias 2), so the
# SkipNet costs the base's 30 epochs plus its 8 HRL epochs and keeps the base's backbone instead of SP's (0.9 points
# lower). The base is the shipped pretrained:cifar10_resnet_38, this group's own `base` (its index.json records the
# command), which is also the teacher.
BASE = "pretrained:cifar10_resnet_38"
FROM_BASE = ["--init", BASE, "--gate-bias", "2", "--distill", BASE, "--schedule", "cosine", "--epochs", "8"]
FROM_BASE_VARIANTS = {
    "hrl_base_kdce_cos8_a2_t0.4": (2.0, [*FROM_BASE, "--skip-target", "0.4"]),
    # The gates of a plain network start at one bias, not at SP's trained policy, so they learn 10x faster
    # (--gate-lr-mult 10). With a fixed alpha 2 and --skip-target 0.4 they opened fully instead (99% of the blocks
    # executed after 1.5 epochs: every skip cost the plain backbone more than alpha repaid; stopped there, so
    # not a row). With --skip-budget, alpha moves (from 2) until the budget is skipped on average:
    "hrl_base_kdce_cos8_b0.4_g10": (2.0, [*FROM_BASE, "--skip-budget", "0.4", "--gate-lr-mult", "10"]),
    # Not a row: the same budget at the gates' own learning rate (no --gate-lr-mult) collapsed. Alpha rose to 3.2
    # before the policy skipped, then every gate closed within 300 steps (1.6% of the blocks executed, 46% val
    # accuracy) and stayed closed with alpha back at 0 for the last 1,400 steps: nothing rewards reopening a gate
    # whose block the backbone has learned to do without. (It ran before the budget's best.pt rule was fixed;
    # its best.pt is the step-176 evaluation, which skips nothing.)
    # --skip-reward correct: only right predictions earn the skip reward, so an image is paid for skipping only
    # while it stays right (the incentive for a per-image policy); with the cap as above (one change), and without
    # it (the correctness condition alone limits the skipping: an image that skips into error earns nothing).
    "hrl_base_kdce_cos8_a2_t0.4_rc": (2.0, [*FROM_BASE, "--skip-target", "0.4", "--skip-reward", "correct"]),
    "hrl_base_kdce_cos8_a2_rc": (2.0, [*FROM_BASE, "--skip-reward", "correct"]),
}
# Eight more HRL epochs from the earlier pick (hrl_kdce_cos8_a2_t0.4: SP 30 + HRL 8), the same recipe restarted
# (a warm restart of the cosine), at its lr and at a third of it: SP 30 + HRL 16 epochs in all, against the base's
# 30. Run on 2026-12-01 from that run's export, then shipped as pretrained:cifar10_rnn_gate_38 (replaced since).
PICK = "{out}/hrl_kdce_cos8_a2_t0.4/best.pt"
MORE = ["--init", PICK, "--distill", BASE, "--schedule", "cosine", "--epochs", "8", "--skip-target", "0.4"]
# The control for the continuation's 16 extra epochs: the plain ResNet-38 given 16 more epochs of the HRL recipe's
# learning rate (3e-3, cosine) with the same distillation from itself, so the SkipNet's gap is also measured at
# equal training.
BASE_MORE = ["--init", BASE, "--distill", BASE, "--epochs", "16", "--lr", "0.003", "--schedule", "cosine"]
BASE_MORE += ["--eval-every", "351"]
FROM_PICK_VARIANTS = {
    "hrl_pick_more8": (2.0, MORE),
    "hrl_pick_more8_lr1e-3": (2.0, [*MORE, "--lr", "0.001", "--bn", "update"]),
}


# Plain ResNets shallower than 38 on the base's schedule: what a user would train instead of a SkipNet-38 (the
# paper's argument against static compression, Fig. 5c/6c), compared at matched MACs.
STATIC = (20, 26, 32)
# SDV (Fig. 6): the plain ResNet-38 fine-tuned with blocks dropped at random (stochastic depth) for as many epochs
# as the SkipNet's HRL, dropping blocks at random at inference too; keep 0.6 is about the pick's cost.
SDV = {"sdv_k0.6": 0.6}
SDV_ARGS = ["--epochs", "8", "--schedule", "onecycle", "--lr", "0.05", "--nesterov", "--weight-decay", "5e-4"]


def runs(out: Path, data: str) -> list[dict]:
    c = ["--data", data, *COMMON]
    rs = [
        {"name": "base", "arch": "cifar10_resnet_38", "stage": "base", "args": [*c, *SCHEDULE]},
        {"name": "sp", "arch": "cifar10_rnn_gate_38", "stage": "sp", "args": [*c, *SCHEDULE]},
    ]
    for depth in STATIC:  # the static alternative: a shallower plain network on the same schedule
        args = [*c, *SCHEDULE]
        rs.append({"name": f"base_r{depth}", "arch": f"cifar10_resnet_{depth}", "stage": "base", "args": args})
    args = [*c, *BASE_MORE]
    rs.append({"name": "base_more16_kd", "arch": "cifar10_resnet_38", "stage": "base", "args": args})
    for name, keep in SDV.items():
        args = [*c, *SDV_ARGS, "--keep", str(keep), "--init", str(out / "base" / "best.pt")]
        rs.append({"name": name, "arch": "cifar10_resnet_38", "stage": "sdv", "args": args, "after": "base"})
    for name, (alpha, extra) in VARIANTS.items():
        extra = [a.format(out=out) for a in extra]
        args = [*c, *HRL, "--alpha", str(alpha), "--init", str(out / "sp" / "best.pt"), *extra]
        rs.append({"name": name, "arch": "cifar10_rnn_gate_38", "stage": "hrl", "args": args, "after": "sp"})
        rs[-1] |= {"alpha": alpha, "distill": bool(extra)}
    for name, (alpha, extra) in (FROM_BASE_VARIANTS | FROM_PICK_VARIANTS).items():
        args = [*c, *HRL, "--alpha", str(alpha), *[a.format(out=out) for a in extra]]
        rs.append({"name": name, "arch": "cifar10_rnn_gate_38", "stage": "hrl", "args": args})
        rs[-1] |= {"alpha": alpha, "distill": True}
        if name in FROM_PICK_VARIANTS:
            rs[-1]["after"] = "hrl_kdce_cos8_a2_t0.4"
    for r in rs:
        r["cmd"] = ["skipnet", "train", r["arch"], "--stage", r["stage"], *r["args"], "--out", str(out / r["name"])]
    return rs


def done(out: Path, name: str) -> bool:
    return (out / name / "summary.json").exists()


def train(rs: list[dict], out: Path, jobs: int) -> None:
    """Run what is pending, ``jobs`` at a time, each after the run it starts from; resume the interrupted."""
    pending, running = [r for r in rs if not done(out, r["name"])], {}
    while pending or running:
        for r in list(pending):
            if len(running) >= jobs:
                break
            if r.get("after") and not done(out, r["after"]):
                if r["after"] not in running and not any(p["name"] == r["after"] for p in pending):
                    print(f"skip {r['name']}: {r['after']} did not finish", flush=True)
                    pending.remove(r)
                continue
            cmd = r["cmd"] + (["--resume"] if (out / r["name"] / "last.pt").exists() else [])
            print("+", portable(cmd), flush=True)
            with open(out / f"{r['name']}.log", "a") as log:  # the child keeps its own copy of the descriptor
                running[r["name"]] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            pending.remove(r)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"{name}: exit {proc.returncode}", flush=True)
                del running[name]
        time.sleep(5)


# The compute knob (skipnet calibrate): an HRL run's greedy threshold chosen on the validation split to meet a
# 30% budget, then the test split evaluated once at it. Runs that skip at least MIN_SKIP% at threshold 0.5 are
# calibrated (the gates of the others are saturated open). The grid adds low thresholds to calibrate's own spacing:
# the gates of longer HRL runs are confident, so their budget is crossed between 0 and 0.1.
BUDGET, MIN_SKIP = 30, 10
GRID = ["0", "0.005", "0.01", "0.02", "0.03", "0.04", "0.05", "0.06", "0.08", "0.1", "0.15"]
GRID += ["0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]


def calibrate(
    rs: list[dict], out: Path, data: str, stages=("hrl",), min_skip: float | None = MIN_SKIP, budget: int = BUDGET
) -> None:
    """Calibrate every finished run of ``stages`` that skips at least ``min_skip``% (any, with None) and has no
    calibrated test result yet to ``budget``% fewer MACs, one at a time; the result
    (``calibrated_{budget}_test.json``: the eval JSON and the commands that made it) is written atomically."""
    for r in rs:
        run = out / r["name"]
        test, cal = run / f"calibrated_{budget}_test.json", run / f"calibrated_{budget}.pt"
        if r["stage"] not in stages or not done(out, r["name"]) or test.exists():
            continue
        saved = json.loads((run / "summary.json").read_text())["test"]["macs_reduction"]
        if min_skip is not None and saved < min_skip:
            continue
        c = ["skipnet", "calibrate", str(run / "best.pt"), "--data", data, "--target-reduction", str(budget)]
        c += ["--grid", *GRID, "--out", str(cal), "--force", "--json"]
        e = ["skipnet", "eval", str(cal), "--data", data, "--json"]
        print("+", portable(c), flush=True)
        if subprocess.run(c, stdout=subprocess.DEVNULL).returncode != 0:  # e.g. no threshold meets the budget
            print(f"{r['name']}: not calibrated", flush=True)
            continue
        got = json.loads(subprocess.run(e, check=True, capture_output=True, text=True).stdout)
        tmp = test.with_suffix(".tmp")
        tmp.write_text(json.dumps({"command": portable(c) + " && " + portable(e), **got}, indent=2))
        tmp.replace(test)


def calibrated_rows(rs: list[dict], out: Path, budget: int = BUDGET) -> dict[str, dict]:
    got = {}
    for r in rs:
        test = out / r["name"] / f"calibrated_{budget}_test.json"
        if not test.exists():
            continue
        t = json.loads(test.read_text())
        name = f"{r['name']}@{budget}%"
        got[name] = {
            "name": name,
            "stage": r["stage"],
            "alpha": r.get("alpha"),
            "distill": r.get("distill", False),
            "threshold": t["threshold"],
            "command": t["command"],
            **test_fields(t),
            "skip_ratio_per_block": [round(v, 4) for v in t.get("skip_ratio_per_block", [])],
        }
    return got


def rows(rs: list[dict], out: Path) -> dict[str, dict]:
    got = {}
    for r in rs:
        if not done(out, r["name"]):
            continue
        s = json.loads((out / r["name"] / "summary.json").read_text())
        got[r["name"]] = {
            "name": r["name"],
            "stage": r["stage"],
            "alpha": r.get("alpha"),
            "distill": r.get("distill", False),
            "command": portable(r["cmd"]),
            **test_fields(s["test"]),
            "skip_ratio_per_block": [round(v, 4) for v in s["test"].get("skip_ratio_per_block", [])],
        }
    base = got.get("base")
    for r in got.values():  # the shallower plain networks' saving against the plain ResNet-38
        if base and r is not base and r["stage"] == "base":
            r["macs_reduction"] = round(100 * (1 - r["macs"] / base["macs"]), 2)
    return got


def headline(got: dict[str, dict]) -> dict:
    """The pick: the largest saving within 0.5 points of the plain network at >= 30% fewer MACs; failing that,
    the closest to it among those saving >= 30%; failing that, the one saving the most."""
    base = got.get("base")
    cands = [r for r in got.values() if r["stage"] in ("sp", "hrl")]
    if not base or not cands:
        return {}
    gap = lambda r: base["accuracy"] - r["accuracy"]  # noqa: E731
    ok = [r for r in cands if r["macs_reduction"] >= 30 and gap(r) <= 0.5]
    cheap = [r for r in cands if r["macs_reduction"] >= 30]
    best = (
        max(ok, key=lambda r: r["macs_reduction"])
        if ok
        else (min(cheap, key=gap) if cheap else max(cands, key=lambda r: r["macs_reduction"]))
    )
    return {
        "group": "30 epochs",
        "base_accuracy": base["accuracy"],
        "skipnet_accuracy": best["accuracy"],
        "macs_reduction": best["macs_reduction"],
        "alpha": best["alpha"],
        "run": best["name"],
        "base_run": "base",
        "gap_points": round(gap(best), 2),
        "reproduced": bool(ok),
    }


def table(got: dict[str, dict]) -> str:
    lines = ["| run | stage | α | distill | threshold | test accuracy | MACs/img | MACs saved vs ResNet-38 | CP |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in got.values():
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(
            f"| `{r['name']}` | {r['stage']} | {alpha} | {'yes' if r['distill'] else ''} | {r.get('threshold', 0.5):g} "
            f"| {r['accuracy']:.2f}% | {r['macs'] / 1e6:.1f} M | {r['macs_reduction']:.1f}% "
            f"| {r['computation_percentage']:.1f}% |"
        )
    return "\n".join(lines)


# The static alternative without training: the plain ResNet-38 with the same blocks removed for every image
# (skipnet.analysis.static_lesion, chosen on 1,000 validation images), up to LESION_DROP blocks (~57% fewer MACs).
LESION_DROP = 10


def write(got: dict[str, dict], head: dict, command: str, curve: dict | None) -> None:
    stamp = dt.date.today().isoformat()
    payload = {"date": stamp, "command": command, "headline": head, "runs": list(got.values()), "lesion": curve}
    (RESULTS / "headline30_cifar10_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = [f"Run on {stamp}: `{command}`", "", table(got), ""]
    if curve:
        md += ["Static lesion of `base` (the same blocks removed for every image; test split):", ""]
        md += [lesion_table([curve]), ""]
    md += [f"- `{r['name']}`: `{r['command']}`" for r in got.values()]
    (RESULTS / "headline30_cifar10_cpu.md").write_text("\n".join(md) + "\n")
    repro = RESULTS / "reproduce_cifar10_cpu.json"
    if head and repro.exists():
        d = json.loads(repro.read_text())
        if d.get("headline", {}).get("group") != head["group"]:
            d["headline_short"] = d.get("headline", {})
        d["headline"] = head
        repro.write_text(json.dumps(d, indent=2))
    print("\n".join(md))
    print(json.dumps(head))


def with_earlier(got: dict[str, dict], results: Path) -> dict[str, dict]:
    """``got`` plus the rows of ``results`` (the group's JSON as last written) whose runs did not finish here: the
    run directories are not kept, so a session collecting new runs must not drop the rows of earlier ones. Rows
    keep their earlier order; new ones follow."""
    earlier = json.loads(results.read_text())["runs"] if results.exists() else []
    merged = {r["name"]: got.get(r["name"], r) for r in earlier}
    return merged | {k: v for k, v in got.items() if k not in merged}


def run_group(
    doc: str, default_out: str, make_runs, results: Path, **calibrate_options
) -> tuple[argparse.Namespace, Path, dict]:
    """The command line shared by this script and ``ablations.py``: parse it, train and calibrate what is pending
    (unless ``--no-train``), and return ``(args, out, rows)`` of every finished run, calibrated rows included,
    with the earlier rows of ``results`` whose runs are not here."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=default_out)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", nargs="*", help="train and calibrate only these runs (names: see the runs' list)")
    p.add_argument("--no-train", action="store_true", help="only collect the finished runs and write the results")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rs = make_runs(out, args.data)
    if not args.no_train:
        chosen = [r for r in rs if not args.only or r["name"] in args.only]
        train(chosen, out, args.jobs)
        calibrate(chosen, out, args.data, **calibrate_options)
    return args, out, with_earlier(rows(rs, out) | calibrated_rows(rs, out), results)


def main() -> int:
    results = RESULTS / "headline30_cifar10_cpu.json"
    args, out, got = run_group(__doc__, "runs/h30", runs, results)
    if done(out, "base"):
        curve = lesion("base", out, args.data, max_drop=LESION_DROP)
    else:  # the base trained in an earlier session: keep its curve
        curve = json.loads(results.read_text()).get("lesion") if results.exists() else None
    write(got, headline(got), portable(["python", *sys.argv]), curve)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
