"""Per-image routing against the best static route of the same weights (issue 31, beyond the paper).

A SkipNet that routes per image should beat the same network with one route for every image at the same compute:
else its policy is a pruning. For each shipped model this evaluates the policy greedily at its own threshold on the
test split, then removes gated blocks one at a time for every image alike, each time the block whose removal raises
the mean cross-entropy on the first ``--select`` (500) validation images the least
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
import time
from pathlib import Path

import torch

from skipnet.analysis import data_for_checkpoint, eval_loader, forced_run, static_lesion
from skipnet.checkpoint import load_model
from skipnet.cost import cost_model
from skipnet.evaluate import evaluate
from skipnet.results import command_line, fmt, frontier, markdown, recorded, validation_batches, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = (
    "cifar10_aig_gate_38_ordered",
    "cifar10_aig_gate_38_adapted",
    "cifar10_aig_gate_38_long",
    "cifar10_aig_gate_38_detach",
    "cifar10_aig_gate_38_budgets",
    "cifar10_rnn_gate_38",
)


def measure(name: str, data: str, max_drop: int | None, select: int) -> dict:
    """One model's row: its policy on the test split, its own backbone's static lesion curve (chosen on
    validation), the test accuracy of the two static routes around the policy's saving, the difference."""
    model, ckpt = load_model(f"pretrained:{name}")
    bundle = data_for_checkpoint(ckpt, model, data, batch_size=500)
    t0, test, cost = time.time(), eval_loader(bundle, "test"), cost_model(model)
    policy = evaluate(model, test, cost)
    saving = policy["macs_reduction"]
    picked = validation_batches(bundle, select)
    drops = min(model.num_gates, max_drop or int(saving // 5) + 2)  # a CIFAR block is 5.7% of ResNet-38's MACs
    points = static_lesion(model.eval(), picked, cost, max_drop=drops)
    steps = [p["macs_reduction"] for p in points]
    end = next((i for i in range(1, len(steps)) if steps[i - 1] <= saving <= steps[i]), None)
    static = None  # the curve ends before the policy's saving
    if end is not None:
        for p in points[end - 1 : end + 1]:
            keep = torch.ones(1, model.num_gates)
            keep[0, p["dropped"]] = 0.0
            p["accuracy"] = forced_run(model, test, keep)[1]
        static = frontier([(p["macs_reduction"], p["accuracy"]) for p in points[end - 1 : end + 1]], saving)
    return {
        "name": name,
        "accuracy": round(policy["accuracy"], 2),
        "macs_reduction": round(saving, 2),
        "distinct_routes": policy["routes"]["distinct_routes"],
        "executed_std": round(policy["routes"]["executed_std"], 2),
        "static_accuracy": None if static is None else round(static, 2),
        "policy_minus_static": None if static is None else round(policy["accuracy"] - static, 2),
        "select_images": sum(len(y) for _, y in picked),
        "lesion": points,
        "seconds": round(time.time() - t0, 1),
    }


def table(rows: list[dict]) -> str:
    head = ["model", "policy (test)", "% fewer MACs", "routes", "std", "static route, same weights", "policy − static"]
    body = [
        [
            f"`{r['name']}`",
            fmt(r["accuracy"]),
            fmt(r["macs_reduction"], ".1f"),
            str(r["distinct_routes"]),
            fmt(r["executed_std"]),
            fmt(r["static_accuracy"]),
            fmt(r["policy_minus_static"], "+.2f"),
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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "own_static.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = recorded(out, key="models")
    for name in args.models:
        rows[name] = measure(name, args.data, args.max_drop, args.select)
        payload = {"command": command_line(__file__, argv, REPO), "date": time.strftime("%Y-%m-%d")}
        write_json(out, payload | {"models": list(rows.values())})
        out.with_suffix(".md").write_text(table(list(rows.values())) + "\n")
        print(table([rows[name]]).splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
