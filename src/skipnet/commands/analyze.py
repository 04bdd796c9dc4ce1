"""``skipnet analyze CKPT --data SPEC --out DIR``: figures and a report of a model's skipping (paper §4.2).

Writes ``tradeoff.png``, ``skip_ratio_per_block.png``, ``easy_hard.png``, ``per_class.png``,
``multiscale.png``, ``executed_blocks_hist.png``, the numbers behind them in ``analysis.json`` and a
``report.md`` that embeds the figures with the key numbers. The directory is written whole or not at all
(:func:`skipnet.fileio.atomic_directory`): an interruption or a full disk leaves an earlier one as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from skipnet.analysis import (
    DEFAULT_SCALES,
    DEFAULT_THRESHOLDS,
    analyze,
    checkpoint_label,
    data_for_checkpoint,
    eval_loader,
    eval_point,
    report_markdown,
)
from skipnet.checkpoint import checkpoint_stats, data_record, load_model, recorded_val_split, require_same_classes
from skipnet.commands._common import (
    add_eval_args,
    add_source_args,
    check_count,
    check_out,
    check_value,
    open_for_eval,
    require_learned_gates,
)
from skipnet.cost import cost_model, fewer_macs
from skipnet.errors import SkipnetError
from skipnet.evaluate import eval_mode_for, run_eval
from skipnet.fileio import atomic_directory, foreign_files, json_safe
from skipnet.gated import GateMode
from skipnet.registry import min_image_size
from skipnet.trainconfig import RL_STAGES

log = logging.getLogger(__name__)

MAX_SCALE = 4.0  # input scales of Fig. 8: the paper's go to 2; 4 is 16x the pixels of every image
MAX_IMAGES = 64  # images in each easy/hard grid

FIGURES = {
    "tradeoff.png": "Accuracy vs MACs per image: threshold sweep, plain ResNet and other checkpoints",
    "skip_ratio_per_block.png": "Skip ratio per gated block, by stage (cf. paper Fig. 10a)",
    "easy_hard.png": "Images executing the fewest and the most blocks (cf. paper Fig. 7)",
    "per_class.png": "Skipping vs accuracy per class (cf. paper Fig. 9)",
    "multiscale.png": "Executed blocks at other input scales relative to scale 1 (cf. paper Fig. 8)",
    "executed_blocks_hist.png": "Executed blocks per image",
}
OWNED = (*FIGURES, "analysis.json", "report.md")  # all that --out holds: it is written whole or not at all


DOCS = "docs/routing.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="figures and a report of a model's skipping behaviour (paper §4.2)",
        description="Evaluate a gated checkpoint greedily at its own threshold and write six figures, "
        "analysis.json and report.md into --out.",
    )
    p.add_argument(
        "checkpoint",
        help="a gated checkpoint: a .pt from 'skipnet train' or 'skipnet calibrate', a .safetensors export, or "
        "pretrained:NAME",
    )
    add_source_args(p)
    p.add_argument("--out", required=True, help="output directory for the figures, analysis.json and report.md")
    p.add_argument("--split", choices=["test", "val"], default="test", help="which split to analyse")
    p.add_argument("--base", default=None, help="a plain-ResNet checkpoint: its point on the trade-off plot")
    p.add_argument("--compare", nargs="+", default=[], metavar="CKPT", help="other checkpoints to place on the plot")
    add_eval_args(p, "analyse", "print the headline numbers as one JSON object")
    p.add_argument(
        "--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS), help="gate thresholds to sweep"
    )
    p.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES), help="input scales (Fig. 8)")
    p.add_argument("--images", type=int, default=16, help="images in each easy/hard grid")
    p.set_defaults(func=run)


def _bundle_key(ckpt: dict[str, Any], model: Any, split: str) -> tuple:
    """Which checkpoints may share one loading of ``--data``: the same normalisation and image size, and on the
    validation split also the same data record and fingerprint, so that each is scored on its *own* validation
    images, checked against its own fingerprint (data loaded for one checkpoint checks its split once)."""
    key: tuple = (checkpoint_stats(ckpt), model.config.image_size)
    if split == "val":
        record = {k: v for k, v in data_record(ckpt).items() if k not in ("classes", "mean", "std")}
        key += (
            json.dumps(record, sort_keys=True, default=str),
            json.dumps(ckpt.get("data_fingerprint"), sort_keys=True),
        )
    return key


def _other_point(
    path: str, args: argparse.Namespace, main_ckpt: dict[str, Any], bundles: dict, device, plain: bool = False
) -> dict:
    """Evaluate another checkpoint on the same split as the analysed one: greedy at its own threshold, or with
    every block on (``plain``: the ``--base`` point)."""
    model, ckpt = load_model(path, map_location="cpu")
    if model.config.num_classes != main_ckpt["arch"]["num_classes"]:
        raise SkipnetError(
            f"{path} has {model.config.num_classes} classes; the analysed checkpoint has "
            f"{main_ckpt['arch']['num_classes']}"
        )
    key = _bundle_key(ckpt, model, args.split)
    if key not in bundles:
        bundles[key] = data_for_checkpoint(
            ckpt, model, args.data, data_dir=args.data_dir, batch_size=args.batch_size, limit=args.limit
        )
    require_same_classes(model, bundles[key], path, data_record(ckpt).get("classes"))
    model.to(device).to(memory_format=torch.channels_last)
    cost = cost_model(model)
    mode = GateMode.ALL_ON if plain else eval_mode_for(model)
    rec = run_eval(model, eval_loader(bundles[key], args.split, source=path), cost, mode=mode)
    point = eval_point(rec, cost, model.config.num_classes)  # gates counted as rec.gates_spent says
    label = checkpoint_label(path, ckpt)
    if plain:  # a gated checkpoint as --base is its own network with every block on
        label = f"plain ResNet ({label})" if model.gates is None else f"all blocks on ({label})"
    elif mode != GateMode.GREEDY:  # run as it was validated: every block (stage base) or at random (SDV)
        label = f"{label}, {mode.value}"
    return {"path": path, "label": label, "mode": mode.value} | point


def _checked_out(args: argparse.Namespace) -> Path:
    """Check the options before anything is loaded; returns ``--out``."""
    if args.limit is not None and args.limit <= 0:
        raise SkipnetError(f"--limit must be positive, got {args.limit}")
    check_count("--images", args.images, 1, MAX_IMAGES)
    for scale in args.scales:
        check_value("scales", scale, lambda v: 0 < v <= MAX_SCALE, f"in (0, {MAX_SCALE:g}]")
    check_count("--scales", len(args.scales), 1, 32, " values")
    check_count("--thresholds", len(args.thresholds), 1, 1000, " values")
    check_value("batch_size", args.batch_size, lambda v: v > 0, "positive")
    for t in args.thresholds:
        check_value("thresholds", t, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    for extra in [args.base, *args.compare]:
        if extra is not None and not extra.startswith("pretrained:") and not Path(extra).is_file():
            raise SkipnetError(f"checkpoint {extra!r} does not exist")
    check_out(args.out)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SkipnetError(f"--out {out} is a file; analyze writes a directory of figures, so give a directory name")
    foreign = foreign_files(out, OWNED)
    if foreign:  # analyze replaces its directory whole: anyone else's files there would go with it
        raise SkipnetError(
            f"--out {out} holds files analyze did not write ({', '.join(foreign[:3])}); give a new directory or an "
            "earlier analyze output"[:300]
        )
    return out


def write_text(path: Path, text: str) -> None:
    """One file of the analysis (in the staging directory)."""
    path.write_text(text, encoding="utf-8")


def _write_figures(out: Path, numbers: dict, result: Any, model: Any, split: str) -> None:
    """The six figures of :data:`FIGURES` into ``out``."""
    from skipnet import plots  # matplotlib: imported by the commands that draw, when they draw

    base, others = numbers["base"], numbers["others"][1:] if numbers["base"] else numbers["others"]
    name = numbers["checkpoint"]["label"]
    n = numbers["num_gates"]
    plots.plot_tradeoff(
        out / "tradeoff.png",
        macs_all_on=numbers["cost"]["macs_all_on"],
        sweep=numbers["threshold_sweep"],
        sweep_label=f"{name}: threshold sweep",
        own=numbers["main"],
        own_label=f"{name} at t={model.threshold:.3g}",
        base=base,
        base_label=base["label"] if base else "plain ResNet",
        others=[(o["label"], o) for o in others],
        title=f"Accuracy vs computation, {model.config.name} ({split} split)",
    )
    plots.plot_skip_ratio_per_block(
        out / "skip_ratio_per_block.png",
        numbers["skip_ratio_per_block"],
        numbers["block_stage"],
        title=f"Skip ratio per block, {name} ({split}, {numbers['main']['images']} images)",
    )
    plots.plot_easy_hard(
        out / "easy_hard.png",
        result.easy_images,
        numbers["easy_images"],
        result.hard_images,
        numbers["hard_images"],
        n + 1,
        title=f"Easy and hard images, {name}",
    )
    plots.plot_per_class(
        out / "per_class.png",
        numbers["per_class"],
        numbers["easiest_class"],
        numbers["easiest_class_executed_counts"],
        numbers["hardest_class"],
        numbers["hardest_class_executed_counts"],
        title=f"Skipping and accuracy per class, {name}",
    )
    plots.plot_multiscale(out / "multiscale.png", numbers["multiscale"], title=f"Multi-scale inputs, {name}")
    plots.plot_executed_hist(
        out / "executed_blocks_hist.png",
        list(numbers["executed_blocks_counts"].values()),
        title=f"Executed blocks per image, {name} ({split})",
        mean=numbers["main"]["executed_blocks_mean"],
    )


def _usable_scales(scales: list[float], config) -> list[float]:
    """The scales whose images the network takes (at least ``min_image_size`` pixels: under it the feature maps
    vanish and the figures mean nothing); each dropped one is said on stderr, none left is a one-line error."""
    least, size = min_image_size(config), config.image_size
    kept = [s for s in scales if round(size * s) >= least]
    for s in scales:
        if s not in kept:
            print(
                f"skipnet analyze: warning: --scales {s:g} skipped: {size}-px images would be {round(size * s)} px, "
                f"under the {least} px {config.name} takes",
                file=sys.stderr,
            )
    if not kept:
        raise SkipnetError(
            f"no --scales value leaves {config.name} its {least} px; use scales of at least {least / size:g}"
        )
    return kept


def run(args: argparse.Namespace) -> int:
    out = _checked_out(args)

    def check(model, ckpt) -> None:
        require_learned_gates(model, ckpt, str(args.checkpoint), "analyze")
        args.scales = _usable_scales(args.scales, model.config)
        if args.split == "val" and not recorded_val_split(ckpt):
            raise SkipnetError(f"{args.checkpoint} was trained without a validation split; use --split test")

    device, model, ckpt, data = open_for_eval(args, check=check, limit=args.limit)
    eval_loader(data, args.split, source=args.checkpoint)  # the validation split is the checkpoint's, or one line
    result = analyze(model, data, args.split, thresholds=args.thresholds, scales=args.scales, k=args.images)
    numbers = result.numbers
    cfg = ckpt.get("train_config") or {}
    stage = ckpt.get("stage") or cfg.get("stage")
    numbers["checkpoint"] = {
        "path": args.checkpoint,
        "label": checkpoint_label(args.checkpoint, ckpt),
        "stage": stage,
        "alpha": cfg.get("alpha") if stage in RL_STAGES else None,
        "data": args.data,
        "calibration": ckpt.get("calibration"),
        "mode": GateMode.GREEDY.value,  # analyze runs the learned gates (require_learned_gates)
    }

    bundles = {_bundle_key(ckpt, model, args.split): data}
    base = _other_point(args.base, args, ckpt, bundles, device, plain=True) if args.base else None
    others = [_other_point(p, args, ckpt, bundles, device) for p in args.compare]
    numbers["base"] = base
    numbers["others"] = ([base] if base else []) + others
    if base:
        numbers["main"]["accuracy_vs_base"] = numbers["main"]["accuracy"] - base["accuracy"]

    title = f"SkipNet analysis: {numbers['checkpoint']['label']}"

    def fill(staging: Path) -> None:  # every file of --out, into a staging directory that then replaces it whole
        _write_figures(staging, numbers, result, model, args.split)
        write_text(staging / "analysis.json", json.dumps(json_safe(numbers), indent=2))
        write_text(staging / "report.md", report_markdown(numbers, FIGURES, title))

    atomic_directory(out, fill, OWNED)

    m = numbers["main"]
    if args.json:
        print(json.dumps(json_safe({"out": str(out), "figures": list(FIGURES)} | m)))
        return 0
    print(
        f"{args.checkpoint} on {data.name} {args.split} ({m['images']} images): accuracy {m['accuracy']:.2f}%, "
        f"{m['macs_mean']:.4g} MACs/image ({fewer_macs(m['macs_reduction'])}), CP {m['computation_percentage']:.1f}%"
    )
    print(f"wrote {out / 'report.md'}, analysis.json and {len(FIGURES)} figures")
    return 0
