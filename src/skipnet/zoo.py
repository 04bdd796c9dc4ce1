"""The pretrained zoo's index: names to shipped files, each checked against its SHA-256, and a spec's resolution.

``pretrained:NAME`` (and a directory written by :func:`skipnet.pretrained.save_pretrained`) resolve here to a file
(:func:`resolve_checkpoint`), so that :func:`skipnet.checkpoint.load_checkpoint` reads it like any other; loading
and saving models is :mod:`skipnet.pretrained`, above :mod:`skipnet.checkpoint`. This module reads JSON and
hashes files and knows nothing of models: the format of the folder is described in :mod:`skipnet.pretrained`.
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


# ------------------------------------------------------------------------------------------ entries and weights
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
    """For ``pretrained:NAME``: the shipped file must run in the mode its index entry was measured in. For a
    directory written by :func:`skipnet.pretrained.save_pretrained`: its ``config.json``, when present, must say
    what the weights' metadata says (architecture, threshold, keep ratio, gate mode, data record); the model runs
    as the weights say, so an edited config would be silently ignored."""
    text = str(spec)
    if text.startswith(PREFIX) and text[len(PREFIX) :]:
        key, entry = get_entry(text[len(PREFIX) :])
        check_mode(entry, ckpt, f"the index entry of {key!r} and its file")
    elif Path(spec).is_dir() and (Path(spec) / CONFIG).is_file():
        _check_config(Path(spec) / CONFIG, ckpt)


def _check_config(path: Path, ckpt: dict[str, Any]) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SkipnetError(f"{path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict) or config.get("arch") != ckpt["arch"]:
        raise SkipnetError(
            f"{path} describes another architecture than {path.with_name(WEIGHTS)}; save the model again"
        )
    check_mode(config, ckpt, f"{path} and {path.with_name(WEIGHTS)}")
    for key in ("threshold", "keep_ratio", "data"):
        if key in config and config[key] != ckpt.get(key):
            raise SkipnetError(f"{path} and {path.with_name(WEIGHTS)} disagree on the {key}; save the model again")
