"""``skipnet bench ARCH_OR_CKPT``: wall-clock latency of the plain ResNet, masked SkipNet and routed SkipNet.

The three are timed in one run, on the same inputs, interleaved (see :mod:`skipnet.bench`). With an
architecture name, decisions are forced to Bernoulli(``--keep``) per sample and gate (the gates are still
computed); its BatchNorm statistics are first calibrated on random batches so that activations are O(1). With a
checkpoint, its learned greedy gates decide at its stored threshold, unless ``--keep`` forces decisions.

``skipnet bench OUT.onnx`` (or ``--runtime onnxruntime`` with a checkpoint, exported on the fly) times an
exported SkipNet against the exported plain ResNet of the same backbone (and the masked graph) in ONNX Runtime
on the CPU, interleaved, with the same JSON keys plus ``runtime``, ``graph`` and ``images`` (see
:mod:`skipnet.bench_onnx`); its decisions are its learned gates' on the images.

JSON keys: ``arch``, ``source``, ``image_size``, ``batch_size``, ``keep`` (fraction of gated blocks actually
executed), ``keep_requested``, ``threads``, ``latency_ms_plain`` / ``_masked`` / ``_routed`` (medians),
``latency_ms_min_*``, ``speedup`` (plain / routed), ``speedup_masked`` (plain / masked), ``macs_plain``,
``macs_routed`` (mean per image, gates included), ``ideal_speedup`` (their ratio), ``efficiency``
(speedup / ideal_speedup), ``max_abs_diff`` (routed vs masked logits), ``decisions_match``; with one thread
also ``cpu_ms_*``, ``speedup_cpu`` and ``efficiency_cpu`` (the calling thread's CPU time, robust to other jobs
on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from skipnet.bench import bench_inference, calibrate_bn, load_subject, set_threads
from skipnet.commands._common import MAX_THREADS, check_count
from skipnet.device import pick_device
from skipnet.errors import SkipnetError
from skipnet.predict import is_export

DOCS = "docs/deploy.md"  # the page that explains this command (its --help says so)
DEFAULT_BATCHES = 8  # --images left unset: batches of distinct images per ONNX round


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time plain vs masked vs routed SkipNet inference (wall clock, CPU or CUDA)",
        description="Time the plain ResNet, masked SkipNet and routed SkipNet on the same inputs, interleaved; "
        "report median latencies, the speedup, the ideal speedup from MACs and routed-vs-masked agreement.",
    )
    p.add_argument(
        "subject",
        metavar="ARCH_OR_CKPT",
        help="a registered architecture, or a checkpoint: .pt, .safetensors export or pretrained:NAME",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per forward pass (default: 64; 1 for a conditional graph)"
    )
    p.add_argument(
        "--keep",
        type=float,
        default=None,
        help="force Bernoulli(K) decisions per sample and gate (default: 0.5 for an architecture, the learned "
        "gates for a checkpoint)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads per run (default: torch's own in PyTorch, 1 in an ONNX Runtime session's intra-op pool)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (CUDA calls are synchronised)")
    p.add_argument("--image-size", type=int, default=None, help="square input size (default: the arch's own)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and forced decisions")
    p.add_argument(
        "--data",
        default=None,
        help="time on B test images of this data set (a seeded sample; as the checkpoint saw it: normalisation, size), "
        "so learned gates decide as they do in use; default: random N(0, 1) inputs",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="where torchvision data sets live, with --data "
        "(default: ~/.cache/skipnet/datasets, or $SKIPNET_CACHE/datasets)",
    )
    _onnx_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _onnx_options(p: argparse.ArgumentParser) -> None:
    """The options of ``--runtime onnxruntime`` (an exported graph)."""
    p.add_argument(
        "--runtime",
        choices=("torch", "onnxruntime"),
        default=None,
        help="torch (eager) or onnxruntime (an exported graph; a checkpoint is exported first) "
        "(default: onnxruntime for a .onnx file, else torch)",
    )
    p.add_argument(
        "--plain",
        default=None,
        help="onnxruntime: the exported plain ResNet to compare a masked graph with (a conditional or routed graph "
        "gives its own; one given is checked to be of the same backbone)",
    )
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="onnxruntime: BATCHES of --batch-size distinct images per round, so --images x --batch-size images "
        f"(default: {DEFAULT_BATCHES}, or with --data as many whole batches as its test split holds, up to that)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="onnxruntime: run every graph as this many sessions at once, each on a shard of every batch "
        "(throughput on several cores, each session --threads threads; wall time)",
    )


MAX_BATCH = 4096  # images per forward pass
MAX_IMAGE_SIZE = 1024  # px (as skipnet flops)
MAX_REPEATS = 10000
MAX_IMAGES = 1024  # --images: distinct batches per ONNX round (it counts batches of --batch-size, not images)


def check_bounds(args: argparse.Namespace) -> None:
    """The options that size a benchmark, in range before anything is loaded (one line otherwise)."""
    check_count("--batch-size", args.batch_size, 1, MAX_BATCH)
    check_count("--image-size", args.image_size, 8, MAX_IMAGE_SIZE)
    check_count("--repeats", args.repeats, 1, MAX_REPEATS)
    check_count("--warmup", args.warmup, 0, MAX_REPEATS)
    check_count("--threads", args.threads, 1, MAX_THREADS)
    check_count("--workers", args.workers, 1, MAX_THREADS)


def real_images(path: str, model, spec: str, data_dir: str | None, batch: int) -> torch.Tensor:
    """``batch`` images of the test split, loaded as the checkpoint saw its data: a seeded sample, as ``--limit``
    draws one (the first images of a split stored class by class would all be of one class)."""
    from skipnet.checkpoint import data_record, load_checkpoint, require_same_classes
    from skipnet.evaluate import data_for_checkpoint, eval_loader

    ckpt = load_checkpoint(path)
    data = data_for_checkpoint(ckpt, model, spec, data_dir=data_dir, batch_size=batch, limit=batch)
    require_same_classes(model, data, path, data_record(ckpt).get("classes"))  # names too, as ONNX's
    xs, n = [], 0
    for x, _ in eval_loader(data, "test"):
        xs.append(x)
        n += len(x)
        if n >= batch:
            break
    x = torch.cat(xs)[:batch]
    if x.shape[1] != model.config.in_channels:
        raise SkipnetError(
            f"--data {spec}: {x.shape[1]}-channel images for a {model.config.in_channels}-channel network ({path})"
        )
    if len(x) < batch:
        raise SkipnetError(f"--data: the test split has only {len(x)} images, fewer than --batch-size {batch}")
    return x


def _refuse_onnx_options(args: argparse.Namespace) -> None:
    """The options of an ONNX Runtime benchmark, given to an eager one: one line."""
    if args.plain is not None:
        raise SkipnetError("--plain applies to --runtime onnxruntime")
    if args.workers != 1:
        raise SkipnetError("--workers applies to --runtime onnxruntime (several sessions of an exported graph)")
    if args.images is not None:
        raise SkipnetError("--images applies to --runtime onnxruntime; eager PyTorch times one batch, --batch-size")


def run(args: argparse.Namespace) -> int:
    if args.runtime == "onnxruntime" or (args.runtime is None and is_export(args.subject, ".onnx")):
        return run_onnx(args)
    if args.batch_size is None:
        args.batch_size = 64
    _refuse_onnx_options(args)
    check_bounds(args)
    if args.keep is not None and not 0.0 <= args.keep <= 1.0:
        raise SkipnetError(f"--keep must be in [0, 1], got {args.keep:g}")
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    torch.manual_seed(args.seed)
    model, info = load_subject(args.subject)
    keep = args.keep
    if info["source"] == "checkpoint":
        keep = _checkpoint_keep(model, args.subject, keep, info)
    images = None
    if args.data is not None:
        if info["source"] != "checkpoint":
            raise SkipnetError("--data needs a checkpoint (an architecture name has no trained normalisation)")
        images = real_images(args.subject, model, args.data, args.data_dir, args.batch_size)
        info["inputs"] = f"{args.batch_size} test images of {args.data} (seeded sample)"
    size = args.image_size or (images.shape[-1] if images is not None else model.config.image_size)
    if info["source"] == "arch":
        keep = 0.5 if keep is None else keep
        calibrate_bn(model, size, seed=args.seed)
        info["bn"] = "calibrated on random batches"
    (res,) = bench_inference(
        model,
        batch_size=args.batch_size,
        keeps=(keep,),
        image_size=size,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        info=info,
        images=images,
        device=device,
    )
    if args.json:
        print(json.dumps(res))
        return 0
    how = (
        f"learned greedy gates, threshold {info.get('threshold', 0.5):g}"
        if keep is None
        else f"random Bernoulli({keep:g}) decisions (mode random, as the checkpoint was validated)"
        if info.get("mode") == "random"
        else f"forced Bernoulli({keep:g}) decisions"
    )
    print(
        f"{res['arch']} ({info['source']}), batch {res['batch_size']}, {size}x{size}, {res['device']}, "
        f"{threads} thread{'' if threads == 1 else 's'}, "
        f"{how}; executed fraction {res['keep']:.3f}"
    )
    print(f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds")
    _print_table(res)
    print(f"max |routed - masked| logit difference {res['max_abs_diff']:.2e}; same decisions: {res['decisions_match']}")
    return 0


def _checkpoint_keep(model: Any, subject: str, keep: float | None, info: dict) -> float | None:
    """The decisions a checkpoint is timed with, as it was trained and validated (its mode, recorded in
    ``info["mode"]``): its learned greedy gates, its random keep ratio (SDV), or ``--keep``; a checkpoint that runs
    every block (mode ``all_on``) has nothing to skip and needs ``--keep``."""
    from skipnet.evaluate import eval_mode_for
    from skipnet.gated import GateMode

    mode = eval_mode_for(model)
    if keep is not None:
        info["mode"] = "forced"
        return keep
    info["mode"] = mode.value
    if mode == GateMode.RANDOM:
        return float(model.keep_ratio)
    if mode == GateMode.ALL_ON and model.gates is not None:
        raise SkipnetError(
            f"{subject} runs every block (mode all_on: trained without its gates, e.g. in stage base), so there is "
            "no skipping to time; pass --keep K to time forced decisions, or bench a checkpoint of stage sp or hrl"
        )
    return keep


def run_onnx(args: argparse.Namespace) -> int:
    """``skipnet bench OUT.onnx`` / ``--runtime onnxruntime``: see :mod:`skipnet.bench_onnx`."""

    from skipnet.bench_onnx import bench_onnx
    from skipnet.ortgraph import require_onnx

    require_onnx()
    if args.batch_size is None:  # 1 for a conditional graph (the one a checkpoint is exported to here), else 64
        conditional = True
        if is_export(args.subject, ".onnx") and os.path.isfile(args.subject):  # else refused below, in one line
            from skipnet.export import read_onnx_meta

            conditional = read_onnx_meta(args.subject)[1].get("graph") == "conditional"
        args.batch_size = 1 if conditional else 64
    check_bounds(args)
    check_count("--images", args.images, 1, MAX_IMAGES, " batches of --batch-size")
    if (args.images or DEFAULT_BATCHES) * args.batch_size > MAX_IMAGES * 16:
        raise SkipnetError(
            f"--images {args.images or DEFAULT_BATCHES} batches x --batch-size {args.batch_size} images per round is "
            f"over {MAX_IMAGES * 16} images"
        )
    if args.keep is not None:
        raise SkipnetError("--keep forces decisions in eager PyTorch only; an exported graph's gates decide")
    if args.device != "cpu":
        raise SkipnetError("--runtime onnxruntime runs on the CPU; drop --device")
    threads = args.threads or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    payload, meta, plain_bytes, model, info = _onnx_subject(args)
    images, info["inputs"] = _onnx_images(args, meta, model)
    res = bench_onnx(
        payload,
        meta,
        plain_bytes=plain_bytes,
        images=images,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=threads,
        workers=args.workers,
        info=info,
    )
    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"{res['arch']} ({res['graph']} graph) in {res['runtime']}, CPU, {threads} thread(s)"
        + (f" x {args.workers} workers" if args.workers > 1 else "")
        + f", batch {args.batch_size}, "
        f"{res['images']} images per round; executed fraction {res['keep']:.3f} (learned gates, threshold "
        f"{res['threshold']:g})"
    )
    print(f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds, per batch")
    _print_table(res)
    return 0


def _onnx_subject(args: argparse.Namespace) -> tuple[bytes, dict, bytes | None, Any, dict]:
    """``(graph bytes, metadata, plain graph bytes or None, model or None, info)`` of an ONNX benchmark: the
    given ``.onnx`` file, or the graph exported from the checkpoint (conditional at batch 1, else routed)."""

    from skipnet.bench_onnx import load_onnx_subject, read_checked_onnx
    from skipnet.export import export_model

    plain_bytes, pmeta = None, None
    if args.plain is not None:
        proto, pmeta = read_checked_onnx(args.plain)
        if pmeta.get("graph") != "plain":
            raise SkipnetError(f"--plain {args.plain} is a {pmeta.get('graph')} graph; export one with --graph plain")
        plain_bytes = proto.SerializeToString()
    info: dict = {"source": "onnx", "path": args.subject}
    if is_export(args.subject, ".onnx"):
        payload, meta = load_onnx_subject(args.subject)
        model = None
    else:
        from skipnet.bench import is_checkpoint
        from skipnet.checkpoint import checkpoint_stats

        if not is_checkpoint(args.subject):
            raise SkipnetError(
                f"--runtime onnxruntime needs a checkpoint or an exported .onnx file, got {args.subject!r}"
            )
        from skipnet.checkpoint import load_model

        model, ckpt = load_model(args.subject)
        _require_greedy(model, args.subject)
        stats = checkpoint_stats(ckpt)
        graph = "conditional" if args.batch_size == 1 else "routed"
        ex = export_model(model, "onnx", graph=graph, stats=stats, ckpt=ckpt, probes=1)
        for note in ex.warnings:
            print(f"skipnet bench: warning: {note}", file=sys.stderr)
        payload, meta = ex.payload, ex.meta
        if graph != "conditional" and plain_bytes is None:
            plain_bytes = export_model(model, "onnx", graph="plain", stats=stats, ckpt=ckpt, probes=1).payload
        info = {"source": "checkpoint", "path": args.subject, "exported": ex.graph}
    info["mode"] = "greedy"  # an exported gated graph decides greedily at its threshold
    if args.plain is not None:  # the plain graph given must be the backbone of this one
        import onnx

        from skipnet.bench_onnx import check_plain_twin

        check_plain_twin(args.subject, meta, onnx.load_from_string(payload), args.plain, pmeta, plain_bytes)
    return payload, meta, plain_bytes, model, info


def _require_greedy(model: Any, subject: str) -> None:
    """An exported graph decides greedily with the learned gates: refuse a checkpoint validated otherwise."""
    from skipnet.evaluate import eval_mode_for
    from skipnet.gated import GateMode

    mode = eval_mode_for(model)
    if model.gates is None:  # bench has no --graph: the export's "only --graph plain applies" would mislead
        raise SkipnetError(
            f"{subject} has no gates: --runtime onnxruntime times a SkipNet's graph against its plain ResNet, and "
            "a plain network has nothing to skip"
        )
    if mode == GateMode.GREEDY:
        return
    why = {
        GateMode.ALL_ON: "runs every block (mode all_on: its gates were never trained, e.g. stage base)",
        GateMode.RANDOM: "decides at random (mode random, stochastic depth), which no exported graph does",
    }[mode]
    raise SkipnetError(f"{subject} {why}; --runtime onnxruntime times the learned gates of a SkipNet (stage sp or hrl)")


def _onnx_images(args: argparse.Namespace, meta: dict, model: Any) -> tuple[torch.Tensor, str]:
    """The images of an ONNX benchmark, as the graph takes them (pixels in [0, 1]), and how they were made."""
    from skipnet.bench_onnx import data_images

    size = meta["image_size"]
    if args.image_size is not None and args.image_size != size:
        raise SkipnetError(f"{args.subject} takes {size}-px images (its exported graph); drop --image-size")
    n = (args.images or DEFAULT_BATCHES) * args.batch_size
    channels = meta["arch"].get("in_channels", 3)
    if args.data is not None:  # pixels in [0, 1]: the exported graph normalises them itself
        images = data_images(args.subject, meta, args.data, args.data_dir, n)
        images = images[: _whole_batches(args, len(images), n)]
        inputs = f"{len(images)} test images of {args.data} (seeded sample)"
    else:
        gen = torch.Generator().manual_seed(args.seed)
        images = torch.rand(n, channels, size, size, generator=gen)
        inputs = "random uniform [0, 1] images"
    return images.float().contiguous(), inputs


def _whole_batches(args: argparse.Namespace, have: int, n: int) -> int:
    """How many of the ``have`` test images of ``--data`` a round takes: the ``n`` asked for, or, with ``--images``
    unset, as many whole batches as there are; one line where there are too few."""
    batch, fit = args.batch_size, have // args.batch_size
    if have >= n:
        return n
    if fit == 0:
        raise SkipnetError(
            f"--data {args.data}: its test split has {have} images, fewer than one batch of --batch-size {batch}; "
            f"pass --batch-size {have} or less"
        )
    if args.images is None:
        return fit * batch
    raise SkipnetError(
        f"--data {args.data}: its test split has {have} images, fewer than --images {args.images} batches x "
        f"--batch-size {batch} = {n}; pass --images {fit} or less (--images counts batches)"
    )


def _print_table(res: dict) -> None:
    """Latency of each variant, its speed-up over the plain network (CPU time too at one thread), and the ideal
    speed-up from MACs."""
    cpu = "cpu_ms_plain" in res  # one thread: its CPU time is reported too
    head = f"{'variant':<8} {'latency ms':>12} {'min ms':>10} {'speedup':>9}"
    print(head + (f" {'CPU ms':>10} {'speedup':>9}" if cpu else ""))
    for v in ("plain", "masked", "routed"):
        lat = res.get(f"latency_ms_{v}")
        if lat is None:  # a routed ONNX graph has no masked twin
            continue
        name = "masked" if v == "routed" and res.get("graph") == "masked" else v  # a masked export skips nothing
        line = f"{name:<8} {lat:>12.2f} {res[f'latency_ms_min_{v}']:>10.2f} {res['latency_ms_plain'] / lat:>8.2f}x"
        if cpu:
            c = res[f"cpu_ms_{v}"]
            line += f" {c:>10.2f} {res['cpu_ms_plain'] / c:>8.2f}x"
        print(line)
    print(
        f"ideal speedup {res['ideal_speedup']:.2f}x (MACs {res['macs_plain'] / 1e6:.1f}M -> "
        f"{res['macs_routed'] / 1e6:.1f}M per image, gates included); efficiency {res['efficiency']:.2f}"
    )
