"""``skipnet export CKPT OUT.safetensors``: the weights as safetensors, for deployment and safe exchange.

The file holds the model's tensors only (no optimizer, no pickled Python) and, in its string metadata, the
architecture (JSON ``ArchConfig``), the gate threshold, keep ratio and mode, and the data normalisation and
classes; ``skipnet eval``, ``bench``, ``calibrate`` and ``train --init`` read it like a ``.pt`` checkpoint.
Written atomically; an existing OUT is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from skipnet.checkpoint import export_safetensors, load_checkpoint, model_from_checkpoint
from skipnet.errors import SkipnetError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint's weights as .safetensors (config and threshold in the metadata)",
        description="Export the weights of a checkpoint as safetensors, with the architecture, threshold and data "
        "normalisation in the file's metadata. The result loads without unpickling anything.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint written by 'skipnet train' or 'skipnet calibrate'")
    p.add_argument("out", help="the file to write; must end in .safetensors")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.checkpoint), Path(args.out)
    if dst.suffix != ".safetensors":
        raise SkipnetError(f"{dst} must end in .safetensors (e.g. {dst.with_suffix('.safetensors').name})")
    if dst.is_dir():
        raise SkipnetError(f"{dst} is a directory; give a file name ending in .safetensors")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise SkipnetError("OUT must differ from the input checkpoint")
    if dst.exists() and not args.force:
        raise SkipnetError(f"{dst} already exists; pass --force to overwrite it")
    ckpt = load_checkpoint(src)
    model_from_checkpoint(ckpt)  # the weights must rebuild the network before they are exported
    export_safetensors(ckpt, dst, source=src.name)
    info = {
        "checkpoint": str(src),
        "out": str(dst),
        "arch": ckpt["arch"]["name"],
        "tensors": len(ckpt["state_dict"]),
        "bytes": dst.stat().st_size,
        "threshold": float(ckpt.get("threshold", 0.5)),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {dst} ({info['arch']}, {info['tensors']} tensors, {info['bytes']:,} bytes)")
    return 0
