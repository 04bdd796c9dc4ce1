"""Ship a trained checkpoint as a pretrained model: ``src/skipnet/pretrained/NAME.safetensors`` plus its entry in
``index.json`` and ``RESULTS.md`` (see :mod:`skipnet.pretrained`; writing the zoo lives here, not in the library,
because it drives the CLI).

    python benchmarks/make_pretrained.py runs/h30/hrl/best.pt cifar10_rnn_gate_38 \\
        --data ../shared/data/cifar10-jpeg.tar.gz \\
        --command "skipnet train cifar10_rnn_gate_38 --stage sp ... --out runs/h30/sp" \\
        --command "skipnet train cifar10_rnn_gate_38 --stage hrl --init runs/h30/sp/best.pt ... --out runs/h30/hrl"
    python benchmarks/make_pretrained.py runs/h30/hrl/best.pt cifar10_rnn_gate_38 --data ... \\
        --from-run runs/h30/sp --from-run runs/h30/hrl          # the commands from the runs' config.json

The checkpoint is exported with the library's safetensors export, the exported file is evaluated with
``skipnet eval FILE --data DATA --json`` on the whole test split (``--device``, CPU by default, so that the
recorded numbers are what a user's ``skipnet eval pretrained:NAME --data DATA --json`` prints on a CPU), and only
then copied into the zoo and recorded, with the training command(s) given by ``--command`` (in the order they ran)
and today's date; ``--replaces OLD`` then removes the model it supersedes (entry, then file). ``--bench B`` also
times the plain and the routed network on B test images (``skipnet bench``) and records the ratio. A NAME already
shipped is refused unless ``--force``. ``--zoo DIR`` writes another zoo folder (default: the package's, or
``$SKIPNET_PRETRAINED_DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import skipnet
from skipnet import results
from skipnet.checkpoint import export_safetensors, load_checkpoint, model_from_checkpoint
from skipnet.cli import build_parser
from skipnet.cli import main as cli_main
from skipnet.cost import fewer_macs
from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_write
from skipnet.pretrained import INDEX, INDEX_FORMAT, RESULTS, read_index, sha256_of, zoo_dir

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
REPO = Path(__file__).resolve().parents[1]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise SkipnetError(f"pretrained name {name!r}: use letters, digits, '_', '.', '-' (at most 100)")
    return name


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_index(models: dict[str, dict[str, Any]], root: str | Path | None = None) -> None:
    """Write ``index.json`` and ``RESULTS.md`` of the zoo (atomically, each)."""
    root = zoo_dir(root)
    _atomic_text(root / INDEX, json.dumps({"format": INDEX_FORMAT, "models": models}, indent=2) + "\n")
    _atomic_text(root / RESULTS, render_results(models))


def remove_model(name: str, root: str | Path | None = None) -> None:
    """Take ``name`` out of the zoo: its entry first (``index.json`` and ``RESULTS.md``), then its file, so that no
    entry ever names a missing file."""
    root = zoo_dir(root)
    index = read_index(root)
    if name not in index:
        raise SkipnetError(f"{name} is not in {root}; nothing to replace")
    entry = index.pop(name)
    write_index(index, root)
    (root / entry["file"]).unlink(missing_ok=True)


def check_replaceable(old: str, name: str, root: str | Path | None = None) -> None:
    """``old`` may make way for ``name``: another shipped model, which no other entry's recorded commands start
    from (``pretrained:OLD``: those commands could no longer be rerun)."""
    index = read_index(root)
    if old == name or old not in index:
        raise SkipnetError(f"--replaces {old}: not another model of {zoo_dir(root)}")
    token = re.compile(rf"pretrained:{re.escape(old)}(?![\w.-])")
    users = [n for n, e in index.items() if n != old and any(token.search(c) for c in e.get("commands", []))]
    if users:
        raise SkipnetError(f"--replaces {old}: the commands of {', '.join(users)} start from it; it must stay")


def _cli_json(argv: list[str]) -> dict[str, Any]:
    """Run a ``skipnet`` command in this process and return the JSON object it prints (``--json``)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(argv)
    if rc != 0:
        raise SkipnetError(f"'skipnet {' '.join(argv)}' failed (exit status {rc}); see the message above")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def command_of_run(directory: str | Path) -> str:
    """The ``skipnet train`` command of a run directory: as recorded in its ``config.json`` (``environment``), or for
    a run recorded before that, rebuilt from its resolved options (every option that differs from the command's
    default, so the command repeats the run). ``--resume`` is left out."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SkipnetError(f"{path} is not a readable run configuration ({type(exc).__name__})") from None
    recorded = (config.get("environment") or {}).get("command_line")
    if recorded:  # as run, less --resume (a resumed run repeats as the command that started it)
        words = [w for w in shlex.split(str(recorded)) if w != "--resume"]
        if words and Path(words[0]).name in ("__main__.py", "skipnet"):  # ``python -m skipnet`` records __main__.py
            words[0] = "skipnet"
        return results.portable(words, REPO)  # no absolute path of the machine that ran it
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
    root, index, target = _check_new(name, commands, root, force)
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    root.mkdir(parents=True, exist_ok=True)
    opts = {"device": device, "data_dir": data_dir, "limit": limit, "batch_size": batch_size}
    result, latency = _stage_and_measure(ckpt, checkpoint, target, data, bench_batch, **opts)
    entry: dict[str, Any] = {
        "file": target.name,
        "sha256": sha256_of(target),
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
    entry |= _provenance(checkpoint, commands, device, date)
    if notes:
        entry["notes"] = notes
    index[name] = entry
    write_index(index, root)
    return entry


def _check_new(
    name: str, commands: list[str], root: str | Path | None, force: bool
) -> tuple[Path, dict[str, dict[str, Any]], Path]:
    """Refuse a bad NAME, missing training commands, or a NAME already shipped (unless ``force``); else the zoo
    folder, its index and the file NAME will be."""
    check_name(name)
    if not commands or not all(isinstance(c, str) and c.strip() for c in commands):
        raise SkipnetError("give the training command(s) of the checkpoint (--command), in the order they were run")
    root = zoo_dir(root)
    index = read_index(root)
    target = root / f"{name}.safetensors"
    if (name in index or target.exists()) and not force:
        raise SkipnetError(f"{name} is already in {root}; pass --force to replace it")
    return root, index, target


def _provenance(checkpoint: str | Path, commands: list[str], device: str, date: str | None) -> dict[str, Any]:
    """How an entry came to be: where it was evaluated, the commands that trained it, its source file, the date (today
    unless given) and the versions of skipnet and torch."""
    return {
        "eval_device": device,
        "commands": [c.strip() for c in commands],
        "source": Path(checkpoint).name,
        "date": date or datetime.now(UTC).strftime("%Y-%m-%d"),
        "skipnet_version": skipnet.__version__,
        "torch_version": torch.__version__,
    }


def _stage_and_measure(
    ckpt: dict[str, Any], checkpoint: str | Path, target: Path, data: str, bench_batch: int | None, **opts: Any
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Export ``ckpt`` beside ``target``, evaluate (and with ``bench_batch`` time) that file with the CLI, then move
    it onto ``target``: ``(eval result, bench result or None)``. ``opts``: ``device``, ``data_dir``, ``limit``,
    ``batch_size``."""
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make_pretrained.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .pt or .safetensors checkpoint written by skipnet train / calibrate")
    p.add_argument("name", help="the pretrained name (pretrained:NAME); an architecture name makes it the default")
    p.add_argument("--data", required=True, help="the data set it was trained on (as for skipnet eval --data)")
    p.add_argument("--data-dir", default=None, help="where torchvision data sets live")
    p.add_argument(
        "--command",
        action="append",
        default=[],
        dest="commands",
        help="a command that trained the checkpoint; repeat it for every stage, in order",
    )
    p.add_argument(
        "--from-run",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="take a stage's command from a run directory's config.json (recorded, or rebuilt from its options for "
        "older runs); repeat it for every stage, in order; comes before the --command ones",
    )
    p.add_argument("--device", default="cpu", help="device of the evaluation (default: cpu)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: 256)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate a seeded subset of N test images (for tests; the shipped numbers use all)",
    )
    p.add_argument("--bench", type=int, default=None, metavar="B", help="also time plain vs routed on B images")
    p.add_argument("--notes", default=None, help="a sentence shown under the model in RESULTS.md")
    p.add_argument("--zoo", default=None, help="the zoo folder (default: the package's src/skipnet/pretrained)")
    p.add_argument("--force", action="store_true", help="replace NAME if it is already shipped")
    p.add_argument(
        "--replaces",
        default=None,
        metavar="OLD",
        help="the shipped model this one supersedes: removed (entry and file) once NAME is recorded, so that the "
        "package keeps its size",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.replaces is not None:
            check_replaceable(args.replaces, args.name, args.zoo)
        commands = [command_of_run(run) for run in args.from_run] + args.commands
        entry = add_model(
            args.checkpoint,
            args.name,
            data=args.data,
            data_dir=args.data_dir,
            commands=commands,
            root=args.zoo,
            device=args.device,
            batch_size=args.batch_size,
            limit=args.limit,
            bench_batch=args.bench,
            notes=args.notes,
            force=args.force,
        )
        if args.replaces is not None:
            remove_model(args.replaces, args.zoo)
    except SkipnetError as exc:
        print(f"make_pretrained.py: error: {exc}", file=sys.stderr)
        return 2
    root = zoo_dir(args.zoo)
    print(
        f"{args.name}: {entry['arch']} {entry['accuracy']:.2f}% on {entry['images']} test images, "
        f"{entry['macs_mean']:.4g} MACs/image ({fewer_macs(entry['macs_reduction'])} than the plain ResNet), "
        f"CP {entry['computation_percentage']:.1f}% -> {root / entry['file']} ({entry['bytes'] / 1e6:.1f} MB)"
    )
    print(f"check: skipnet eval pretrained:{args.name} --data {args.data} --json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
