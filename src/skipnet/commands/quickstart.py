"""``skipnet quickstart``: base -> SP -> HRL on scikit-learn's 8x8 digits, in a few minutes on a CPU.

The three stages of Algorithm 1 on a small real data set that ships inside a package, so that the whole
pipeline runs on a fresh machine with no download. Prints accuracy, MACs and computation percentage per
stage and leaves the run directories behind (``--out``, default ``runs/quickstart``).

Quiet by design (issue 35): one progress bar per stage on a terminal (one line per stage elsewhere) and one
table at the end. Every log line of the three runs (each evaluation, the notices) goes to ``OUT/quickstart.log``
instead, beside the runs' own ``metrics.jsonl`` and ``steps.csv``; warnings still reach the terminal.

Running the same command again reuses the stages that finished and continues one that was stopped. The options
that change the results are recorded in ``OUT/quickstart.json`` before the first stage starts; a rerun into that
``--out`` with other values is refused before anything runs or is written, naming them, as is an ``--out`` that
holds stage directories but no record (an older skipnet's, or another command's runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from skipnet.commands._common import MAX_THREADS, check_count, check_out, check_value
from skipnet.errors import Interrupted, SkipnetError
from skipnet.fileio import atomic_write, json_text
from skipnet.rundir import BEST
from skipnet.runlog import bar_label
from skipnet.train import TrainConfig, train

# Feed-forward gates (FFGate-I, one per block) learn a graded policy within a few hundred HRL steps here.
GATED = "tiny_feedforward_14"
LOG = "quickstart.log"
# What the trainer says when a run directory holds no checkpoint yet and --resume starts afresh: quickstart asked
# for --resume itself (to clear an earlier attempt's leftovers), so the notice goes to the log file only.
NO_CHECKPOINT_NOTICE = "holds no checkpoint yet; starting a new run"
MAX_EPOCHS = 100.0  # x (30 + 15 + 15) epochs: 6,000 epochs of digits, days on a CPU
STAGES = ("base", "sp", "hrl")  # the run directories under --out
# The options that change the numbers, recorded in OUT/RECORD: --threads too (torch's CPU reductions split by thread
# count; --threads 1 and 2 differ by points of accuracy). --out and --json do not.
RECORD = "quickstart.json"
RECORDED = ("epochs", "alpha", "seed", "threads")
RERUN = "run the same skipnet quickstart command again to continue it"


DOCS = "docs/getting-started.md"  # the page that explains this command (its --help says so)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="base -> SP -> HRL on the built-in digits data (a few minutes on CPU)",
        description="Train a plain ResNet, a SkipNet by supervised pre-training from it, and refine it with hybrid "
        "RL, on scikit-learn's digits (no download); print one progress bar per stage and a table of accuracy, "
        "MACs and computation percentage. Every log line goes to OUT/quickstart.log. Run again with the same "
        "options, it reuses the finished stages and continues a stopped one; other options need another --out. "
        "See docs/getting-started.md.",
    )
    p.add_argument("--out", default="runs/quickstart", help="parent directory of the three run directories")
    p.add_argument(
        "--epochs",
        type=float,
        default=1.0,
        help="factor on every stage's length, 1 = 30 base, 15 SP and 15 HRL epochs",
    )
    p.add_argument("--alpha", type=float, default=2.0, help="HRL's reward for skipping, alpha of Eq. 5 (unitless)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own, one per core)")
    p.add_argument("--json", action="store_true", help="print the table as JSON (and nothing else on stdout)")
    p.set_defaults(func=run)


def stage_configs(out: Path, scale: float, alpha: float, seed: int, threads: int | None) -> list[TrainConfig]:
    common = {
        "data": "digits",
        "batch_size": 64,
        "val_split": 0.15,
        "seed": seed,
        "threads": threads,
        "nesterov": True,
        "weight_decay": 5e-4,
        "log_every": 100,
    }
    configs = [
        TrainConfig(
            "tiny_resnet_14", "base", out=str(out / "base"), epochs=30 * scale, lr=0.1, schedule="onecycle", **common
        ),
        TrainConfig(
            GATED,
            "sp",
            out=str(out / "sp"),
            init=str(out / "base" / BEST),
            epochs=15 * scale,
            lr=0.05,
            schedule="onecycle",
            **common,
        ),
        TrainConfig(
            GATED,
            "hrl",
            out=str(out / "hrl"),
            init=str(out / "sp" / BEST),
            epochs=15 * scale,
            lr=0.01,
            schedule="constant",
            alpha=alpha,
            baseline="ema",
            **common,
        ),
    ]
    for cfg in configs:  # continue (or reuse) what an earlier quickstart left; a fresh directory is a new run
        run_dir = Path(cfg.out)
        cfg.resume = run_dir.is_dir() and any(run_dir.iterdir())
    return configs


class _Console(logging.Handler):
    """Warnings and errors on stderr, printed above a progress bar (``tqdm.write``) rather than through it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        self.addFilter(lambda record: NO_CHECKPOINT_NOTICE not in record.getMessage())

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


@contextlib.contextmanager
def quiet_logs(path: Path) -> Iterator[None]:
    """Every record of skipnet's loggers (and Python warnings) to ``path``; only warnings and errors to the
    terminal. Not through the root logger: the training bar's ``logging_redirect_tqdm`` would print its records.
    The loggers are restored on the way out (the CLI may run in a longer-lived process, e.g. the tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    loggers = [logging.getLogger("skipnet"), logging.getLogger("py.warnings")]
    saved = [(lg, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    console = _Console()
    logging.captureWarnings(True)
    try:
        for lg in loggers:
            lg.setLevel(logging.INFO)
            lg.propagate = False
            lg.handlers = [to_file, console]
        yield
    finally:
        logging.captureWarnings(False)
        for lg, level, propagate, handlers in saved:
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers = handlers
        to_file.close()


def _shown(value: object) -> str:
    """An option's value as the user would type it (``default`` when it was left out)."""
    if value is None:
        return "default"
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return str(value)


def _read_record(path: Path) -> dict:
    """The options of ``OUT/quickstart.json``; one line if it cannot be read or is not such a record."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise SkipnetError(f"--out {path.parent}: {path.name} cannot be read ({why}); use another --out") from None
    missing = [name for name in RECORDED if not isinstance(record, dict) or name not in record]
    if missing:
        what = f"no --{missing[0]}" if isinstance(record, dict) else "not an object"
        raise SkipnetError(f"--out {path.parent}: {path.name} is not a quickstart record ({what}); use another --out")
    return record


def claim_out(out: Path, options: dict) -> None:
    """Make sure ``out`` holds this quickstart, before anything runs: refuse (one line) one made with other
    ``options`` or stage directories without a record; record ``options`` (atomically) where there is none yet."""
    path = out / RECORD
    if path.exists():
        record = _read_record(path)
        changed = [name for name in RECORDED if record[name] != options[name]]
        if changed:
            made = ", ".join(f"--{n} {_shown(record[n])} (now {_shown(options[n])})" for n in changed)
            again = "use another --out, or the same options to continue it"
            raise SkipnetError(f"--out {out} holds a quickstart made with {made}: {again}")
        return
    runs = [f"{name}/" for name in STAGES if (out / name).is_dir() and any((out / name).iterdir())]
    if runs:
        raise SkipnetError(
            f"--out {out} holds {', '.join(runs)} but no {RECORD} saying which options made them (an older skipnet's "
            "quickstart, or another command's runs): use another --out"
        )
    atomic_write(path, lambda f: f.write((json_text(options, indent=2) + "\n").encode()))


@contextlib.contextmanager
def continue_by_rerunning() -> Iterator[None]:
    """A stop on SIGINT / SIGTERM says how quickstart continues: the same command again (it has no --resume)."""
    try:
        yield
    except Interrupted as exc:
        raise Interrupted(f"{exc.stopped}; {RERUN}", exc.exit_code, exc.stopped) from None


def run(args: argparse.Namespace) -> int:
    check_value("epochs", args.epochs, lambda v: 0 < v <= MAX_EPOCHS, f"in (0, {MAX_EPOCHS:g}]")
    check_value("alpha", args.alpha, lambda v: v >= 0, ">= 0")
    check_count("--threads", args.threads, 1, MAX_THREADS)
    check_count("--seed", args.seed, 0, 2**32 - 1)
    check_out(args.out)
    out = Path(args.out)
    claim_out(out, {name: getattr(args, name) for name in RECORDED})
    configs = stage_configs(out, args.epochs, args.alpha, args.seed, args.threads)
    say = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"skipnet quickstart: base -> SP -> HRL on scikit-learn digits; logs in {out / LOG}")
    with quiet_logs(out / LOG), continue_by_rerunning():
        rows = [run_stage(i, cfg, say) for i, cfg in enumerate(configs, 1)]
    if args.json:
        print(json.dumps(rows))
        return 0
    print_table(rows, out)
    return 0


def run_stage(i: int, cfg: TrainConfig, say: Callable[[str], None]) -> dict:
    """Train (or reuse) stage ``i`` of 3 and return its row of the table."""
    start = time.time()
    with bar_label(f"[{i}/3] {cfg.stage}") as label:
        summary = train(cfg, progress_bar=True)
    t = summary["test"]
    if not label.started:
        say(f"[{i}/3] {cfg.stage:<4} finished earlier: reused {cfg.out}")
    elif not sys.stderr.isatty():
        say(f"[{i}/3] {cfg.stage:<4} trained in {time.time() - start:.0f} s: test accuracy {t['accuracy']:.2f}%")
    return {
        "stage": cfg.stage,
        "arch": cfg.arch,
        "run": cfg.out,
        "accuracy": round(t["accuracy"], 2),
        "macs": round(t["macs_mean"]),
        "macs_reduction": round(t["macs_reduction"], 1),
        "computation_percentage": round(t["computation_percentage"], 1),
        "train_time_s": summary.get("train_time_s"),
    }


def print_table(rows: list[dict], out: Path) -> None:
    print("\nSkipNet quickstart on scikit-learn digits (8x8, 1,797 real images; test split of 359)")
    print(f"{'stage':<6} {'test acc %':>10} {'MACs/image':>12} {'MACs vs plain':>14} {'comp. %':>8}  run dir")
    for r in rows:
        print(
            f"{r['stage']:<6} {r['accuracy']:>10.2f} {r['macs']:>12,} {0.0 - r['macs_reduction']:>+13.1f}% "
            f"{r['computation_percentage']:>8.1f}  {r['run']}"
        )
    best = out / "hrl" / BEST
    print(f"\nPer-epoch metrics: each run dir's metrics.jsonl and steps.csv; every log line: {out / LOG}")
    print(f"Next: skipnet eval {best} --data digits ; skipnet bench {best} --data digits")
