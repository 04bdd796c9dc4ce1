"""Predictions on image files with any deployable form of a SkipNet (``skipnet predict``, issue 32).

A model is loaded by :func:`load_predictor` from

- a checkpoint (``.pt``, ``.safetensors``, a ``save_pretrained`` directory or ``pretrained:NAME``): the eager
  network, run in the mode it was trained and validated in (:func:`skipnet.evaluate.eval_mode_for`: greedy
  gates for a SkipNet, every block for a plain ResNet or a gated one trained in stage ``base``, random keeps for
  SDV), on images normalised with the checkpoint's own statistics;
- a ``.pt2`` program or an ``.onnx`` graph written by ``skipnet export``: the graph normalises its input itself
  and decides with its gates; its metadata (architecture, classes, image size, normalisation, threshold) is
  checked against the structure of the file before anything runs it (:func:`check_export_meta`,
  :func:`check_onnx_structure`), and its outputs are checked on every batch (:func:`check_outputs`), so that a
  file altered after export is a one-line :class:`~skipnet.errors.SkipnetError`, not a traceback or silently
  different logits where that can be detected.

Images come from files, folders (searched recursively for image files, as a data split's class folders are:
linked folders followed, none twice, hidden ones skipped) and ``.tar`` / ``.tar.gz`` / ``.tgz`` / ``.zip`` archives
(read in place, never extracted; zip names written by Info-ZIP as UTF-8 read so), and are prepared as the data
module prepares the checkpoint's data (:mod:`skipnet.data`): small networks (<= 64 px) get the image decoded the
same way and resized to S x S (bilinear, antialiased, rounded to 8 bits); large ones the resize-then-centre-crop of
evaluation.
Unreadable files are skipped and reported through a callback: a prediction run never stops midway on one.

:func:`predict` returns one row per image (class, its probability, top-k, the gated blocks executed and the MACs
spent); :func:`write_predictions` writes them as CSV or JSON lines, atomically. Nothing here prints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from skipnet import fastgate
from skipnet.config import ArchConfig
from skipnet.cost import CostModel, cost_model
from skipnet.errors import SkipnetError

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
MAX_IMAGE_BYTES = 256 << 20  # a file or archive member larger than this is skipped (a decompression bomb)
MAX_TOP_K = 100


class Unreadable(Exception):
    """An input that is not a readable image (the reason is the message): skipped, never fatal."""


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class Predictor:
    """A loaded model of any kind, called on float32 images in [0, 1] (B, C, S, S) -> ``(logits, decisions)``.

    ``decisions`` is (B, N) float 0/1, all ones for a network that runs every block; ``gated``: whether its gates
    are computed (their MACs counted); ``batch``: the one batch size the graph takes (1 for a conditional graph),
    ``None`` for any."""

    source: str
    runtime: str
    config: ArchConfig
    classes: list[str]
    mode: str
    threshold: float | None
    graph: str | None
    batch: int | None
    gated: bool
    cost: CostModel
    fn: Callable[[Tensor], tuple[Tensor, Tensor | None]] = field(repr=False)
    prepare: str | None = None  # "crop" or "resize" as its training data was prepared; None: by the image size

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def num_gates(self) -> int:
        return self.cost.num_gates

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        chunks = images.split(self.batch) if self.batch else (images,)
        logits, decisions = [], []
        for x in chunks:
            lg, dec = self.fn(x.contiguous())
            if dec is None:
                dec = torch.ones(len(x), self.num_gates)
            check_outputs(self, len(x), lg, dec)
            logits.append(lg.float())
            decisions.append(dec.float())
        return torch.cat(logits), torch.cat(decisions)


def is_export(spec: str | Path, suffix: str) -> bool:
    """Whether ``spec`` names an export of the kind ``suffix`` (``.onnx``, ``.pt2``), in any case."""
    return str(spec).lower().endswith(suffix)


def _class_names(classes: Any, n: int) -> list[str]:
    """The model's class names, each as valid UTF-8 text (:func:`shown`): rows, tables and files can hold them."""
    if isinstance(classes, list) and len(classes) == n and all(isinstance(c, str) for c in classes):
        return [shown(c) for c in classes]
    return [str(i) for i in range(n)]


def load_predictor(spec: str, *, threads: int | None = None, workers: int = 1) -> Predictor:
    """The model named by ``spec``: an ``.onnx`` graph (ONNX Runtime, ``threads`` intra-op threads; ``workers``
    sessions running a batch's shards at once, :class:`skipnet.ortgraph.ShardedSession`), a ``.pt2`` program
    (torch.export), or any checkpoint ``skipnet eval`` takes (the eager network)."""
    text = str(spec)
    if is_export(text, ".onnx"):
        return _load_onnx(text, threads, workers)
    if workers != 1:
        raise SkipnetError(f"workers run several ONNX Runtime sessions: they apply to an .onnx model, not {spec}")
    if is_export(text, ".pt2"):
        return _load_pt2(text)
    return _load_checkpoint(text)


def _load_checkpoint(spec: str) -> Predictor:
    from skipnet.checkpoint import data_record, load_model
    from skipnet.data import Normalize
    from skipnet.evaluate import eval_mode_for, gates_spent, required_stats

    model, ckpt = load_model(spec, map_location="cpu")
    model = model.eval().to(memory_format=torch.channels_last)
    mode = eval_mode_for(model)  # as it was trained and validated: never greedy gates for a base-stage network
    # one number per input channel: load_model refuses any other data record (checkpoint.check_data_record)
    normalize = Normalize(required_stats(ckpt, spec))
    if model.num_gates and fastgate.enabled():
        fastgate.load()  # built here, on first use, rather than inside the timed predictions (a minute the first time)

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            x = normalize(x)  # as the data loaders normalise: (pixels / 255 - mean) / std
            out = model(x.contiguous(memory_format=torch.channels_last), mode)
            return out.logits, out.trace.decisions

    gated = gates_spent(model, mode)  # as skipnet eval counts MACs
    return Predictor(
        source=spec,
        runtime="torch " + torch.__version__.split("+")[0],
        config=model.config,
        classes=_class_names(data_record(ckpt).get("classes"), model.config.num_classes),
        mode=mode.value,
        threshold=float(model.threshold) if gated else None,
        graph=None,
        batch=None,
        gated=gated,
        cost=cost_model(model),
        fn=run,
        prepare=_preparation(data_record(ckpt).get("prepare"), spec),
    )


def _exported(spec: str, meta: dict[str, Any], runtime: str, fn: Callable) -> Predictor:
    from skipnet.evaluate import gates_spent
    from skipnet.gated import GatedResNet

    config = ArchConfig.from_dict(meta["arch"])
    net = GatedResNet(config)
    gated = gates_spent(net, meta["mode"])  # greedy for a gated graph, all_on for plain (check_export_meta)
    return Predictor(
        source=spec,
        runtime=runtime,
        config=config,
        classes=_class_names(meta.get("classes"), config.num_classes),
        mode=meta["mode"],
        threshold=float(meta["threshold"]) if gated else None,
        graph=meta["graph"],
        batch=meta.get("batch"),
        gated=gated,
        cost=cost_model(net, int(meta["image_size"])),
        fn=fn,
        prepare=_preparation(meta.get("prepare"), spec),
    )


def _preparation(recorded: Any, spec: str) -> str | None:
    """How the model's images were made S x S, as its data record says (``None`` where it predates the record)."""
    from skipnet.checkpoint import PREPARATIONS

    if recorded not in (None, *PREPARATIONS):
        raise SkipnetError(f"{spec} records an image preparation {recorded!r}; expected 'crop' or 'resize'"[:200])
    return recorded


def _load_pt2(spec: str) -> Predictor:
    from skipnet.export import load_pt2

    if not Path(spec).is_file():
        raise SkipnetError(f"{spec} does not exist")
    try:
        program, meta = load_pt2(spec)
    except ValueError:  # its metadata is not JSON
        raise _bad(spec, "its skipnet metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise _bad(spec, "its skipnet metadata is not a mapping")
    check_export_meta(spec, meta)
    module = program.module()
    gated = meta["graph"] != "plain"

    def run(x: Tensor) -> tuple[Tensor, Tensor | None]:
        try:
            with torch.no_grad():
                out = module(x)
        except Exception as exc:  # noqa: BLE001 - an altered program fails in many ways; one line for each
            raise SkipnetError(f"{spec} failed to run ({type(exc).__name__}: {_first_line(exc)})") from None
        if not gated:
            return (out[0] if isinstance(out, tuple | list) else out), None
        if not isinstance(out, tuple | list) or len(out) != 3:
            raise SkipnetError(f"{spec} returns {type(out).__name__}, not (logits, probs, decisions)")
        return out[0], out[2]

    return _exported(spec, meta, "torch.export " + torch.__version__.split("+")[0], run)


def _load_onnx(spec: str, threads: int | None, workers: int = 1) -> Predictor:
    from skipnet.export import read_onnx_meta
    from skipnet.ortgraph import require_onnx

    _, ort = require_onnx()
    proto, meta = read_onnx_meta(spec)
    check_export_meta(spec, meta)
    check_onnx_structure(spec, proto, meta)
    session = open_onnx_session(spec, proto.SerializeToString(), threads, workers)
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> tuple[Tensor, Tensor | None]:
        try:
            outs = session.run(None, {name: x.numpy()})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors have many types; report them in one line
            raise SkipnetError(f"{spec} failed in ONNX Runtime ({type(exc).__name__}: {_first_line(exc)})") from None
        logits = torch.from_numpy(outs[0])
        return logits, (torch.from_numpy(outs[2]) if len(outs) == 3 else None)

    predictor = _exported(spec, meta, "onnxruntime " + ort.__version__, run)
    return replace(predictor, batch=None) if workers > 1 else predictor  # the workers deal out a graph's batches


def open_onnx_session(spec: str, payload: bytes, threads: int | None, workers: int = 1) -> Any:
    """An ONNX Runtime CPU session of ``payload`` (``workers`` > 1: a :class:`skipnet.ortgraph.ShardedSession`);
    a graph the runtime refuses is a one-line error."""
    from skipnet.ortgraph import onnx_session

    try:
        return onnx_session(payload, threads, workers=workers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise SkipnetError(
            f"ONNX Runtime cannot load {spec} ({type(exc).__name__}: {_first_line(exc)}); export it again"
        ) from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else "no message")[:200]


# ------------------------------------------------------------------------------------- checking exports
def _bad(spec: str, what: str) -> SkipnetError:
    return SkipnetError(f"{spec}: {what}; it is not a graph as 'skipnet export' wrote it (export it again)")


def _numbers(value: Any, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def check_export_meta(spec: str, meta: dict[str, Any]) -> ArchConfig:
    """The skipnet metadata of an exported graph (:func:`skipnet.export.metadata`), checked key by key; returns
    its architecture. A missing, ill-typed or inconsistent entry is a one-line error."""
    from skipnet.export import GRAPHS

    if meta.get("format") != "skipnet-export" or meta.get("version") != 1:
        raise _bad(spec, f"its metadata has format {meta.get('format')!r} version {meta.get('version')!r}")
    graph = meta.get("graph")
    if graph not in GRAPHS:
        raise _bad(spec, f"its metadata names the graph {graph!r}")
    try:
        config = ArchConfig.from_dict(meta.get("arch"))
    except (SkipnetError, TypeError, ValueError) as exc:
        raise _bad(spec, f"its architecture record is malformed ({_first_line(exc)})") from None
    size, c = meta.get("image_size"), config.in_channels
    if not isinstance(size, int) or size != config.image_size or not 1 <= size <= 4096:
        raise _bad(spec, f"its image size {size!r} is not its architecture's {config.image_size}")
    want = {"mode": "all_on" if graph == "plain" else "greedy", "batch": 1 if graph == "conditional" else None}
    want["outputs"] = ["logits"] if graph == "plain" else ["logits", "probs", "decisions"]
    for key, value in want.items():
        if meta.get(key) != value:
            raise _bad(spec, f"its metadata has {key} {meta.get(key)!r} for a {graph} graph (expected {value!r})")
    t = meta.get("threshold")
    if not isinstance(t, int | float) or isinstance(t, bool) or not 0.0 <= t <= 1.0:
        raise _bad(spec, f"its threshold {t!r} is not in [0, 1]")
    norm = meta.get("normalize")
    if norm is not None and not (
        isinstance(norm, dict)
        and _numbers(norm.get("mean"), c)
        and _numbers(norm.get("std"), c)
        and all(s > 0 for s in norm["std"])
    ):
        raise _bad(spec, f"its normalisation {norm!r} is not {c} means and {c} positive deviations")
    classes = meta.get("classes")
    if classes is not None and not (
        isinstance(classes, list) and len(classes) == config.num_classes and all(isinstance(x, str) for x in classes)
    ):
        raise _bad(spec, f"its class list is not {config.num_classes} names")
    return config


def _dims(value_info: Any) -> list[int | str | None]:
    """The dimensions of an ONNX value: an int, a symbolic name, or ``None`` when unknown."""
    t = value_info.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def check_onnx_structure(spec: str, proto: Any, meta: dict[str, Any]) -> None:
    """What :func:`skipnet.export.export_model` writes, checked against the metadata: ONNX's own model check, an
    opset this export writes, float32 ``images`` (B, C, S, S), ``logits`` (B, classes) and ``probs`` /
    ``decisions`` (B, gated blocks), and one ``If`` per gated block in a conditional graph. (Inputs and output
    names are checked on reading, :func:`skipnet.export.read_onnx_meta`.)"""
    import onnx

    from skipnet.export import ONNX_OPSET
    from skipnet.gated import GatedResNet

    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    newest = onnx.defs.onnx_opset_version()
    if not ONNX_OPSET <= opsets.get("ai.onnx", 0) <= newest:
        raise _bad(
            spec, f"it imports opset {opsets.get('ai.onnx')} (skipnet writes {ONNX_OPSET}, onnx reads <= {newest})"
        )
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError and others
        raise _bad(spec, f"it fails ONNX's model check ({_first_line(exc)})") from None
    config = ArchConfig.from_dict(meta["arch"])
    n_gates = GatedResNet(config).num_gates
    weights = {t.name for t in proto.graph.initializer}
    (images,) = [i for i in proto.graph.input if i.name not in weights]
    s, batch = config.image_size, meta.get("batch")
    if images.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or _dims(images)[1:] != [config.in_channels, s, s]:
        raise _bad(spec, f"its input is {_dims(images)}, not float32 (B, {config.in_channels}, {s}, {s})")
    if batch is not None and _dims(images)[0] != batch:
        raise _bad(spec, f"its input takes batches of {_dims(images)[0]}, its metadata says {batch}")
    widths = {"logits": config.num_classes, "probs": n_gates, "decisions": n_gates}
    for out in proto.graph.output:
        dims = _dims(out)
        if len(dims) != 2 or dims[1] not in (widths[out.name], None):
            raise _bad(spec, f"its output {out.name} is {dims}, not (B, {widths[out.name]})")
    ifs = sum(n.op_type == "If" for n in proto.graph.node)
    if meta["graph"] == "conditional" and ifs != n_gates:
        raise _bad(spec, f"it has {ifs} If nodes for {n_gates} gated blocks")


def check_outputs(p: Predictor, n: int, logits: Tensor, decisions: Tensor) -> None:
    """One batch's outputs: logits (n, classes), all finite; decisions (n, gated blocks), each 0 or 1."""
    k, g = p.config.num_classes, p.num_gates
    if tuple(logits.shape) != (n, k) or tuple(decisions.shape) != (n, g):
        raise SkipnetError(
            f"{p.source} returned logits {tuple(logits.shape)} and decisions {tuple(decisions.shape)} for {n} images, "
            f"not ({n}, {k}) and ({n}, {g}); was it altered after export?"
        )
    if not bool(torch.isfinite(logits).all()):
        raise SkipnetError(f"{p.source} returned non-finite logits; was it altered after export?")
    if not bool(((decisions == 0) | (decisions == 1)).all()):
        raise SkipnetError(f"{p.source} returned decisions other than 0 and 1; was it altered after export?")


# ------------------------------------------------------------------------------------------------ inputs
def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVES)


NO_IMAGES = "ending in .jpg, .png, ... as a data split's images do; other formats, e.g. .gif, are read when named"


def _image_suffix(name: str) -> bool:
    """Whether a folder's or an archive's member is an image: the suffixes the data module lists a split by, so that
    predict and eval see the same images of a folder (a file given by name is read whatever its suffix)."""
    from skipnet.data import IMAGE_EXTS

    return Path(name).suffix.lower() in IMAGE_EXTS


def _broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def expand_inputs(paths: Sequence[str | Path]) -> tuple[list[Path], int | None]:
    """The files and archives to read, in order (a folder: its image files, recursively, sorted, walked as a data
    split's class folders are, :func:`skipnet.data.walk_files`: linked folders followed, none entered twice,
    hidden files and folders skipped), and the number of images when it is known without reading an archive
    (``None`` with a tar archive: its members are counted only by reading it). A path that does not exist, or
    inputs that hold no image file, are one-line errors."""
    from skipnet.data import walk_files

    if not paths:
        raise SkipnetError("give at least one image file, folder or archive")
    out: list[Path] = []
    total: int | None = 0
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            # a broken link is listed too: reading it gives its skipped line, not silence
            found = [p for p in walk_files(path) if _image_suffix(p.name) and (p.is_file() or _broken_link(p))]
            if not found:
                raise SkipnetError(f"{path} holds no image files ({NO_IMAGES})")
            out += found
            total = None if total is None else total + len(found)
        elif path.is_file() or _broken_link(path):
            out.append(path)
            k = _count(path)
            if k == 0:
                raise SkipnetError(f"{path} holds no image files ({NO_IMAGES})")
            total = None if total is None or k is None else total + k
        elif path.exists():
            raise SkipnetError(f"{raw} is not a regular file or folder")
        else:
            raise SkipnetError(f"{raw} does not exist")
    return out, total


def _count(path: Path) -> int | None:
    if not is_archive(path):
        return 1
    if path.name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as z:
                return sum(not i.is_dir() and _image_suffix(zip_name(i)) for i in z.infolist())
        except (zipfile.BadZipFile, OSError):
            return 1  # reported as one unreadable input when it is read
    return None


def shown(name: str) -> str:
    """A file or member name as valid UTF-8 text: bytes that are not UTF-8 (held as lone surrogates, as Python
    decodes such file names) become ``\\xNN`` escapes, so a CSV, a JSON line or the terminal can take it."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def iter_inputs(files: Sequence[Path]) -> Iterator[tuple[str, bytes | Unreadable]]:
    """``(name, encoded bytes or the reason it cannot be read)`` of every image of ``files``, in order; archive
    members are named ``ARCHIVE:MEMBER`` and read in place. A damaged archive yields the images before the damage
    and one :class:`Unreadable` for the rest."""
    for path in files:
        if not is_archive(path):
            name = shown(str(path))
            try:
                size = path.stat().st_size
                if size > MAX_IMAGE_BYTES:
                    yield name, Unreadable(f"{size:,} bytes, over the {MAX_IMAGE_BYTES:,} limit")
                    continue
                yield name, path.read_bytes()
            except OSError as exc:
                yield name, Unreadable(exc.strerror or type(exc).__name__)
        elif path.name.lower().endswith(".zip"):
            yield from _zip_members(path)
        else:
            yield from _tar_members(path)


def zip_name(info: zipfile.ZipInfo) -> str:
    """A zip member's name. Without the UTF-8 flag, zipfile decodes it as cp437; but Info-ZIP (``zip`` on Linux
    and macOS) writes UTF-8 names without the flag: a name whose bytes are valid UTF-8 is read so (a cp437 name of
    accented letters is almost never valid UTF-8, and an ASCII name is the same either way)."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return info.filename


def _zip_members(path: Path) -> Iterator[tuple[str, bytes | Unreadable]]:
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        yield shown(str(path)), Unreadable(f"not a readable zip archive ({type(exc).__name__})")
        return
    with z:
        for info in z.infolist():
            member = zip_name(info)
            if info.is_dir() or not _image_suffix(member):
                continue
            name = shown(f"{path}:{member}")
            if info.file_size > MAX_IMAGE_BYTES:
                yield name, Unreadable(f"{info.file_size:,} bytes uncompressed, over the {MAX_IMAGE_BYTES:,} limit")
                continue
            try:
                yield name, z.read(info)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError) as exc:
                yield name, Unreadable(f"damaged or unsupported zip member ({type(exc).__name__}: {_first_line(exc)})")
            except Exception as exc:  # noqa: BLE001 - zlib.error and other decompressor errors
                yield name, Unreadable(f"damaged zip member ({type(exc).__name__}: {_first_line(exc)})")


def _tar_members(path: Path) -> Iterator[tuple[str, bytes | Unreadable]]:
    seen = 0
    try:
        with tarfile.open(path, "r|*") as tar:  # a stream: one pass through a compressed archive
            for member in tar:
                if not (member.isfile() or member.islnk() or member.issym()) or not _image_suffix(member.name):
                    continue
                name = shown(f"{path}:{member.name}")
                if not member.isfile():  # a streamed archive cannot go back to the member a link names
                    kind = "hard" if member.islnk() else "symbolic"
                    where = shown(member.linkname)
                    yield name, Unreadable(f"a {kind} link to {where} in the archive (extract it to read links)")
                    continue
                if member.size > MAX_IMAGE_BYTES:
                    yield name, Unreadable(f"{member.size:,} bytes, over the {MAX_IMAGE_BYTES:,} limit")
                    continue
                data = tar.extractfile(member).read()
                seen += 1
                yield name, data
    except Exception as exc:  # noqa: BLE001 - tarfile, gzip, bz2, lzma and zlib errors: the rest is unreadable
        where = f" after {seen} images read" if seen else ""  # read, not all decodable: the last may be cut short
        why = f"damaged or not a tar archive{where} ({type(exc).__name__}: {_first_line(exc)})"
        yield shown(str(path)), Unreadable(why)


def load_image(data: bytes, channels: int, size: int, prepare: str | None = None) -> Tensor:
    """One encoded image as the data module prepared the model's images: float32 (C, S, S) in [0, 1] before
    normalisation. ``prepare``: ``"crop"`` (a large-image folder's evaluation transform: resized to S * 256 / 224
    and centre-cropped, whatever the image's own size), ``"resize"`` (decoded and resized to S x S, as small
    images are), or ``None`` (a record older than the choice): crop for a network over 64 px, resize otherwise.
    Each step is :mod:`skipnet.data`'s own (:func:`~skipnet.data.decode_bytes`, :func:`~skipnet.data.resize_small`,
    :func:`~skipnet.data.eval_transform`). :class:`Unreadable` (with the reason) if it is not a readable image."""
    from skipnet.data import SMALL_MAX, decode_bytes, image_decoder, resize_small

    if not data:
        raise Unreadable("empty file")
    if prepare == "crop" or (prepare is None and size > SMALL_MAX):
        large = _large_image(data, size)
        return large if channels == 3 else _gray(large * 255.0) / 255.0
    with image_decoder() as decode:
        img = decode_bytes(data, decode)  # uint8 RGB (3, H, W), decoded as a small-image folder's files are
    if img is None:
        raise Unreadable("not a readable image (corrupt, truncated or another format)")
    img = resize_small(img, size)
    if channels == 1:
        img = _gray(img.float()).round().clamp(0, 255).to(torch.uint8)
    return img.float() / 255.0


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma of RGB values (C = 3, any range), (1, H, W)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
    return (x * w).sum(0, keepdim=True)


def _large_image(data: bytes, size: int) -> Tensor:
    """A photo as a large-image folder's evaluation prepares it (:func:`skipnet.data.eval_transform`, without its
    normalisation: the model's), read through PIL as the ImageFolder loader reads it."""
    from PIL import Image

    from skipnet.data import eval_transform, pil_rgb, too_elongated, too_many_pixels

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                why = too_many_pixels(im.width, im.height) or too_elongated(im.width, im.height)
                if why is not None:
                    raise Unreadable(why)
                rgb = pil_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise Unreadable(f"not a readable image ({type(exc).__name__})") from None
    return eval_transform(size)(rgb)


# ------------------------------------------------------------------------------------------- predictions
@dataclass
class Predictions:
    """What :func:`predict` found: one row per predicted image, ``(name, reason)`` per skipped input, and the
    wall-clock seconds spent (reading, decoding and running)."""

    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    seconds: float
    top_k: int


def predict(
    predictor: Predictor,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 64,
    top_k: int = 1,
    seed: int = 0,
    on_skip: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Predictions:
    """Predict every image of ``paths`` (files, folders, archives) with ``predictor``, ``batch_size`` images per
    call. An unreadable input is skipped (``on_skip(name, reason)``) and the run goes on; ``on_progress(k)`` is
    called as ``k`` more inputs are done. Random decisions (an SDV network) are drawn from ``seed``."""
    if not 1 <= top_k <= predictor.config.num_classes:
        raise SkipnetError(f"--top-k must be in [1, {predictor.config.num_classes}] (its classes), got {top_k}")
    if predictor.in_channels not in (1, 3):  # images decode to RGB, or to its luma for a one-channel network
        raise SkipnetError(
            f"{predictor.source} takes {predictor.in_channels}-channel images; predict reads image files as RGB "
            "(3 channels) or grey (1), so it cannot prepare them"
        )
    files, _ = expand_inputs(paths)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    names: list[str] = []
    images: list[Tensor] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, data in iter_inputs(files):
            try:
                if isinstance(data, Unreadable):
                    raise data
                images.append(load_image(data, predictor.in_channels, predictor.image_size, predictor.prepare))
                names.append(name)
            except Unreadable as exc:
                skipped.append((name, str(exc)))
                if on_skip is not None:
                    on_skip(name, str(exc))
                if on_progress is not None:
                    on_progress(1)
            if len(images) == batch_size:
                rows += _batch_rows(predictor, names, images, top_k, on_progress)
                names, images = [], []
        if images:
            rows += _batch_rows(predictor, names, images, top_k, on_progress)
    return Predictions(rows, skipped, time.perf_counter() - start, top_k)


def computed_blocks(graph: str | None, decisions: Tensor) -> Tensor:
    """The gated blocks a model of that graph kind computes for each image: those its ``decisions`` take, or every
    block for a masked graph (it runs them all and mixes by the decision, saving nothing)."""
    return torch.ones_like(decisions) if graph == "masked" else decisions


def _batch_rows(
    p: Predictor, names: list[str], images: list[Tensor], top_k: int, on_progress: Callable[[int], None] | None
) -> list[dict[str, Any]]:
    logits, decisions = p(torch.stack(images))
    probs = logits.softmax(1)
    top_p, top_i = probs.topk(top_k, dim=1)
    macs = p.cost.macs_per_image(computed_blocks(p.graph, decisions), include_gates=p.gated)
    rows = []
    for j, name in enumerate(names):
        d = decisions[j]
        row = {
            "image": name,
            "class": p.classes[int(top_i[j, 0])],
            "class_index": int(top_i[j, 0]),
            "probability": float(top_p[j, 0]),
            "gated_blocks_executed": int(d.sum()),
            "gated_blocks": p.num_gates,
            "route": "".join("1" if v else "0" for v in d.tolist()),
            "macs": float(macs[j]),
        }
        if top_k > 1:
            row["top_k"] = [[p.classes[int(i)], float(q)] for q, i in zip(top_p[j], top_i[j])]
        rows.append(row)
    if on_progress is not None:
        on_progress(len(names))
    return rows


def output_format(path: str | Path) -> str:
    """``csv`` or ``jsonl``, from the extension of ``--out``; a one-line error for any other."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise SkipnetError(f"--out {path} must end in .csv or .jsonl (the format is taken from the extension)")
    return fmt


def write_predictions(preds: Predictions, path: str | Path) -> None:
    """The rows as CSV (``top2_class``, ``top2_probability``, ... with top-k) or JSON lines, written atomically
    (:func:`skipnet.fileio.atomic_write`): a crash or a full disk leaves the previous file."""
    from skipnet.fileio import atomic_write

    fmt = output_format(path)
    if fmt == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in preds.rows)
    else:
        buf = io.StringIO()
        fields = ["image", "class", "class_index", "probability", "gated_blocks_executed", "gated_blocks", "route"]
        fields += ["macs"] + [f"top{k}_{w}" for k in range(2, preds.top_k + 1) for w in ("class", "probability")]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in preds.rows:
            flat = {k: v for k, v in r.items() if k != "top_k"}
            for k, (c, q) in enumerate(r.get("top_k", [])[1:], start=2):
                flat[f"top{k}_class"], flat[f"top{k}_probability"] = c, q
            writer.writerow(flat)
        text = buf.getvalue()
    # the names are valid UTF-8 already (shown); whatever else: escaped, never a crash after the work is done
    atomic_write(path, lambda f: f.write(text.encode("utf-8", "backslashreplace")))
