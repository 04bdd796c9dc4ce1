"""``skipnet predict MODEL IMAGES...``: the class of every image, and the blocks and MACs it cost (issue 32).

MODEL is a checkpoint (``.pt``, ``.safetensors``, a ``save_pretrained`` directory, ``pretrained:NAME``), a
``.pt2`` program or an ``.onnx`` graph written by ``skipnet export``; IMAGES are files, folders (recursive) and
``.tar`` / ``.tar.gz`` / ``.zip`` archives. See :mod:`skipnet.predict`. A progress bar on a terminal, one line
on stderr per unreadable input (skipped, listed again at the end); the exit status is 2 only when nothing could be
predicted or for a user error. ``--out`` writes CSV or JSON lines atomically; without it a table is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from skipnet.commands._common import MAX_THREADS, check_count, check_out
from skipnet.errors import SkipnetError

MAX_BATCH = 4096
SHOWN_SKIPS = 10  # the end-of-run list names this many skipped inputs, then counts the rest


DOCS = "docs/deploy.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict the class of image files, folders or archives; blocks executed and MACs per image",
        description="Predict the class of every image with a checkpoint, pretrained:NAME, or a graph written by "
        "'skipnet export' (.pt2, .onnx), in the mode it was trained and validated in; report its probability, the "
        "gated blocks it executed and the MACs it cost.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a .pt checkpoint, a .safetensors export, pretrained:NAME, or a .pt2 / .onnx file of 'skipnet export'",
    )
    p.add_argument(
        "images", metavar="IMAGES", nargs="+", help="image files, folders (searched recursively), .tar(.gz) or .zip"
    )
    p.add_argument("--out", default=None, help="write the predictions to this .csv or .jsonl file (atomically)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (a conditional graph: 1)")
    p.add_argument("--top-k", type=int, default=1, help="also report the K most probable classes")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's and ONNX Runtime's own, all cores)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="an .onnx MODEL: run this many ONNX Runtime sessions at once, each on a shard of every batch (throughput "
        "on several cores; each with --threads threads, 1 unless given)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random decisions of a stochastic-depth network")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from skipnet.predict import (
        MAX_TOP_K,
        expand_inputs,
        is_export,
        load_predictor,
        output_format,
        predict,
        write_predictions,
    )

    args.model, args.out = expand_user(args.model), expand_user(args.out)  # where the checks look, it is written

    check_count("--batch-size", args.batch_size, 1, MAX_BATCH)
    check_count("--top-k", args.top_k, 1, MAX_TOP_K)
    check_count("--threads", args.threads, 1, MAX_THREADS)
    check_count("--workers", args.workers, 1, MAX_THREADS)
    if args.workers > 1 and not is_export(args.model, ".onnx"):
        raise SkipnetError("--workers runs several ONNX Runtime sessions: it applies to an .onnx MODEL only")
    check_count("--seed", args.seed, 0, 2**32 - 1)
    if args.out is not None:
        check_out(args.out)
        output_format(args.out)
        if Path(args.out).expanduser().is_dir():
            raise SkipnetError(f"--out {args.out} is a directory; give a .csv or .jsonl file name")
        _refuse_overwriting_an_input(args.out, [args.model, *args.images])
    files, total = expand_inputs(args.images)  # a missing path or an empty folder: one line before any work
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    threads = 1 if args.workers > 1 and args.threads is None else args.threads  # a core per worker
    predictor = load_predictor(args.model, threads=threads, workers=args.workers)
    with _Bar(total) as bar:
        preds = predict(
            predictor,
            files,
            batch_size=args.batch_size,
            top_k=args.top_k,
            seed=args.seed,
            on_skip=bar.skip,
            on_progress=bar.update,
        )
    if not preds.rows and not preds.skipped:  # e.g. a tar archive of no image members (counted only when read)
        raise SkipnetError(f"{', '.join(args.images)} held no image files (ending in .jpg, .png, ...)")
    if not preds.rows:
        raise SkipnetError(
            f"none of the {len(preds.skipped)} inputs could be read as an image (e.g. {preds.skipped[0][0]}: "
            f"{preds.skipped[0][1]})"
        )
    if args.out is not None:
        write_predictions(preds, args.out)
        print(f"wrote {len(preds.rows)} predictions to {args.out}")
    else:
        _print_table(preds)
    _summary(predictor, preds)
    return 0


def expand_user(path: str | None) -> str | None:
    return None if path is None else os.path.expanduser(path)


def _refuse_overwriting_an_input(out: str, inputs: list[str]) -> None:
    target = Path(out).expanduser()
    for given in inputs:
        p = Path(given).expanduser()
        if p.exists() and target.exists() and p.resolve() == target.resolve():
            raise SkipnetError(f"--out {out} is one of the inputs; give another file")


class _Bar:
    """A tqdm bar on stderr when it is a terminal (nothing otherwise); skip lines are printed above it."""

    def __init__(self, total: int | None) -> None:
        from skipnet.runlog import terminal_bar

        self.bar = terminal_bar(total=total, unit="img", desc="predict", leave=False)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def skip(self, name: str, reason: str) -> None:
        line = f"skipnet predict: skipped {name}: {reason}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)


def _print_table(preds: Any) -> None:
    rows = preds.rows
    width = min(48, max(len("image"), *(len(r["image"]) for r in rows)))
    cls = min(24, max(len("class"), *(len(r["class"]) for r in rows)))

    def short(text: str, n: int) -> str:
        return text if len(text) <= n else "..." + text[-(n - 3) :]

    others = f"  next {preds.top_k - 1} classes" if preds.top_k > 1 else ""
    print(f"{'image':<{width}}  {'class':<{cls}}  {'prob':>6}  {'blocks':>7}  {'MMACs':>8}{others}")
    for r in rows:
        blocks = f"{r['gated_blocks_executed']}/{r['gated_blocks']}"
        line = f"{short(r['image'], width):<{width}}  {short(r['class'], cls):<{cls}}  {r['probability']:>6.3f}  "
        line += f"{blocks:>7}  {r['macs'] / 1e6:>8.2f}"
        if "top_k" in r:
            line += "  " + ", ".join(f"{c} {q:.3f}" for c, q in r["top_k"][1:])
        print(line)


def _summary(predictor: Any, preds: Any) -> None:
    """The run in two lines on stderr: what ran, how fast, what it cost; then the skipped inputs."""
    n = len(preds.rows)
    executed = sum(r["gated_blocks_executed"] for r in preds.rows) / n
    macs = sum(r["macs"] for r in preds.rows) / n
    how = f"{predictor.graph} graph, " if predictor.graph else ""
    threshold = f" at threshold {predictor.threshold:g}" if predictor.threshold is not None else ""
    kind = "gated" if predictor.config.gated else "skippable (no gate)"
    print(
        f"skipnet predict: {n} image{'' if n == 1 else 's'} with {predictor.config.name} ({how}{predictor.runtime}, "
        f"mode {predictor.mode}{threshold}) in {preds.seconds:.2f} s ({n / max(preds.seconds, 1e-9):.1f} images/s); "
        f"{executed:.2f} of {predictor.num_gates} {kind} blocks and {macs / 1e6:.2f} MMACs per image on average",
        file=sys.stderr,
    )
    if preds.skipped:
        names = [name for name, _ in preds.skipped]
        more = f" and {len(names) - SHOWN_SKIPS} more" if len(names) > SHOWN_SKIPS else ""
        print(
            f"skipnet predict: skipped {len(names)} unreadable input(s): {', '.join(names[:SHOWN_SKIPS])}{more}",
            file=sys.stderr,
        )
