"""Per-image routing against the best static route of the same weights (issue 31, beyond the paper).

A SkipNet that routes per image should beat the same network with one route for every image at the same compute:
else its policy is a pruning. For each shipped model this evaluates the policy greedily at its own threshold on the
test split, then removes gated blocks one at a time for every image alike, each time the block whose removal raises
the mean cross-entropy on ``--select`` (500) validation images spread over the split the least
(``skipnet.analysis.static_lesion``: forced decisions, no gate computed; the best static choice of that backbone,
found greedily), until the policy's saving is passed. The static accuracy at that saving is read off the curve,
linear between the two removals around it (the only two evaluated on the test split).

The difference splits the gap of issue 31's criterion 2 in two: what the policy adds over a pruning of its own
backbone (policy minus static), and what sharing one backbone among many routes costs against plain networks
trained on one route (static minus the matched plain line of docs/routing.md).

    python benchmarks/own_static.py --data ../shared/data/cifar10-jpeg.tar.gz

Results: ``benchmarks/results/own_static.json`` and ``.md`` (``--models`` rewrites those rows only).
"""

from __future__ import annotations

import argparse
import copy
import time
from itertools import islice
from pathlib import Path

import torch

from skipnet.analysis import data_for_checkpoint, eval_loader, forced_run, static_lesion
from skipnet.bench import calibrate_batchnorm
from skipnet.checkpoint import load_model
from skipnet.cost import cost_model
from skipnet.evaluate import evaluate
from skipnet.results import command_line, fmt, frontier, markdown, recorded, spread_batches, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SELECTION = "spread"  # how the validation images that choose each removal are picked (results.spread_batches)
MODELS = (
    "cifar10_aig_gate_38_ordered",
    "cifar10_aig_gate_38_adapted",
    "cifar10_aig_gate_38_long",
    "cifar10_aig_gate_38_detach",
    "cifar10_aig_gate_38_budgets",
    "cifar10_rnn_gate_38",
)


def measure(name: str, data: str, max_drop: int | None, select: int, recalibrate: int, recorded_row: dict | None):
    """One model's row: its policy on the test split; two static alternatives on its own weights, each at the
    policy's saving on the test split, as they are and with BatchNorm recalibrated to the route: the static lesion
    (blocks removed greedily by validation loss; curve and figures taken from ``recorded_row`` when it has them)
    and the policy's own most executed blocks (the pruning its skip rates imply)."""
    model, ckpt = load_model(f"pretrained:{name}")
    bundle = data_for_checkpoint(ckpt, model, data, batch_size=500)
    t0, cost = time.time(), cost_model(model)
    policy = evaluate(model, eval_loader(bundle, "test"), cost)
    row = {
        "name": name,
        "accuracy": round(policy["accuracy"], 2),
        "macs_reduction": round(policy["macs_reduction"], 2),
        "distinct_routes": policy["routes"]["distinct_routes"],
        "executed_std": round(policy["routes"]["executed_std"], 2),
        "skip_ratio_per_block": policy["skip_ratio_per_block"],
    }
    old = recorded_row or {}
    if old.get("selection") == SELECTION and old.get("select_images", 0) >= select and "static_accuracy" in old:
        row |= {k: old[k] for k in ("selection", "select_images", "lesion", "static_accuracy", "static_bn_accuracy")}
        row["recalibration_images"] = old["recalibration_images"]
    else:
        picked = spread_batches(bundle, "val", select)
        drops = min(model.num_gates, max_drop or int(row["macs_reduction"] // 5) + 2)  # a block: 5.7% of ResNet-38
        row |= {"selection": SELECTION, "select_images": sum(len(y) for _, y in picked)}
        row["lesion"] = static_lesion(model.eval(), picked, cost, max_drop=drops)
        row |= static_at(model, bundle, row["lesion"], row["macs_reduction"], recalibrate)
    row["rate_routes"] = rate_routes(row["skip_ratio_per_block"], cost)
    rated = static_at(model, bundle, row["rate_routes"], row["macs_reduction"], recalibrate)
    row |= {"rate_accuracy": rated["static_accuracy"], "rate_bn_accuracy": rated["static_bn_accuracy"]}
    for key in ("static_accuracy", "static_bn_accuracy", "rate_accuracy", "rate_bn_accuracy"):
        gap = "policy_minus_" + key.removesuffix("_accuracy")
        row[gap] = None if row[key] is None else round(row["accuracy"] - row[key], 2)
    return row | {"seconds": round(time.time() - t0, 1)}


def rate_routes(skip_ratio: list[float], cost) -> list[dict]:
    """The static routes that skip the policy's most skipped blocks, none first, one more each step (ties in block
    order), with their MACs reduction (no gate computed)."""
    order = sorted(range(len(skip_ratio)), key=lambda i: -skip_ratio[i])
    points = []
    for d in range(len(order) + 1):
        keep = torch.ones(1, len(order))
        keep[0, order[:d]] = 0.0
        macs = cost.macs_per_image(keep, include_gates=False).item()
        points.append({"dropped": sorted(order[:d]), "macs_reduction": cost.reduction(macs)})
    return points


def static_at(model, bundle, points: list[dict], saving: float, recalibrate: int) -> dict:
    """The test accuracy of the static routes of ``points`` around ``saving``, as they are (``accuracy``) and with
    every BatchNorm's statistics recalibrated on that route over ``recalibrate`` training images, shuffled and
    augmented as training takes them (``accuracy_bn``; unaugmented images make every network worse, the plain
    ResNet-38 too: its statistics were trained on padded crops), and each linear between them at ``saving``; None
    where the curve ends before it."""
    steps = [p["macs_reduction"] for p in points]
    end = next((i for i in range(1, len(steps)) if steps[i - 1] <= saving <= steps[i]), None)
    if end is None:
        return {"static_accuracy": None, "static_bn_accuracy": None, "recalibration_images": recalibrate}
    test = eval_loader(bundle, "test")
    loader = bundle.split("train")
    train = [x for x, _ in islice(loader, -(-recalibrate // loader.batch_size))]
    for p in points[end - 1 : end + 1]:
        keep = torch.ones(1, model.num_gates)
        keep[0, p["dropped"]] = 0.0
        p["accuracy"] = round(forced_run(model.eval(), test, keep)[1], 2)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            calibrate_batchnorm(twin, train, keep=keep)
        p["accuracy_bn"] = round(forced_run(twin, test, keep)[1], 2)
    pair = points[end - 1 : end + 1]
    return {
        "static_accuracy": round(frontier([(p["macs_reduction"], p["accuracy"]) for p in pair], saving), 2),
        "static_bn_accuracy": round(frontier([(p["macs_reduction"], p["accuracy_bn"]) for p in pair], saving), 2),
        "recalibration_images": sum(len(x) for x in train),
    }


def best_gap(row: dict) -> float | None:
    """The policy's accuracy minus the most accurate of its four static alternatives (None if one is missing)."""
    keys = ("static_accuracy", "static_bn_accuracy", "rate_accuracy", "rate_bn_accuracy")
    found = [row.get(k) for k in keys]
    return None if None in found else round(row["accuracy"] - max(found), 2)


def table(rows: list[dict]) -> str:
    head = ["model", "policy (test)", "% fewer MACs", "routes", "std", "lesion", "lesion, BN", "policy's top blocks"]
    head += ["the same, BN", "policy − best static"]
    body = [
        [
            f"`{r['name']}`",
            fmt(r["accuracy"]),
            fmt(r["macs_reduction"], ".1f"),
            str(r["distinct_routes"]),
            fmt(r["executed_std"]),
            fmt(r["static_accuracy"]),
            fmt(r["static_bn_accuracy"]),
            fmt(r.get("rate_accuracy")),
            fmt(r.get("rate_bn_accuracy")),
            fmt(best_gap(r), "+.2f"),
        ]
        for r in rows
    ]
    return markdown(head, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10 (an ImageFolder root or its .tar.gz)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="shipped models (default: the CIFAR-10 ones)")
    p.add_argument("--max-drop", type=int, help="blocks removed at most (default: enough to pass the policy's saving)")
    p.add_argument("--select", type=int, default=500, help="validation images that choose each removal")
    p.add_argument("--recalibrate", type=int, default=2000, help="training images that recalibrate BatchNorm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "own_static.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = recorded(out, key="models")
    for name in args.models:
        rows[name] = measure(name, args.data, args.max_drop, args.select, args.recalibrate, rows.get(name))
        payload = {"command": command_line(__file__, argv, REPO), "date": time.strftime("%Y-%m-%d")}
        write_json(out, payload | {"models": list(rows.values())})
        out.with_suffix(".md").write_text(table(list(rows.values())) + "\n")
        print(table([rows[name]]).splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
