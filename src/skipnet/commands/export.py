"""``skipnet export CKPT OUT [--format safetensors|pt2|onnx]``: a checkpoint for deployment.

- ``safetensors``: the weights only (no optimizer, no pickled Python) with, in the string metadata, the
  architecture (JSON ``ArchConfig``), the gate threshold, keep ratio and mode, and the data normalisation and
  classes; ``skipnet eval``, ``bench``, ``calibrate`` and ``train --init`` read it like a ``.pt`` checkpoint.
- ``pt2`` (``torch.export``) and ``onnx``: a graph that still skips (see :mod:`skipnet.export`). ``--graph
  conditional`` (the default, batch 1) makes every gated block an ``If`` on its gate's decision, so the runtime
  never runs a skipped block's convolutions; ``routed`` (any batch) gathers the executing images per block
  (``NonZero`` / ``Gather`` / ``ScatterND``), falling back to ``masked`` with a warning where it does not export;
  ``plain`` is the ungated ResNet of the same backbone. The graph takes images in [0, 1] and normalises them
  itself; the threshold is a constant of the graph; both are in its metadata. The exported program is run on
  probe images and must match the eager greedy model (decisions, classes, logits within 1e-4) before anything
  is written.

The format comes from OUT's extension unless ``--format`` is given. Written atomically; an existing OUT is
refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from skipnet.checkpoint import export_safetensors, load_checkpoint, model_from_checkpoint
from skipnet.commands._common import check_count, check_out
from skipnet.errors import SkipnetError
from skipnet.export import FORMATS, GRAPHS, export_model, format_for, graph_for, write_export

MAX_PROBES = 64  # probe batches: each is a run of the exported program and of the eager model


DOCS = "docs/deploy.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint as .safetensors (weights), .pt2 (torch.export) or .onnx (a graph that skips)",
        description="Export a checkpoint: its weights as safetensors (config, threshold and normalisation in the "
        "metadata), or a torch.export / ONNX graph in which every gated block is a conditional on its gate, so that "
        "skipped blocks are not computed by the runtime. Graphs are checked against the eager model before writing.",
    )
    p.add_argument(
        "checkpoint",
        help="a .pt (or .safetensors) checkpoint written by 'skipnet train' or 'calibrate', or pretrained:NAME",
    )
    p.add_argument("out", help="the file to write: .safetensors, .pt2 or .onnx")
    p.add_argument("--format", choices=FORMATS, default=None, help="the format (default: from OUT's extension)")
    p.add_argument(
        "--graph",
        choices=GRAPHS,
        default=None,
        help="pt2/onnx only: conditional (batch 1, skipped blocks not run), routed (any batch; masked if the "
        "exporter cannot express it), masked (any batch, saves nothing), plain (the ungated ResNet) "
        "(default: conditional, plain for an ungated network)",
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="greedy threshold in the graph (default: the checkpoint's)"
    )
    p.add_argument("--probes", type=int, default=4, help="probe batches the exported graph is checked on")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_out(args.out, "OUT")
    src, dst = Path(args.checkpoint), Path(args.out)
    fmt = format_for(dst, args.format)
    _check_options(args, src, dst, fmt)
    ckpt = load_checkpoint(src)
    model = model_from_checkpoint(ckpt)  # the weights must rebuild the network before they are exported
    if fmt == "safetensors":
        return _write_safetensors(ckpt, src, dst, args)

    from skipnet.evaluate import required_stats

    graph = graph_for(model, args.graph, str(src))
    ex = export_model(
        model,
        fmt,
        graph=graph,
        stats=required_stats(ckpt, src),
        threshold=args.threshold,
        ckpt=ckpt,
        probes=args.probes,
    )
    for note in ex.warnings:
        print(f"skipnet export: warning: {note}", file=sys.stderr)
    write_export(ex, dst, replace=args.force)
    _report(args, ex, model, src, dst, fmt)
    return 0


def _check_options(args: argparse.Namespace, src: Path, dst: Path, fmt: str) -> None:
    """One-line errors for the options and the output path, before anything is loaded."""
    if src.suffix in (".onnx", ".pt2"):
        raise SkipnetError(f"{src} is an export already; give the checkpoint it was exported from (.pt, pretrained:)")
    if dst.is_dir():
        raise SkipnetError(f"{dst} is a directory; give a file name ending in .{fmt}")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise SkipnetError("OUT must differ from the input checkpoint")
    if dst.exists() and not args.force:
        raise SkipnetError(f"{dst} already exists; pass --force to overwrite it")
    if fmt == "safetensors" and (args.graph is not None or args.threshold is not None):
        raise SkipnetError("--graph and --threshold apply to pt2 and onnx exports; a .safetensors file holds weights")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise SkipnetError(f"--threshold must be in [0, 1], got {args.threshold:g}")
    check_count("--probes", args.probes, 1, MAX_PROBES)


def _report(args: argparse.Namespace, ex: Any, model: Any, src: Path, dst: Path, fmt: str) -> None:
    info = {
        "checkpoint": str(src),
        "out": str(dst),
        "format": fmt,
        "graph": ex.graph,
        "mode": ex.meta["mode"],
        "arch": model.config.name,
        "bytes": dst.stat().st_size,
        "threshold": ex.meta["threshold"],
        "batch": ex.meta["batch"],
        "normalize": ex.meta["normalize"],
        "saves_compute": ex.meta["saves_compute"],
        "check": ex.check,
        "warnings": ex.warnings,
    }
    if args.json:
        print(json.dumps(info))
        return
    batch = "batch 1" if ex.meta["batch"] == 1 else "any batch"
    chk = ex.check
    dec = f", {chk['decision_mismatches']} decisions differ" if "decision_mismatches" in chk else ""
    print(
        f"wrote {dst} ({info['arch']}, {ex.graph} graph, mode {info['mode']}, {batch}, "
        + ("" if ex.graph == "plain" else f"threshold {info['threshold'] + 0.0:g}, ")  # a plain graph decides nothing
        + f"{info['bytes']:,} bytes)"
    )
    print(
        f"checked in {chk['runtime']} on {chk['images']} probe images against the eager model: max logit "
        f"difference {chk['max_abs_logit_diff']:.1e}{dec}"
    )
    channels = "RGB" if model.config.in_channels == 3 else f"{model.config.in_channels}-channel"
    print(f"input: float32 {channels} images in [0, 1], (B, C, H, W); normalised inside the graph")


def _write_safetensors(ckpt: dict, src: Path, dst: Path, args: argparse.Namespace) -> int:
    """The weights as safetensors, with the architecture, threshold, gate mode and normalisation in the metadata."""
    try:
        export_safetensors(ckpt, dst, source=src.name, replace=args.force)
    except FileExistsError:
        raise SkipnetError(f"{dst} was written by another process meanwhile; kept (pass --force to replace)") from None
    info = {
        "checkpoint": str(src),
        "out": str(dst),
        "format": "safetensors",
        "arch": ckpt["arch"]["name"],
        "tensors": len(ckpt["state_dict"]),
        "bytes": dst.stat().st_size,
        "threshold": float(ckpt.get("threshold", 0.5)),
        "mode": str(ckpt.get("mode", "greedy")),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {dst} ({info['arch']}, mode {info['mode']}, {info['tensors']} tensors, {info['bytes']:,} bytes)")
    return 0
