"""Checkpoints as plain data: written atomically, read with ``torch.load(weights_only=True)``.

Layout (``FORMAT_VERSION`` 1)::

    {format_version, kind: "skipnet", arch: ArchConfig dict, state_dict, threshold, keep_ratio, mode,
     optimizer, scheduler, step, epoch, rng: {torch, cuda, python}, metrics, train_config, data}

Weights are saved from the unwrapped, uncompiled module (no ``module.`` / ``_orig_mod.`` prefixes).

Guarantees:

- **Safe loading.** ``.pt`` files are read with ``weights_only=True``: a pickle that names anything but
  tensors and plain containers is refused (one-line :class:`SkipnetError`) and nothing in it runs.
- **Atomic writes** and **fault injection**: see :mod:`skipnet.fileio`.
- **Exports.** :func:`export_safetensors` writes the weights as safetensors with the architecture, threshold
  and data normalisation in the string metadata; :func:`load_checkpoint` reads such a file like a ``.pt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import pickletools
import random
import re
import unicodedata
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from skipnet.config import ArchConfig
from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_save, atomic_write
from skipnet.gated import GatedResNet, GateMode
from skipnet.policy import ALL_SKIP_THRESHOLD
from skipnet.zoo import WEIGHTS, check_entry, resolve_checkpoint

FORMAT_VERSION = 1

log = logging.getLogger(__name__)


def data_record(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of the data it was trained on (``classes``, ``mean``/``std``, ``spec``, ``val_split``,
    ``prepare``, ...; checked at load by :func:`check_data_record`), ``{}`` where it records none."""
    record = ckpt.get("data")
    return record if isinstance(record, dict) else {}


def recorded_val_split(ckpt: dict[str, Any]) -> float:
    """The share of the training images a checkpoint held out as its validation split (0 when it held out none)."""
    return float(data_record(ckpt).get("val_split") or 0.0)


def checkpoint_stats(ckpt: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The normalisation a checkpoint was trained with, or ``None``."""
    meta = data_record(ckpt)
    return (tuple(meta["mean"]), tuple(meta["std"])) if meta.get("mean") else None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    epoch: int = 0,
    metrics: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A checkpoint of ``model`` (weights, architecture, inference settings and what is given). ``data`` is the
    record of the data the weights were trained on (normalisation ``mean``/``std``, ``classes``, ...), as a whole;
    without it (``None``), the record the model was loaded with (``model.data_record``; none for a model pickled
    by an earlier version)."""
    net = unwrap(model)
    if not isinstance(net, GatedResNet):
        raise SkipnetError(f"a checkpoint holds a skipnet GatedResNet (create_model, load_model), not {type(net)}")
    threshold, keep = float(net.threshold), float(net.keep_ratio)
    if not ((0.0 <= threshold <= 1.0 or threshold == ALL_SKIP_THRESHOLD) and 0.0 <= keep <= 1.0):  # no reader takes it
        raise SkipnetError(
            f"the model's threshold {threshold} and keep ratio {keep} must lie in [0, 1] (or the threshold be "
            f"calibrate's all-skip {ALL_SKIP_THRESHOLD})"
        )
    ckpt = {
        "format_version": FORMAT_VERSION,
        "kind": "skipnet",
        "arch": net.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "threshold": threshold,
        "keep_ratio": keep,
        "mode": str(net.mode.value),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "rng": rng_state(),
        "metrics": metrics or {},
        "train_config": train_config or {},
        "data": dict(getattr(net, "data_record", {}) if data is None else data),  # a loaded model keeps its record
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def save_checkpoint(path: str | Path, model: nn.Module, **kwargs: Any) -> None:
    """Build a checkpoint of ``model`` (see :func:`make_checkpoint`) and write it atomically: a ``.safetensors``
    path gets a safetensors export (:func:`export_safetensors`: weights and inference settings, no optimizer or
    schedule state), any other a torch checkpoint."""
    if Path(path).is_dir():
        raise SkipnetError(f"{path} is a directory; give a file name such as {Path(path) / 'model.pt'}")
    ckpt = make_checkpoint(model, **kwargs)
    if str(path).lower().endswith(".safetensors"):
        export_safetensors(ckpt, Path(path), source="save_checkpoint")
    else:
        atomic_save(ckpt, path)


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_UNSUPPORTED_RE = re.compile(r"Unsupported (operand|class) [^\n]{1,80}")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MAX_PICKLE = 64 << 20  # a checkpoint's pickle (tensors live beside it) is kilobytes


def _refused_object(path: Path, exc: BaseException) -> str | None:
    """The Python object (``module.name``) whose import made safe loading refuse ``path``: named by torch's error,
    else the first global the pickle imports beyond torch's own and ``collections`` (read, never run)."""
    found = _GLOBAL_RE.search(str(exc))
    if found:
        return found.group(1)
    try:
        names = _pickle_globals(_pickle_bytes(path))
    except Exception:  # noqa: BLE001 - a pickle too damaged to scan: torch's error stands
        return None
    return next((n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))), None)


def _pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            member = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
            if member.file_size > _MAX_PICKLE:
                raise ValueError("pickle too large to scan")
            return z.read(member)
    with open(path, "rb") as f:
        return f.read(_MAX_PICKLE)


def _pickle_globals(raw: bytes) -> list[str]:
    """The ``module.name`` of every GLOBAL / STACK_GLOBAL in the pickle ``raw``, in order (opcodes only)."""
    names, strings = [], []
    for op, arg, _ in pickletools.genops(raw):
        if op.name in _STRING_OPS:
            strings.append(str(arg))
        elif op.name == "GLOBAL":
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
    return names


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _check_zip(path: Path) -> None:
    """A ``torch.save`` file is a zip archive whose records carry CRC-32s that ``torch.load`` never checks: check
    them, so that a damaged file is refused instead of loading wrong weights."""
    if not zipfile.is_zipfile(path):
        return  # not a zip: torch.load says what it is not
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise SkipnetError(f"{path} is damaged ({type(exc).__name__}: {exc})"[:300]) from None
    if bad is not None:
        raise SkipnetError(f"{path} is damaged: its record {bad} fails its checksum")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a skipnet checkpoint safely (``weights_only=True``) with clear errors for user mistakes.

    Also reads a ``.safetensors`` export (:func:`export_safetensors`); it comes back as a checkpoint without
    optimizer state. ``pretrained:NAME`` is the file shipped for NAME (:mod:`skipnet.zoo`).
    """
    spec, path = path, resolve_checkpoint(path)
    if path.is_dir():
        raise SkipnetError(f"{path} is a directory, not a checkpoint (a save_pretrained directory holds {WEIGHTS})")
    if not path.is_file():
        raise SkipnetError(f"checkpoint {str(path)!r} does not exist")
    lower = path.suffix.lower()
    if lower in (".onnx", ".pt2"):
        takes = "skipnet predict and skipnet bench take it" if lower == ".onnx" else "skipnet predict takes it"
        named = "" if path.suffix == lower else f" (named {lower})"
        raise SkipnetError(
            f"{path} is an exported graph, not a checkpoint: {takes}{named}; this command needs the checkpoint it "
            "was exported from"
        )
    if _is_safetensors(path):
        ckpt = load_safetensors(path, map_location)
        check_entry(spec, ckpt)
        return ckpt
    _check_zip(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a user-facing "not a checkpoint"
        refused = _refused_object(path, exc) if isinstance(exc, pickle.UnpicklingError) else None
        if refused:
            raise SkipnetError(
                f"refused to load {path}: it contains the Python object {refused}, which safe loading "
                "(weights_only=True) never runs; use a checkpoint written by 'skipnet train' or 'skipnet export'"
            ) from None
        detail = _UNSUPPORTED_RE.search(str(exc))
        what = f"{type(exc).__name__}: {detail.group(0)}" if detail else type(exc).__name__
        raise SkipnetError(f"{path} is not a readable skipnet checkpoint ({what})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "skipnet":
        raise SkipnetError(f"{path} is not a skipnet checkpoint")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SkipnetError(f"{path} has format version {version!r}; this skipnet reads <= {FORMAT_VERSION}")
    check_contents(ckpt, path)
    return ckpt


def _unit_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def check_contents(ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse, in one line, a checkpoint whose records are malformed: the architecture (bounded, see
    :mod:`skipnet.config`), a state dict of named tensors, a threshold and keep ratio in [0, 1], a known gate mode
    and a step count. Whether the tensors fit the network is checked when it is built (:func:`model_from_checkpoint`).
    """
    if "arch" not in ckpt:
        raise SkipnetError(f"{path} has no architecture record ('arch'); it was not written by skipnet")
    try:
        ArchConfig.from_dict(ckpt["arch"])
    except SkipnetError as exc:
        raise SkipnetError(f"{path}: {exc}") from None
    except TypeError as exc:
        raise SkipnetError(f"{path} has a malformed architecture record ({exc})") from None
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise SkipnetError(f"{path} has no state dict of named tensors")
    if "keep_ratio" in ckpt and not _unit_number(ckpt["keep_ratio"]):
        raise SkipnetError(f"{path} has keep_ratio {ckpt['keep_ratio']!r}; it must be a number in [0, 1]"[:300])
    # calibration's all-skip point (a budget no threshold in [0, 1] meets) is a valid greedy threshold too
    if "threshold" in ckpt and not (_unit_number(ckpt["threshold"]) or ckpt["threshold"] == ALL_SKIP_THRESHOLD):
        raise SkipnetError(
            f"{path} has threshold {ckpt['threshold']!r}; it must be a number in [0, 1] or {ALL_SKIP_THRESHOLD}"[:300]
        )
    modes = [m.value for m in GateMode]
    if "mode" in ckpt and ckpt["mode"] not in modes:
        raise SkipnetError(f"{path} has gate mode {ckpt['mode']!r}; expected one of {', '.join(modes)}"[:300])
    step = ckpt.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise SkipnetError(f"{path} has step {step!r}; it must be a count >= 0"[:300])
    check_data_record(ckpt.get("data", {}), ckpt["arch"], path)  # the record as stored: refused if malformed
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise SkipnetError(
            f"{path} holds non-finite weights or statistics (NaN or inf in {bad}); it cannot be evaluated or trained "
            "from: use an earlier checkpoint"[:300]
        )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# How a data record says its images were made S x S (``skipnet.data``'s large- and small-image paths).
PREPARATIONS = ("crop", "resize")


def check_data_record(data: Any, arch: dict[str, Any], path: str | Path) -> None:
    """Refuse, in one line, a ``data`` record that does not describe the images the architecture takes: a mapping
    whose ``mean`` / ``std`` (if given) hold one finite number per input channel, every ``std`` > 0; whose
    ``num_classes``, ``in_channels`` and ``image_size`` (if given) are the architecture's; whose ``classes`` are
    that many names and whose ``val_split`` is a fraction in [0, 1)."""

    def refuse(what: str) -> SkipnetError:
        return SkipnetError(f"{path} has a malformed data record: {what}"[:300])

    if not isinstance(data, dict):
        raise refuse(f"{type(data).__name__} {data!r}, not a mapping"[:120])
    channels = arch.get("in_channels", 3)
    mean, std = data.get("mean"), data.get("std")
    if mean or std:
        for name, values in (("mean", mean), ("std", std)):
            if not isinstance(values, list) or not all(_number(v) for v in values):
                raise refuse(f"{name} {values!r} is not a list of finite numbers"[:150])
            if len(values) != channels:
                raise refuse(f"{name} has {len(values)} values but the network takes {channels}-channel images")
        if not all(v > 0 for v in std):
            raise refuse(f"std {std!r} must be > 0 in every channel (the images are divided by it)"[:150])
    for key in ("num_classes", "in_channels", "image_size"):
        if key in data and data[key] is not None and data[key] != arch.get(key):
            raise refuse(f"{key} {data[key]!r} but the architecture's is {arch.get(key)!r}"[:150])
    if data.get("prepare") not in (None, *PREPARATIONS):
        raise refuse(f"prepare {data['prepare']!r} is not 'crop' or 'resize'"[:150])
    classes = data.get("classes")
    if classes is not None and (
        not isinstance(classes, list)
        or not all(isinstance(c, str) for c in classes)
        or len(classes) != arch.get("num_classes")
    ):
        raise refuse(f"classes must be {arch.get('num_classes')} names, got {classes!r}"[:150])
    split = data.get("val_split")
    if split is not None and not (_number(split) and 0.0 <= split < 1.0):
        raise refuse(f"val_split {split!r} must be a fraction in [0, 1)"[:150])


# ------------------------------------------------------------------------------------------ safetensors
def export_safetensors(
    ckpt: dict[str, Any], out: str | Path, *, source: str | None = None, replace: bool = True
) -> None:
    """Write the weights of ``ckpt`` to ``out`` as safetensors, atomically (``replace=False``: never over a file,
    :class:`FileExistsError`).

    The string metadata holds everything needed to rebuild and run the model: ``format`` ("skipnet"),
    ``format_version``, ``arch`` (JSON ArchConfig), ``threshold``, ``keep_ratio``, ``mode``, ``data`` (JSON:
    normalisation, classes, validation split), ``stage``, ``step`` and, if present, ``calibration`` (JSON).
    """
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["state_dict"].items()}
    meta = {
        "format": "skipnet",
        "format_version": str(FORMAT_VERSION),
        "arch": json.dumps(ckpt["arch"]),
        "threshold": repr(float(ckpt.get("threshold", 0.5))),
        "keep_ratio": repr(float(ckpt.get("keep_ratio", 1.0))),
        "mode": str(ckpt.get("mode", "greedy")),
        "data": json.dumps(ckpt.get("data") or {}),  # as stored: a malformed record is refused when read back
        "stage": str(ckpt.get("stage") or (ckpt.get("train_config") or {}).get("stage") or ""),
        "step": str(int(ckpt.get("step", 0))),
    }
    if source:
        meta["source"] = source
    if ckpt.get("calibration"):
        cal = {k: v for k, v in ckpt["calibration"].items() if k != "points"}
        meta["calibration"] = json.dumps(cal)
    if isinstance(ckpt.get("data_fingerprint"), dict):  # its validation split stays checked (evaluate.check_val_split)
        subsets = dict(zip(SUBSETS, fingerprint_subsets(ckpt), strict=True))
        meta["data_fingerprint"] = json.dumps({"splits": ckpt["data_fingerprint"], "subsets": subsets})
    # the metadata changes the header only, never the data section
    meta["data_sha256"] = hashlib.sha256(_data_section(save(tensors, metadata=meta))).hexdigest()
    meta[HEADER_DIGEST] = _file_digest(save(tensors, metadata=meta))
    payload = save(tensors, metadata=meta)
    if _file_digest(payload) != meta[HEADER_DIGEST]:  # the digest excludes itself, so adding it changes nothing
        raise SkipnetError(f"cannot write {out}: its checksum does not reproduce")
    atomic_write(out, lambda f: f.write(payload), replace=replace)


SUBSETS = ("limit_train", "limit_test")  # the seeded subsets a run's data fingerprint was taken of


def fingerprint_subsets(ckpt: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(limit_train, limit_test)``: the seeded subsets of its data that a checkpoint's ``data_fingerprint`` was
    taken of (its run's ``train_config``, or ``data_subsets`` where an export carried them); ``None``: all."""
    record = ckpt.get("data_subsets")
    if not isinstance(record, dict):
        record = ckpt.get("train_config") if isinstance(ckpt.get("train_config"), dict) else {}
    values = (record.get(k) for k in SUBSETS)
    return tuple(v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None for v in values)


def _fingerprint_record(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``data_fingerprint`` entry of a safetensors export: ``(fingerprint, subsets)``; ValueError if malformed."""
    record = json.loads(text)
    splits, subsets = (record.get(k) if isinstance(record, dict) else None for k in ("splits", "subsets"))
    if not (isinstance(splits, dict) and isinstance(subsets, dict)):
        raise ValueError("data_fingerprint")
    return splits, subsets


HEADER_DIGEST = "sha256"  # metadata key: SHA-256 of the header (every entry but this one) and the data section
MAX_HEADER = 100_000_000  # bytes; safetensors' own limit


def _data_section(raw: bytes) -> bytes:
    return raw[8 + int.from_bytes(raw[:8], "little") :]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in the header")
    return dict(pairs)


def _canonical_header(header: bytes) -> tuple[bytes, dict[str, str]]:
    """The header JSON in one canonical form (sorted keys, no spaces) without the :data:`HEADER_DIGEST` entry,
    and its metadata. A repeated key is refused: two readers could take different ones."""
    parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_no_duplicates)
    if not isinstance(parsed, dict):
        raise ValueError("the header is not a JSON object")
    meta = parsed.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("the header's metadata is not a JSON object")
    parsed["__metadata__"] = {k: v for k, v in meta.items() if k != HEADER_DIGEST}
    text = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return text.encode(), meta


def _file_digest(raw: bytes) -> str:
    """:data:`HEADER_DIGEST` of a safetensors file held in memory (see :func:`_file_sha256`)."""
    n = int.from_bytes(raw[:8], "little")
    canonical, _ = _canonical_header(raw[8 : 8 + n])
    h = hashlib.sha256(len(canonical).to_bytes(8, "little") + canonical)
    h.update(raw[8 + n :])
    return h.hexdigest()


def _file_sha256(path: Path) -> tuple[str, str, dict[str, str]]:
    """``(header-and-data digest, data digest, metadata)`` of a safetensors file, read in blocks. The first
    covers every tensor's name, dtype, shape and offsets and every metadata entry (but itself) as well as the
    bytes of the data section: a swapped header entry or an edited threshold fails it, not only damaged weights.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, MAX_HEADER):
            raise ValueError("header size past the end of the file")
        canonical, meta = _canonical_header(f.read(n))
        whole = hashlib.sha256(len(canonical).to_bytes(8, "little") + canonical)
        data = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            whole.update(block)
            data.update(block)
    return whole.hexdigest(), data.hexdigest(), meta


def _verify_safetensors(path: Path, meta: dict[str, str]) -> None:
    """Check a skipnet safetensors file against the checksums in its metadata: header and data together
    (:data:`HEADER_DIGEST`), or, in a file written before that existed, the data section (``data_sha256``)."""
    whole, data, parsed = _file_sha256(path)
    if parsed != meta:  # what safetensors' reader took is what was checked
        raise SkipnetError(f"{path} is damaged: its header reads differently in two parsers")
    if HEADER_DIGEST in meta:
        if whole != meta[HEADER_DIGEST]:
            raise SkipnetError(
                f"{path} is damaged or edited: its header or tensor data fails the checksum in its metadata"
            )
        if "data_sha256" in meta and data != meta["data_sha256"]:
            raise SkipnetError(f"{path} is damaged: its tensor data fails the checksum in its metadata")
        return
    digest = meta.get("data_sha256")  # exports written before the header checksum; before that, none
    if digest is not None and data != digest:
        raise SkipnetError(f"{path} is damaged: its tensor data fails the checksum in its metadata")
    log.warning(
        "%s was written before skipnet checksummed safetensors headers: its metadata (threshold, normalisation, "
        "tensor names) is not verified; export it again to protect it",
        path,
    )


def load_safetensors(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a :func:`export_safetensors` file back as a checkpoint dict (no optimizer, scheduler or RNG state).

    safetensors' own reader (``safe_open``) gives the metadata and memory-mapped tensors; the data section is
    checked against the ``data_sha256`` of the metadata before any tensor is taken."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "skipnet" or "arch" not in meta:
                raise SkipnetError(
                    f"{path} is a safetensors file without skipnet metadata; write it with 'skipnet export'"
                )
            _verify_safetensors(path, meta)
            state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, TypeError, RecursionError) as exc:
        raise SkipnetError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
    version = meta.get("format_version", "0")
    version = int(version) if version.isdigit() and len(version) < 6 else FORMAT_VERSION + 1
    if version > FORMAT_VERSION:
        raise SkipnetError(f"{path} has format version {version}; this skipnet reads <= {FORMAT_VERSION}")
    try:
        ckpt: dict[str, Any] = {
            "format_version": version,
            "kind": "skipnet",
            "arch": json.loads(meta["arch"]),
            "state_dict": {k: v.to(map_location) for k, v in state_dict.items()},
            "threshold": float(meta.get("threshold", 0.5)),
            "keep_ratio": float(meta.get("keep_ratio", 1.0)),
            "mode": meta.get("mode", "greedy"),
            "data": json.loads(meta.get("data", "{}")),
            "stage": meta.get("stage") or None,
            "step": int(meta.get("step", 0)),
            "optimizer": None,
            "scheduler": None,
            "metrics": {},
            "train_config": {},
            "source_format": "safetensors",
        }
        if meta.get("calibration"):
            ckpt["calibration"] = json.loads(meta["calibration"])
        if meta.get("data_fingerprint"):
            ckpt["data_fingerprint"], ckpt["data_subsets"] = _fingerprint_record(meta["data_fingerprint"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise SkipnetError(f"{path} has malformed skipnet metadata ({type(exc).__name__})") from None
    check_contents(ckpt, path)
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], source: str | Path = "the checkpoint") -> GatedResNet:
    """Rebuild the network of a loaded checkpoint, weights and inference settings included (eval mode).

    Tensors that are missing, extra or of another shape than the architecture's are a one-line error."""
    check_contents(ckpt, source)
    model = GatedResNet(ArchConfig.from_dict(ckpt["arch"]))
    own, sd = model.state_dict(), ckpt["state_dict"]
    kinds = [k for k, v in sd.items() if k in own and v.is_floating_point() != own[k].is_floating_point()]
    if kinds:  # load_state_dict would cast e.g. an int64 or bool tensor into float weights
        raise SkipnetError(f"{source} stores {kinds[0]} as {sd[kinds[0]].dtype}, not {own[kinds[0]].dtype}")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        what = lines[1] if len(lines) > 1 else (lines or ["mismatch"])[0]
        raise SkipnetError(
            f"{source} does not hold the weights of its architecture, {_arch_summary(ckpt['arch'])}: {what}"[:400]
        ) from None
    model.threshold = float(ckpt.get("threshold", 0.5))
    model.keep_ratio = float(ckpt.get("keep_ratio", 1.0))
    model.mode = type(model.mode)(ckpt.get("mode", model.mode.value))
    model.data_record = dict(data_record(ckpt))
    return model.eval()


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GatedResNet, dict[str, Any]]:
    """Load ``path`` and return ``(model, checkpoint)``; the model is in eval mode with its threshold set."""
    ckpt = load_checkpoint(path, map_location)
    return model_from_checkpoint(ckpt, path), ckpt


def _arch_summary(arch: dict[str, Any]) -> str:
    width = f", width {arch.get('width')}" if arch.get("family") == "cifar" else ""
    classes = arch.get("num_classes")
    return f"{arch.get('name')} ({arch.get('family')}, depth {arch.get('depth')}{width}, {classes} classes)"


def load_weights_into(model: GatedResNet, ckpt: dict[str, Any], source: str = "checkpoint") -> list[str]:
    """Initialise ``model`` from another stage's weights (``--init``).

    Backbone weights must match exactly (same depth, widths, classes); gate weights are copied where both
    sides have them, so SP can start from a base ResNet. Returns the names left at their initial values.
    """
    src = ckpt["state_dict"]
    own = model.state_dict()
    problems = [k for k in own if k.startswith("backbone.") and (k not in src or src[k].shape != own[k].shape)]
    if problems:
        theirs, mine = ckpt.get("arch") or {}, model.config.to_dict()
        if theirs.get("in_channels", 3) != mine.get("in_channels", 3):
            raise SkipnetError(
                f"{source} takes {theirs.get('in_channels', 3)}-channel images but this data has "
                f"{mine.get('in_channels', 3)}-channel ones; --init needs a checkpoint trained on data with the same "
                "channels"
            )
        if all(theirs.get(k) == mine.get(k) for k in ("family", "depth", "width")) and theirs.get(
            "num_classes"
        ) != mine.get("num_classes"):
            raise SkipnetError(
                f"{source} was trained for {theirs.get('num_classes')} classes but this data has "
                f"{mine.get('num_classes')}; --init needs a checkpoint trained on data with the same classes"
            )
        what = f" is {_arch_summary(theirs)}," if theirs else ""
        raise SkipnetError(
            f"{source}{what} which does not match this architecture, {_arch_summary(mine)} ({len(problems)} "
            f"backbone tensors differ, e.g. {problems[0]}); --init needs the same depth, width and number of classes"
        )
    loadable = {k: v for k, v in src.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return sorted(set(own) - set(loadable))


def require_same_classes(model: GatedResNet, data: Any, source: str, classes: Any = None) -> None:
    """Refuse to evaluate a model on data with another number of classes or other class names than ``classes``
    (the names the checkpoint recorded, if any: labels would be silently wrong), of another number of image
    channels (the first convolution would fail) or of another image size (MACs would be counted at the wrong one)."""
    if int(data.in_channels) != int(model.config.in_channels):
        raise SkipnetError(
            f"{source} takes {model.config.in_channels}-channel images but {data.name} has {data.in_channels}-channel "
            "ones; evaluate it on the data set it was trained on"
        )
    if int(data.image_size) != int(model.config.image_size):  # the cost model would count MACs at another size
        raise SkipnetError(
            f"{source} is built for {model.config.image_size}-px images but {data.name} gives {data.image_size}-px "
            "ones; evaluate it on the data set it was trained on"
        )
    if int(data.num_classes) != int(model.config.num_classes):
        raise SkipnetError(
            f"{source} was trained for {model.config.num_classes} classes but {data.name} has {data.num_classes} "
            "class folders; evaluate it on the data set it was trained on"
        )
    require_same_class_names(classes, data, source, "evaluate it on the data set it was trained on")


def require_same_class_names(classes: Any, data: Any, source: str, advice: str) -> None:
    """Refuse a checkpoint that recorded other class names (``classes``) than ``data``'s, in order: its class ``i``
    would be scored, predicted or distilled as the data's class ``i``. Nothing to check where either names none."""
    names = list(getattr(data, "classes", None) or [])
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes) and names and classes != names:
        if len(classes) != len(names):
            n, m = len(classes), len(names)
            raise SkipnetError(f"{source} was trained for {n} classes but {data.name} has {m}; {advice}")
        diff = next(i for i, (a, b) in enumerate(zip(classes, names, strict=True)) if a != b)
        if set(classes) != set(names) and sorted(map(_nfc, classes)) == sorted(map(_nfc, names)):
            named = next(n for n in names if n not in classes)
            recorded = next(c for c in classes if _nfc(c) == _nfc(named))
            raise SkipnetError(_normal_form_message(recorded, named, source, data.name))
        raise SkipnetError(
            f"{source} was trained with class {diff} named {classes[diff]!r} but {data.name} names it "
            f"{names[diff]!r}; {advice}"
        )


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _form(name: str) -> str:
    """The Unicode normal form a name is in: NFC (composed), NFD (decomposed) or mixed."""
    nfc, nfd = unicodedata.is_normalized("NFC", name), unicodedata.is_normalized("NFD", name)
    return "NFC" if nfc else "NFD" if nfd else "mixed"


def _normal_form_message(recorded: str, named: str, source: str, where: str) -> str:
    """The refusal of class names that are the checkpoint's after Unicode NFC normalisation, e.g. a folder copied
    from macOS, whose file systems store names decomposed (NFD): the same classes, in other code points, which also
    sort into another order, so the labels would not match."""
    form = _form(recorded)
    how = "convmv -f utf8 -t utf8 --nfc -r --notest DIR" if form == "NFC" else f"unicodedata.normalize('{form}', n)"
    return (
        f"{where} names the class {recorded!r} of {source} {named!r}: the same name, differing only in Unicode "
        f"normal form ({_form(named)}, as in a folder copied from macOS, against the checkpoint's {form}), which can "
        f"reorder the classes and so their labels; rename {where}'s class folders to {form} (e.g. {how})"
    )
