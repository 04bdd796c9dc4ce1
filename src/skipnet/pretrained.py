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
checkpoint takes ``pretrained:NAME`` for the shipped file (:func:`resolve_checkpoint`, called by
:func:`skipnet.checkpoint.load_checkpoint`); ``create_model(name, pretrained=True)`` builds it. A name is an
entry of the index, or an architecture: then the first entry of that architecture in the index.

**Users' own models.** :func:`save_pretrained` writes ``model.safetensors`` and ``config.json`` (architecture,
threshold, gate mode, data normalisation) into a directory; :func:`from_pretrained` rebuilds the model from it
(or from a zoo name).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from skipnet.errors import SkipnetError

PREFIX = "pretrained:"
ENV = "SKIPNET_PRETRAINED_DIR"
INDEX = "index.json"
RESULTS = "RESULTS.md"
INDEX_FORMAT = 1
WEIGHTS = "model.safetensors"  # save_pretrained's files
CONFIG = "config.json"


# ------------------------------------------------------------------------------------------ the index
def zoo_dir(root: str | Path | None = None) -> Path:
    """The zoo folder: ``root`` if given, else ``$SKIPNET_PRETRAINED_DIR``, else the package's own."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV)
    return Path(env) if env else Path(__file__).resolve().parent / "pretrained"


def read_index(root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The zoo's entries, name -> entry, in index order; ``{}`` when the zoo has no index."""
    path = zoo_dir(root) / INDEX
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SkipnetError(f"{path} is not readable JSON ({type(exc).__name__}); reinstall skipnet") from None
    models = data.get("models") if isinstance(data, dict) else None
    entries_ok = isinstance(models, dict) and all(
        isinstance(v, dict) and isinstance(v.get("file"), str) for v in models.values()
    )
    if not entries_ok:
        raise SkipnetError(f"{path} is not a skipnet pretrained index (no 'models' mapping of entries with a file)")
    version = data.get("format", 0)
    if not isinstance(version, int) or version > INDEX_FORMAT:
        raise SkipnetError(f"{path} has index format {version!r}; this skipnet reads <= {INDEX_FORMAT}")
    return models


def _available(index: dict[str, dict[str, Any]]) -> str:
    if not index:
        return "no pretrained models are installed"
    return f"available: {', '.join(index)} ('skipnet models --pretrained' lists them)"


def get_entry(name: str, root: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """``(name, entry)`` of ``name``: an entry of the index, else the first entry whose architecture is ``name``."""
    index = read_index(root)
    if name in index:
        return name, index[name]
    for key, entry in index.items():
        if entry.get("arch") == name:
            return key, entry
    raise SkipnetError(f"no pretrained weights for {name!r}; {_available(index)}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pretrained_path(name: str, root: str | Path | None = None) -> Path:
    """The shipped safetensors file of ``name``, checked against the index's SHA-256."""
    key, entry = get_entry(name, root)
    path = zoo_dir(root) / str(entry["file"])
    if Path(entry["file"]).name != entry["file"] or not path.is_file():
        raise SkipnetError(f"pretrained model {key!r}: its file {entry['file']} is missing from {path.parent}")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise SkipnetError(
            f"pretrained model {key!r}: its index entry has no valid SHA-256 ('sha256': {digest!r}), so {path.name} "
            "cannot be checked and is not loaded; reinstall skipnet (or add the file's SHA-256 to the index)"[:300]
        )
    if sha256_of(path) != digest:
        raise SkipnetError(f"pretrained model {key!r}: {path} is damaged (SHA-256 differs from the index)")
    return path


def resolve_checkpoint(spec: str | Path) -> Path:
    """``pretrained:NAME`` -> the shipped file of ``NAME``; a directory written by :func:`save_pretrained` -> its
    weights file; any other path unchanged."""
    text = str(spec)
    if text.startswith(PREFIX):
        name = text[len(PREFIX) :]
        if not name:
            raise SkipnetError(f"{text!r} names no model; {_available(read_index())}")
        return pretrained_path(name)
    path = Path(spec)
    if path.is_dir() and (path / WEIGHTS).is_file():
        return path / WEIGHTS
    return path


# ------------------------------------------------------------------------------------------ loading
def check_mode(record: dict[str, Any], ckpt: dict[str, Any], what: str) -> None:
    """Refuse a description (an index entry, a ``config.json``) whose gate mode is not the weights' own: the
    model runs in the weights' mode, and figures measured in another would be silently wrong."""
    want, have = record.get("mode"), ckpt.get("mode", "greedy")
    if want is not None and want != have:
        raise SkipnetError(
            f"{what} disagree on the gate mode ({want!r} against the weights' {have!r}); reinstall or save it again"[
                :300
            ]
        )


def check_entry(spec: str | Path, ckpt: dict[str, Any]) -> None:
    """For ``pretrained:NAME``: the shipped file must run in the mode its index entry was measured in."""
    text = str(spec)
    if text.startswith(PREFIX) and text[len(PREFIX) :]:
        key, entry = get_entry(text[len(PREFIX) :])
        check_mode(entry, ckpt, f"the index entry of {key!r} and its file")


def load_pretrained(name: str, root: str | Path | None = None, map_location: str = "cpu"):
    """The shipped model ``name`` (eval mode, its threshold and gate mode set), as ``(model, checkpoint)``."""
    from skipnet.checkpoint import load_checkpoint, model_from_checkpoint

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
    ``std`` and ``classes`` the model expects, as in a checkpoint's ``data`` record). Both files are written
    atomically; existing ones are refused unless ``overwrite``. Returns the directory."""
    from skipnet.checkpoint import atomic_write, export_safetensors, make_checkpoint

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
        "data": ckpt["data"],
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
    from skipnet.checkpoint import load_checkpoint, model_from_checkpoint

    text = str(directory_or_name)
    directory = Path(directory_or_name)
    if not directory.is_dir():
        if directory.exists() or "/" in text or os.sep in text:
            raise SkipnetError(f"{text} is not a directory written by save_pretrained")
        return load_pretrained(text[len(PREFIX) :] if text.startswith(PREFIX) else text, map_location=map_location)[0]
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise SkipnetError(f"{directory} has no {WEIGHTS}; write it with skipnet.pretrained.save_pretrained")
    ckpt = load_checkpoint(weights, map_location)
    config_path = directory / CONFIG
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SkipnetError(f"{config_path} is not readable JSON ({type(exc).__name__})") from None
        if not isinstance(config, dict) or config.get("arch") != ckpt["arch"]:
            raise SkipnetError(f"{config_path} describes another architecture than {weights}; save the model again")
        check_mode(config, ckpt, f"{config_path} and {weights}")
    return model_from_checkpoint(ckpt, weights)


def _version() -> str:
    import skipnet

    return skipnet.__version__
