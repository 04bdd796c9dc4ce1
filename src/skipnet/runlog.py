"""What a training run shows and leaves behind besides its checkpoints.

- :class:`Progress`: a tqdm bar (steps, rate, ETA, running loss / accuracy / executed fraction) on a terminal, and
  on anything else one plain log line every ``--log-every`` steps with the same numbers; log lines written while
  the bar is up (the evaluations) are printed above it, not over it. :func:`bar_label` titles the bars.
- :class:`RunLog`: every ``--log-every`` steps one row of per-step scalars (``STEP_FIELDS``: loss, CE, REINFORCE
  term, reward, executed fraction, accuracy, lr) in ``steps.csv`` beside ``metrics.jsonl``, and with
  ``--tensorboard`` the same scalars plus every evaluation's metrics (skip ratio per block included) as
  TensorBoard event files in ``tensorboard/``. On ``--resume`` rows and events after the checkpoint's step are
  dropped, so a resumed run's logs read like an uninterrupted run's.
- :func:`environment`: versions, git commit, command line and device, recorded in ``config.json``.
- :func:`load_config_file` / :func:`apply_config`: ``skipnet train --config FILE`` (JSON or YAML; a run's own
  ``config.json`` works as is), with the options given on the command line taking precedence.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from skipnet.errors import SkipnetError

log = logging.getLogger("skipnet.train")

STEPS_CSV = "steps.csv"
TENSORBOARD_DIR = "tensorboard"
STEP_FIELDS = ("step", "epoch", "lr", "loss", "ce", "rl", "reward", "exec", "acc", "time_s")


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


# ------------------------------------------------------------------------------------------ progress
class BarLabel:
    """The title of the progress bars made under :func:`bar_label`, and whether a run made one (``started``)."""

    def __init__(self, text: str) -> None:
        self.text, self.started = text, False


_LABELS: list[BarLabel] = []


@contextlib.contextmanager
def bar_label(text: str) -> Iterator[BarLabel]:
    """Title the progress bars of the runs started inside with ``text`` (``skipnet quickstart``: one bar per
    stage). The yielded label's ``started`` tells whether a run trained under it: a finished run, reused, makes
    none."""
    label = BarLabel(text)
    _LABELS.append(label)
    try:
        yield label
    finally:
        _LABELS.remove(label)


def terminal_bar(**options: Any) -> Any:
    """A tqdm bar on ``sys.stderr`` when it is a terminal (``None`` otherwise), with tqdm's ``options`` (``total``,
    ``unit``, ``desc``, ...): as wide as the terminal and following its width, or 100 x 50 on a pseudo-terminal
    that reports no size (0 x 0), where tqdm would hide the bar. The one progress bar of the commands (training,
    ``skipnet predict``)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    try:
        sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
    except (OSError, ValueError):
        sized = False
    return tqdm(
        file=sys.stderr,
        dynamic_ncols=sized,
        ncols=None if sized else 100,
        nrows=None if sized else 50,
        **options,
    )


class Progress:
    """Training progress: log lines with rate and ETA every ``log_every`` steps; with ``bar`` (the CLI's), a tqdm
    bar instead when ``sys.stderr`` is a terminal."""

    def __init__(
        self, total: int, enabled: bool, log_every: int, initial: int = 0, elapsed: float = 0.0, bar: bool = False
    ) -> None:
        self.total, self.enabled, self.log_every = total, enabled, max(1, log_every)
        self.initial, self.elapsed_before = initial, elapsed
        self.start = time.time()
        label = _LABELS[-1] if _LABELS and enabled else None
        if label is not None:
            label.started = True
        self.bar = None
        if enabled and bar:
            self.bar = terminal_bar(
                desc=label.text if label is not None else None, total=total, initial=initial, unit="step"
            )
        self.tty = self.bar is not None

    def update(self, step: int, stats: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()}, refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.log_every == 0 or step == self.total:
            spent = time.time() - self.start
            rate = (step - self.initial) / spent if spent > 0 else math.nan
            eta = (self.total - step) / rate if rate and rate > 0 else math.nan
            msg = " ".join(f"{k} {v:.4g}" for k, v in stats.items())
            log.info(
                "step %d/%d %s | %.3g steps/s, elapsed %s, ETA %s",
                step,
                self.total,
                msg,
                rate,
                _fmt_time(self.elapsed_before + spent),
                _fmt_time(eta),
            )

    @contextlib.contextmanager
    def logging_above(self) -> Iterator[None]:
        """While the bar is up, route log records through ``tqdm.write`` so that they print above it; the bar is
        closed on the way out (also on an exception or a signal)."""
        if self.bar is None:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with logging_redirect_tqdm():
                yield
        finally:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------ logs
def _tensorboard_writer(directory: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SkipnetError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or skipnet[tensorboard])"
        ) from None
    return SummaryWriter(str(directory), purge_step=purge_step)


def check_tensorboard() -> None:
    """A one-line error now, before any training, when ``--tensorboard`` cannot work."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise SkipnetError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or skipnet[tensorboard])"
        ) from None


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary sibling renamed over it. Not :func:`skipnet.fileio.atomic_write`:
    a log is not a checkpoint, and its file operations must not count as fault points."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunLog:
    """Per-step scalars (``steps.csv``, TensorBoard) and per-evaluation metrics (TensorBoard) of one run.

    Only the process that writes the run directory (rank 0) passes ``enabled``. ``resume_step`` is the step of the
    checkpoint a resumed run starts from (rows after it are dropped), ``None`` for a new run (an old
    ``steps.csv`` is replaced)."""

    def __init__(
        self,
        out: str | Path,
        *,
        enabled: bool,
        every: int,
        tensorboard: bool = False,
        resume_step: int | None = None,
    ) -> None:
        self.out, self.enabled, self.every = Path(out), enabled, max(1, every)
        self.csv_path = self.out / STEPS_CSV
        self.tb = None
        if not enabled:
            return
        kept = self._kept_rows(resume_step)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=STEP_FIELDS)
        writer.writeheader()
        writer.writerows(kept)
        _replace_text(self.csv_path, text.getvalue())
        if tensorboard:
            self.tb = _tensorboard_writer(self.out / TENSORBOARD_DIR, resume_step + 1 if resume_step else None)

    def _kept_rows(self, resume_step: int | None) -> list[dict[str, str]]:
        if resume_step is None or not self.csv_path.is_file():
            return []
        try:
            with open(self.csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError):
            return []
        kept = []
        for row in rows:  # a torn last row (killed mid-write) has a missing or unparsable step
            try:
                if int(row.get("step") or "x") <= resume_step and row.get("time_s"):
                    kept.append({k: row.get(k, "") for k in STEP_FIELDS})
            except ValueError:
                continue
        return kept

    def step(self, step: int, stats: dict[str, float], *, lr: float, epoch: float, time_s: float) -> None:
        """Record the scalars of training step ``step`` (1-based) when it is a multiple of ``every``."""
        if not self.enabled or step % self.every:
            return
        values = {k: float(v) for k, v in stats.items()} | {"lr": float(lr)}
        row = {"step": step, "epoch": round(epoch, 4), "time_s": round(time_s, 2)}
        row |= {k: f"{values[k]:.6g}" for k in STEP_FIELDS if k in values}
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=STEP_FIELDS).writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def evaluation(self, step: int, row: dict[str, Any], val: dict[str, Any] | None = None) -> None:
        """Record one evaluation: the numbers of its ``metrics.jsonl`` row and the skip ratio of every block."""
        if self.tb is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                group = "val" if k.startswith("val_") else "train_mean" if k.startswith("train_") else "run"
                self.tb.add_scalar(f"{group}/{k.split('_', 1)[1] if group != 'run' else k}", v, step)
        for i, r in enumerate((val or {}).get("skip_ratio_per_block", [])):
            self.tb.add_scalar(f"val_skip_ratio/block_{i + 1:02d}", r, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ environment
def _git_commit(directory: Path) -> dict[str, Any] | None:
    """The commit of the git checkout holding ``directory`` (and whether tracked files differ), if any."""
    try:
        head = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "modified": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(argv: list[str]) -> str:
    """The command that ran, as one can type it again: ``python -m skipnet`` and ``torchrun -m skipnet`` run
    skipnet's ``__main__.py``, recorded as ``skipnet`` (the same program)."""
    program = Path(argv[0]).name if argv else "skipnet"
    if program == "__main__.py" and Path(argv[0]).parent.name == "skipnet":
        program = "skipnet"
    return shlex.join([program, *argv[1:]])


def environment(device: Any = None, world: int = 1) -> dict[str, Any]:
    """Versions, git commit of the skipnet source, command line and device: what ``config.json`` records so that a
    run can be repeated and its numbers traced."""
    import torch

    import skipnet

    dev = str(device) if device is not None else "cpu"
    gpu = None
    if dev.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(dev))
    return {
        "skipnet_version": skipnet.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git": _git_commit(Path(skipnet.__file__).resolve().parent),
        "command_line": command_line(sys.argv),
        "device": dev,
        "gpu": gpu,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_version": torch.version.cuda,
        "world_size": world,
    }


# ------------------------------------------------------------------------------------------ --config FILE
RECORD_ONLY = ("arch_config", "environment")  # what a run's config.json holds besides the options
# config.json: the options the run left unset, which its defaults filled (they depend on the stage, the lr, ...); a
# --config replay derives them again, so that they follow an option the replay changes
DERIVED = "derived"
UNRECORDED = object()  # a derived option's value in a config.json that lists names only
NEVER_FROM_FILE = ("resume", "json", "config")  # what only the command line decides
MAX_CONFIG_BYTES = 1 << 20
MERGE_TAG = "tag:yaml.org,2002:merge"  # YAML's "<<:" merge key


def load_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options in a JSON or YAML file (keys as in ``config.json``; ``-`` and ``_`` alike), and the options a
    run's ``config.json`` records as derived (filled by its defaults; none for any other file) with the values they
    were derived to (:data:`UNRECORDED` in files that list names only)."""
    path = Path(path)
    if path.is_dir():
        raise SkipnetError(f"--config {path} is a directory; give a JSON or YAML file (e.g. a run's config.json)")
    if not path.is_file():
        raise SkipnetError(f"--config {path} does not exist" if not path.exists() else f"--config {path} is not a file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise SkipnetError(f"--config {path} is {path.stat().st_size} bytes; an options file is at most 1 MiB")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = _parse_config(path, text)
    except RecursionError:  # e.g. [[[[...]]]] thousands deep: the parsers recurse
        raise SkipnetError(
            f"--config {path} is nested too deeply; options are one mapping of names to values"
        ) from None
    if not isinstance(data, dict):
        raise SkipnetError(f"--config {path} must hold a mapping of option names to values")
    derived = data.pop(DERIVED, [])
    if isinstance(derived, list):  # written before the values were: an edit of such an option is not seen
        derived = dict.fromkeys(derived, UNRECORDED)
    if not (isinstance(derived, dict) and all(isinstance(d, str) for d in derived)):
        raise SkipnetError(
            f"--config {path}: {DERIVED!r} must name options with their derived values (as a run's config.json does)"
        )
    options: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        if key in RECORD_ONLY:
            continue
        name = str(key).replace("-", "_")
        if name in options:
            raise SkipnetError(f"--config {path}: {spelled[name]!r} and {key!r} are the same option; give it once")
        options[name], spelled[name] = value, str(key)
    return options, {d.replace("-", "_"): v for d, v in derived.items()}


class _Duplicate(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A mapping from ``pairs``, refusing a key given twice (the JSON and YAML parsers keep the last silently)."""
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(f"{key!r} is given twice; give it once")
        out[key] = value
    return out


def left_unset(value: Any) -> bool:
    """Whether an option's ``value`` is "not given": ``None``, or a default that says so (its ``given`` is false:
    ``--threshold``'s, :data:`skipnet.trainconfig.UNSET_THRESHOLD`, which a trained ``--init`` replaces)."""
    return value is None or getattr(value, "given", True) is False


def derived_record(path: Path, user: dict[str, Any], resolved: dict[str, Any], resumed: bool) -> dict | None:
    """The options ``config.json`` at ``path`` records as derived, with their values: on a new run those the
    ``user`` options left unset (``None``; a ``--threshold`` not given, which a trained ``--init`` may bring) that
    the ``resolved`` run fills; on a resumed run those the file already records, less any now set; ``None`` (a
    replay takes every value) where a resumed run's file records none (written before the record was). A replay
    derives these again unless the file's value was edited."""
    if not resumed:
        names = [k for k, v in user.items() if left_unset(v) and resolved.get(k) is not None]
    else:
        try:
            before = json.loads(path.read_text(encoding="utf-8")).get(DERIVED)
        except (OSError, ValueError, AttributeError):
            before = None
        if not isinstance(before, (list, dict)):
            return None
        names = [k for k in before if left_unset(user.get(k))]
    return {k: resolved.get(k) for k in sorted(names)}


def _parse_config(path: Path, text: str) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SkipnetError("--config: a YAML file needs PyYAML (pip install pyyaml); or give a JSON file") from None

        class UniqueKeys(yaml.SafeLoader):
            def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
                scalars = [k for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.tag != MERGE_TAG]
                own = [self.construct_object(k) for k in scalars]
                _unique_pairs([(k, None) for k in own])  # a merged key may be overridden
                mapping = super().construct_mapping(node, deep)
                names = {str(k).replace("-", "_") for k in own}
                for key in [k for k in mapping if k not in own and str(k).replace("-", "_") in names]:
                    del mapping[key]  # merged under the other spelling of a key given here, which overrides it
                return mapping

        try:
            data = yaml.load(text, Loader=UniqueKeys)  # noqa: S506 - a SafeLoader
        except _Duplicate as exc:
            raise SkipnetError(f"--config {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise SkipnetError(f"--config {path} is not valid YAML ({type(exc).__name__})") from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        except _Duplicate as exc:
            raise SkipnetError(f"--config {path}: {exc}") from None
        except ValueError as exc:
            kind = "is not valid JSON" if path.suffix.lower() == ".json" else "is not JSON (nor YAML, by its name)"
            raise SkipnetError(f"--config {path} {kind} ({exc}); a config file is JSON or YAML (.yaml, .yml)") from None
    return data


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options given on the command line ``argv`` (the command's own arguments)."""
    probe = copy.deepcopy(parser)
    probe._defaults = {}
    for action in probe._actions:
        action.default, action.required = argparse.SUPPRESS, False
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def apply_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str], path: str | Path
) -> argparse.Namespace:
    """``args`` with every option the command line left out taken from the ``--config`` file."""
    data, derived = load_config_file(path)  # derived: filled by the recorded run's defaults, derived again here
    again = sorted(k for k, v in derived.items() if v is UNRECORDED or data.get(k, v) == v)
    if again:
        log.info("--config %s: %s derived again, as in the run it records", path, ", ".join(again))
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", *NEVER_FROM_FILE)}
    unknown = sorted(k for k in {*data, *derived} if k not in actions and k not in NEVER_FROM_FILE)
    if unknown:
        flags = [f"{k[3:]}: false" for k in unknown if k.startswith("no_") and k[3:] in actions]  # --no-X's dest
        hint = f" (a file names the option a --no-... flag sets: {', '.join(flags)})" if flags else ""
        raise SkipnetError(f"--config {path}: unknown option(s) {', '.join(unknown)}{hint}; see 'skipnet train --help'")
    given = explicit_options(parser, argv)
    edited = sorted(k for k, v in derived.items() if k in data and v is not UNRECORDED and data[k] != v)
    if given & {"epochs", "iters"}:  # a length on the command line replaces the file's, whichever it was
        data.pop("epochs", None)
        data.pop("iters", None)
    elif data.get("epochs") is not None and data.get("iters") is not None:
        kept = [k for k in ("epochs", "iters") if k not in derived or k in edited]
        if len(kept) != 1:  # both the user's (or an older file's): which one was meant is not known
            raise SkipnetError(f"--config {path}: gives both epochs and iters; keep one")
        data.pop("iters" if kept == ["epochs"] else "epochs")  # the length the run derived gives way
    if edited:  # a value changed since the run derived it: the user's, taken as given
        log.info("--config %s: %s edited, so taken from the file", path, ", ".join(edited))
    args.from_config = []  # the options the file gave (a resumed run applies or refuses them like given ones)
    for key, value in data.items():
        if key in NEVER_FROM_FILE or key in given or (key in derived and key not in edited):
            continue
        setattr(args, key, _config_value(path, key, value, actions[key]))
        args.from_config.append(key)
    return args


def _brief(value: Any) -> str:
    """``repr(value)`` cut to 60 characters (a nested value from a file can be long, or deep)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply"
    return text if len(text) <= 60 else text[:57] + "..."


def _config_value(path: str | Path, key: str, value: Any, action: argparse.Action) -> Any:
    """A ``--config`` value as the command line would have given it: flags must be true/false, typed options
    convert from their text (so 64.7 is no count and ``true`` no learning rate), the rest must be text."""
    if value is None:
        return None
    if action.nargs == 0:  # an on/off flag
        if not isinstance(value, bool):
            raise SkipnetError(f"--config {path}: {key} = {_brief(value)}; expected true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SkipnetError(f"--config {path}: {key} = {_brief(value)} is not a valid value")
    if action.type is not None:
        try:
            value = action.type(value if isinstance(value, str) else repr(value))
        except (TypeError, ValueError):
            raise SkipnetError(f"--config {path}: {key} = {_brief(value)} is not a valid value") from None
    elif not isinstance(value, str):
        raise SkipnetError(f"--config {path}: {key} = {_brief(value)}; expected text")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise SkipnetError(f"--config {path}: {key} = {_brief(value)}; expected one of {choices}")
    return value
