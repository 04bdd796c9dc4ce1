"""Draw docs/figures/accuracy_macs.png: test accuracy against multiply-adds saved, CIFAR-10, the 30-epoch group.

Reads only committed results (``benchmarks/results/headline30_cifar10_cpu.json`` and the shipped models'
``src/skipnet/pretrained/index.json``), so it redraws the README's figure without training anything:

    python docs/figures/accuracy_macs.py            # writes docs/figures/accuracy_macs.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HEADLINE = ROOT / "benchmarks" / "results" / "headline30_cifar10_cpu.json"
INDEX = ROOT / "src" / "skipnet" / "pretrained" / "index.json"
PLAIN = {"base_r20": "ResNet-20", "base_r26": "ResNet-26", "base_r32": "ResNet-32", "base": "ResNet-38"}


def draw(out: Path) -> Path:
    runs = {r["name"]: r for r in json.loads(HEADLINE.read_text())["runs"]}
    shipped = json.loads(INDEX.read_text())["models"]["cifar10_rnn_gate_38"]
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    plain = sorted((runs[n]["macs_reduction"], runs[n]["accuracy"], label) for n, label in PLAIN.items())
    ax.plot([p[0] for p in plain], [p[1] for p in plain], "s-", color="0.35", label="plain ResNets (30 epochs)")
    for x, y, label in plain:
        right = x > 0  # the label left of its point, clear of the SkipNets on the right
        ax.annotate(
            label,
            (x, y),
            textcoords="offset points",
            xytext=(-4 if right else 4, -12),
            ha="right" if right else "left",
            fontsize=8,
            color="0.3",
        )
    skip = [r for r in runs.values() if r["stage"] == "hrl" and r["macs_reduction"] > 1 and r["accuracy"] > 80]
    ax.plot(
        [r["macs_reduction"] for r in skip],
        [r["accuracy"] for r in skip],
        "^",
        color="tab:red",
        alpha=0.55,
        label="SkipNet-38, other HRL recipes",
    )
    sdv = runs["sdv_k0.6"]
    ax.plot([sdv["macs_reduction"]], [sdv["accuracy"]], "D", color="tab:green", label="SDV-38 (random skipping)")
    ax.plot(
        [shipped["macs_reduction"]],
        [shipped["accuracy"]],
        "*",
        markersize=16,
        color="tab:red",
        markeredgecolor="k",
        label="pretrained:cifar10_rnn_gate_38",
    )
    ax.set_xlabel("multiply-adds saved against ResNet-38 (%, gates included)")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title("Accuracy against compute, CIFAR-10, 30-epoch schedule (2-core CPU)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".png")))
    print(draw(Path(ap.parse_args().out)))


if __name__ == "__main__":
    main()
