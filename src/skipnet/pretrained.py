"""Pretrained SkipNets shipped inside the package, and a directory format for users' own models.

**The zoo.** The folder ``skipnet/pretrained/`` beside this module (the environment variable
``SKIPNET_PRETRAINED_DIR`` points elsewhere, e.g. for tests) holds one safetensors export per model
(:func:`skipnet.checkpoint.export_safetensors`: weights, architecture, threshold and data normalisation; no pickle)
and ``index.json``::

    {"format": 1, "models": {NAME: {"file": "NAME.safetensors", "sha256": ..., "arch": ..., "dataset": ...,
      "data": ..., "split": "test", "images": ..., "accuracy": ..., "macs_mean": ..., "macs_all_on": ...,
      "macs_reduction": ..., "computation_percentage": ..., "latency_ratio": ..., "commands": [...], "date": ...}}}

whose numbers are ``skipnet eval`` of the shipped file, and ``RESULTS.md``, the same as a table (both written by
the maintainers' script ``benchmarks/make_pretrained.py``, which drives the CLI). Everything that reads a
checkpoint takes ``pretrained:NAME`` for the shipped file (:func:`skipnet.zoo.resolve_checkpoint`, called by
:func:`skipnet.checkpoint.load_checkpoint`); ``create_model(name, pretrained=True)`` builds it. A name is an
entry of the index, or an architecture: then the first entry of that architecture in the index.

**Users' own models.** :func:`save_pretrained` writes ``model.safetensors`` and ``config.json`` (architecture,
threshold, gate mode, data normalisation) into a directory; :func:`from_pretrained` rebuilds the model from it
(or from a zoo name).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from skipnet.checkpoint import data_record, export_safetensors, load_checkpoint, make_checkpoint, model_from_checkpoint
from skipnet.config import ArchConfig
from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_write
from skipnet.registry import create_model as create_architecture
from skipnet.zoo import (  # noqa: F401 (the index's names, re-exported: callers import them from here)
    CONFIG,
    ENV,
    INDEX,
    INDEX_FORMAT,
    PREFIX,
    RESULTS,
    WEIGHTS,
    check_entry,
    check_mode,
    get_entry,
    pretrained_path,
    read_index,
    resolve_checkpoint,
    sha256_of,
    zoo_dir,
)


# ------------------------------------------------------------------------------------------ loading
def create_model(name: str | ArchConfig, pretrained: bool = False, **overrides: Any):
    """A :class:`~skipnet.gated.GatedResNet` from a registered name (or a config) and optional overrides
    (:func:`skipnet.registry.create_model`), or with ``pretrained=True`` the model shipped with skipnet (``name`` is
    a shipped model or its architecture) in eval mode at its stored threshold, without overrides. This is
    ``skipnet.create_model``."""
    if not pretrained:
        return create_architecture(name, **overrides)
    changed = sorted(k for k, v in overrides.items() if v is not None)
    if isinstance(name, ArchConfig) or changed:
        what = f"overrides ({', '.join(changed)})" if changed else "an ArchConfig"
        raise SkipnetError(f"pretrained=True takes a registered or shipped name without {what}")
    return load_pretrained(name)[0]


def load_pretrained(name: str, root: str | Path | None = None, map_location: str = "cpu"):
    """The shipped model ``name`` (eval mode, its threshold and gate mode set), as ``(model, checkpoint)``."""
    path = pretrained_path(name, root)
    ckpt = load_checkpoint(path, map_location)
    key, entry = get_entry(name, root)
    check_mode(entry, ckpt, f"the index entry of {key!r} and its file")
    return model_from_checkpoint(ckpt, f"{PREFIX}{name}"), ckpt


def save_pretrained(
    model, directory: str | Path, *, data: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write ``model`` (a :class:`~skipnet.gated.GatedResNet`, possibly DDP/compiled) to ``directory`` as
    ``model.safetensors`` (weights and metadata, see :func:`~skipnet.checkpoint.export_safetensors`) and
    ``config.json`` (architecture, threshold, keep ratio, gate mode and ``data``: the normalisation ``mean`` /
    ``std`` and ``classes`` the model expects, as in a checkpoint's ``data`` record; by default the record the model
    was loaded with). Both files are written
    atomically; existing ones are refused unless ``overwrite``. Returns the directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SkipnetError(f"{directory} is a file; save_pretrained writes a directory")
    held = [f for f in (WEIGHTS, CONFIG) if (directory / f).exists()]
    if held and not overwrite:
        raise SkipnetError(f"{directory} already holds {', '.join(held)}; pass overwrite=True to replace them")
    ckpt = make_checkpoint(model, data=data)
    config = {
        "format": "skipnet",
        "arch": ckpt["arch"],
        "threshold": ckpt["threshold"],
        "keep_ratio": ckpt["keep_ratio"],
        "mode": ckpt["mode"],
        "data": data_record(ckpt),
        "skipnet_version": _version(),
    }
    export_safetensors(ckpt, directory / WEIGHTS, source="save_pretrained")
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / CONFIG, lambda f: f.write(text.encode()))
    return directory


def from_pretrained(directory_or_name: str | Path, map_location: str = "cpu"):
    """The model saved by :func:`save_pretrained` in a directory, or a shipped model (a zoo name, also as
    ``pretrained:NAME``); eval mode, threshold and gate mode set. ``config.json``, when present, must describe the
    same architecture as the weights' metadata."""
    text = str(directory_or_name)
    directory = Path(directory_or_name)
    if not directory.is_dir():
        if directory.exists() or "/" in text or os.sep in text:
            raise SkipnetError(f"{text} is not a directory written by save_pretrained")
        return load_pretrained(text[len(PREFIX) :] if text.startswith(PREFIX) else text, map_location=map_location)[0]
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise SkipnetError(f"{directory} has no {WEIGHTS}; write it with skipnet.pretrained.save_pretrained")
    ckpt = load_checkpoint(directory, map_location)  # config.json checked against the weights (zoo.check_entry)
    return model_from_checkpoint(ckpt, weights)


def _version() -> str:
    import skipnet

    return skipnet.__version__
