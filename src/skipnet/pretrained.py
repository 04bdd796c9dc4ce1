"""Pretrained SkipNets shipped inside the package, and a directory format for users' own models.

**The zoo.** The folder ``skipnet/pretrained/`` beside this module (the environment variable
``SKIPNET_PRETRAINED_DIR`` points elsewhere, e.g. for tests) holds one safetensors export per model
(:func:`skipnet.checkpoint.export_safetensors`: weights, architecture, threshold and data normalisation; no pickle)
and ``index.json``::

    {"format": 1, "models": {NAME: {"file": "NAME.safetensors", "sha256": ..., "arch": ..., "dataset": ...,
      "data": ..., "split": "test", "images": ..., "accuracy": ..., "macs_mean": ..., "macs_all_on": ...,
      "macs_reduction": ..., "computation_percentage": ..., "latency_ratio": ..., "commands": [...], "date": ...}}}

whose numbers are ``skipnet eval`` of the shipped file (:func:`add_model`, run by ``benchmarks/make_pretrained.py``),
and ``RESULTS.md``, the same as a table (:func:`render_results`). Everything that reads a checkpoint takes
``pretrained:NAME`` for the shipped file (:func:`resolve_checkpoint`, called by
:func:`skipnet.checkpoint.load_checkpoint`); ``create_model(name, pretrained=True)`` builds it. A name is an
entry of the index, or an architecture: then the first entry of that architecture in the index.

**Users' own models.** :func:`save_pretrained` writes ``model.safetensors`` and ``config.json`` (architecture,
threshold, gate mode, data normalisation) into a directory; :func:`from_pretrained` rebuilds the model from it
(or from a zoo name).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
from datetime import UTC, datetime
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
# what the index records of `skipnet eval --json` and of `skipnet bench --json`
EVAL_KEYS = (
    "images",
    "accuracy",
    "top5",
    "loss",
    "macs_mean",
    "macs_all_on",
    "macs_reduction",
    "computation_percentage",
    "gate_macs_mean",
    "skip_ratio_per_block",
)
BENCH_KEYS = (
    "batch_size",
    "device",
    "threads",
    "latency_ms_plain",
    "latency_ms_masked",
    "latency_ms_routed",
    "ideal_speedup",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


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


def _sha256(path: Path) -> str:
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
    if digest and _sha256(path) != digest:
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
def load_pretrained(name: str, root: str | Path | None = None, map_location: str = "cpu"):
    """The shipped model ``name`` (eval mode, its threshold and gate mode set), as ``(model, checkpoint)``."""
    from skipnet.checkpoint import load_checkpoint, model_from_checkpoint

    path = pretrained_path(name, root)
    ckpt = load_checkpoint(path, map_location)
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
    return model_from_checkpoint(ckpt, weights)


def _version() -> str:
    import skipnet

    return skipnet.__version__


# ------------------------------------------------------------------------------------------ writing the zoo
def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise SkipnetError(f"pretrained name {name!r}: use letters, digits, '_', '.', '-' (at most 100)")
    return name


def _atomic_text(path: Path, text: str) -> None:
    from skipnet.checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_index(models: dict[str, dict[str, Any]], root: str | Path | None = None) -> None:
    """Write ``index.json`` and ``RESULTS.md`` of the zoo (atomically, each)."""
    root = zoo_dir(root)
    _atomic_text(root / INDEX, json.dumps({"format": INDEX_FORMAT, "models": models}, indent=2) + "\n")
    _atomic_text(root / RESULTS, render_results(models))


def _cli_json(argv: list[str]) -> dict[str, Any]:
    """Run a ``skipnet`` command in this process and return the JSON object it prints (``--json``)."""
    from skipnet.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    if rc != 0:
        raise SkipnetError(f"'skipnet {' '.join(argv)}' failed (exit status {rc}); see the message above")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def command_of_run(directory: str | Path) -> str:
    """The ``skipnet train`` command of a run directory: as recorded in its ``config.json`` (``environment``), or for
    a run recorded before that, rebuilt from its resolved options (every option that differs from the command's
    default, so the command repeats the run). ``--resume`` is left out."""
    import argparse
    import shlex

    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SkipnetError(f"{path} is not a readable run configuration ({type(exc).__name__})") from None
    recorded = (config.get("environment") or {}).get("command_line")
    if recorded:  # as run, less --resume (a resumed run repeats as the command that started it)
        return shlex.join(w for w in shlex.split(str(recorded)) if w != "--resume")
    from skipnet.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    words = ["skipnet", "train", str(config.get("arch"))]
    for action in sub.choices["train"]._actions:
        if not action.option_strings or action.dest not in config or action.dest in ("resume", "json", "config"):
            continue
        value = config[action.dest]
        if value == action.default or value is None:
            continue
        if action.nargs == 0:  # on/off flags: given when they differ from the default
            words.append(action.option_strings[0])
        else:
            words += [action.option_strings[0], f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def _portable(spec: str) -> str:
    """A data spec as recorded: an absolute path becomes its file name (no machine paths in the repository)."""
    return Path(spec).name if os.path.isabs(spec) else spec


def add_model(
    checkpoint: str | Path,
    name: str,
    *,
    data: str,
    commands: list[str],
    root: str | Path | None = None,
    device: str = "cpu",
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    bench_batch: int | None = None,
    notes: str | None = None,
    force: bool = False,
    date: str | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint`` into the zoo as ``NAME.safetensors``, evaluate the exported file with ``skipnet eval``
    on the test split of ``data`` and record the result, ``commands`` (how the checkpoint was trained) and the date
    in ``index.json`` and ``RESULTS.md``. With ``bench_batch``, ``skipnet bench`` times the file on that many
    test images (on ``device``) and the plain/routed latency ratio is recorded. The file is evaluated before
    anything in the zoo changes; an existing NAME is refused unless ``force``. Returns the entry."""
    from skipnet.checkpoint import load_checkpoint, model_from_checkpoint

    check_name(name)
    if not commands or not all(isinstance(c, str) and c.strip() for c in commands):
        raise SkipnetError("give the training command(s) of the checkpoint (--command), in the order they were run")
    root = zoo_dir(root)
    index = read_index(root)
    target = root / f"{name}.safetensors"
    if (name in index or target.exists()) and not force:
        raise SkipnetError(f"{name} is already in {root}; pass --force to replace it")
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    root.mkdir(parents=True, exist_ok=True)
    opts = {"device": device, "data_dir": data_dir, "limit": limit, "batch_size": batch_size}
    result, latency = _stage_and_measure(ckpt, checkpoint, target, data, bench_batch, **opts)
    import torch

    entry: dict[str, Any] = {
        "file": target.name,
        "sha256": _sha256(target),
        "bytes": target.stat().st_size,
        "arch": model.config.name,
        "dataset": model.config.dataset,
        "gate": model.config.gate,
        "params": sum(p.numel() for p in model.parameters()),
        "stage": ckpt.get("stage") or (ckpt.get("train_config") or {}).get("stage"),
        "data": _portable(data),
        "split": "test",
        "limit": limit,
        "threshold": result["threshold"],
        "mode": result["mode"],
    }
    entry |= {k: result[k] for k in EVAL_KEYS if k in result}
    entry["latency_ratio"] = None
    if latency:
        entry["latency_ratio"] = latency["speedup"]
        entry["latency"] = {k: latency.get(k) for k in BENCH_KEYS}
    entry |= {
        "eval_device": device,
        "commands": [c.strip() for c in commands],
        "source": Path(checkpoint).name,
        "date": date or datetime.now(UTC).strftime("%Y-%m-%d"),
        "skipnet_version": _version(),
        "torch_version": torch.__version__,
    }
    if notes:
        entry["notes"] = notes
    index[name] = entry
    write_index(index, root)
    return entry


def _stage_and_measure(
    ckpt: dict[str, Any], checkpoint: str | Path, target: Path, data: str, bench_batch: int | None, **opts: Any
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Export ``ckpt`` beside ``target``, evaluate (and with ``bench_batch`` time) that file with the CLI, then move
    it onto ``target``: ``(eval result, bench result or None)``. ``opts``: ``device``, ``data_dir``, ``limit``,
    ``batch_size``."""
    from skipnet.checkpoint import export_safetensors

    name, root = target.stem, target.parent
    device, data_dir, limit, batch_size = opts["device"], opts["data_dir"], opts["limit"], opts["batch_size"]
    with tempfile.TemporaryDirectory(dir=root, prefix=".make-") as tmp:
        staged = Path(tmp) / f"{name}.safetensors"
        if isinstance(ckpt.get("data", {}).get("spec"), str):  # the shipped file holds no path of this machine
            ckpt = ckpt | {"data": ckpt["data"] | {"spec": _portable(ckpt["data"]["spec"])}}
        export_safetensors(ckpt, staged, source=Path(checkpoint).name)
        argv = ["eval", str(staged), "--data", data, "--device", device, "--batch-size", str(batch_size), "--json"]
        if data_dir:
            argv += ["--data-dir", data_dir]
        if limit:
            argv += ["--limit", str(limit)]
        result = _cli_json(argv)
        latency = None
        if bench_batch:
            bench = ["bench", str(staged), "--data", data, "--batch-size", str(bench_batch), "--device", device]
            latency = _cli_json([*bench, *(["--data-dir", data_dir] if data_dir else []), "--json"])
        os.replace(staged, target)  # same directory: atomic
    return result, latency


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_results(models: dict[str, dict[str, Any]]) -> str:
    """``RESULTS.md``: one table row per shipped model, then the commands that trained each."""
    lines = [
        "# Pretrained SkipNets",
        "",
        "Written by `benchmarks/make_pretrained.py` from `index.json`. Every row is `skipnet eval pretrained:NAME "
        "--data DATA --json` of the shipped file on the test split (greedy gates at the stored threshold); MACs "
        "are multiply-adds per image actually spent, gates included, against the plain ResNet of the same "
        "backbone; CP is the authors' computation percentage; the latency ratio is the plain network's time over "
        "the routed SkipNet's (`skipnet bench`), where measured.",
        "",
        "| model | architecture | data | top-1 % | MACs / image | MACs reduction % | CP % | latency ratio | file |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in models.items():
        lines.append(
            f"| `{name}` | {e.get('arch')} | {e.get('dataset')} | {_fmt(e.get('accuracy'), '.2f')} "
            f"| {_fmt(e.get('macs_mean'), '.4g')} | {_fmt(e.get('macs_reduction'), '.1f')} "
            f"| {_fmt(e.get('computation_percentage'), '.1f')} | {_fmt(e.get('latency_ratio'), '.2f')} "
            f"| {e.get('file')} ({_fmt((e.get('bytes') or 0) / 1e6, '.1f')} MB) |"
        )
    if not models:
        lines.append("| (none shipped yet) | | | | | | | | |")
    lines.append("")
    for name, e in models.items():
        limit = " (a seeded subset)" if e.get("limit") else ""
        lines += [
            f"## `{name}`",
            "",
            f"{e.get('arch')}, {e.get('stage') or 'stage unrecorded'}, evaluated on {e.get('data')} "
            f"({e.get('images')} test images{limit}, {e.get('eval_device')}) on {e.get('date')} with skipnet "
            f"{e.get('skipnet_version')}, torch {e.get('torch_version')}. Trained with:",
            "",
            "```bash",
            *e.get("commands", []),
            "```",
            "",
        ]
        if e.get("notes"):
            lines += [str(e["notes"]), ""]
    return "\n".join(lines)
