"""Experiments as declared runs: each a ``skipnet train`` command with explicit fields, resumable, run in the
order of their dependencies, then calibrated to compute budgets and evaluated once on the test split.

A benchmark script declares its :class:`Run` list and calls :class:`Runner`; running it again resumes a killed
run (``--resume``), skips finished ones (``summary.json`` present) and reuses every cached calibration and
evaluation (a JSON file beside the checkpoint). A failed command raises :class:`RunFailed` naming its log;
nothing else is retried or skipped. Progress goes to :mod:`logging`; this module prints nothing.

:meth:`Runner.train` runs one run at a time by default; ``parallel=k`` runs up to ``k`` side by side (each a
process of its own with the ``--threads`` of its arguments), and ``deadline`` stops the runs still going at that
time (SIGTERM, then SIGKILL after ``Runner.grace`` seconds): a stopped run is no failure, it keeps its
checkpoint and resumes with ``--resume`` the next time.

Placeholders in a run's arguments: ``{data}`` (the data set) and ``{runs}`` (the directory holding every run, so
``--init {runs}/policy/best.pt`` names another run's checkpoint; list that run in ``needs``). Arguments go through
:meth:`str.format`: a literal brace is doubled (``{{``, ``}}``); :func:`literal` doubles them in a user's value
(a path such as ``sp{x}.pt`` or ``{data}.pt``), which then passes through as it was given.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_write
from skipnet.rundir import BEST, SUMMARY

log = logging.getLogger(__name__)


class RunFailed(SkipnetError):
    """A command of an experiment exited non-zero."""


@dataclass(frozen=True)
class Run:
    """One training run.

    Attributes:
        name: its directory under the runner's ``out``.
        args: ``skipnet train`` arguments (architecture, ``--stage``, options; no ``--data``/``--out``).
        needs: names of the runs that must finish first.
        budgets: MACs reductions (%) to calibrate its ``best.pt`` to on the validation split (``skipnet
            calibrate``), each evaluated on the test split as a row ``NAME@B%``.
        note: what the run tests, for the results table.
    """

    name: str
    args: tuple[str, ...]
    needs: tuple[str, ...] = ()
    budgets: tuple[float, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Result:
    """One test evaluation of a run: of its ``best.pt`` (``budget`` None) or calibrated to ``budget`` % fewer
    MACs; ``name`` is the row's (``NAME`` or ``NAME@B%``), ``test`` the ``skipnet eval --json`` object."""

    run: Run
    budget: float | None
    name: str
    test: dict[str, Any]
    finished: bool


def literal(text: str) -> str:
    """``text`` as a run argument that :meth:`Runner.command` passes through unchanged: its braces doubled, so that
    no part of it is taken for a placeholder."""
    return text.replace("{", "{{").replace("}", "}}")


def order(runs: Sequence[Run]) -> list[Run]:
    """``runs`` with every run after the runs it needs (stable otherwise); refuses unknown or circular needs."""
    by_name = {r.name: r for r in runs}
    done: list[Run] = []
    visiting: set[str] = set()

    def visit(r: Run) -> None:
        if r in done:
            return
        if r.name in visiting:
            raise SkipnetError(f"run {r.name} depends on itself")
        visiting.add(r.name)
        for n in r.needs:
            if n not in by_name:
                raise SkipnetError(f"run {r.name} needs {n}, which is not declared")
            visit(by_name[n])
        visiting.discard(r.name)
        done.append(r)

    for r in runs:
        visit(r)
    return done


@dataclass
class _Going:
    """A training process started by :meth:`Runner.train` and the log it writes to. It stays in the caller's
    process group, so Ctrl-C reaches it as it reaches the caller (it stops at a checkpoint)."""

    run: Run
    proc: subprocess.Popen[bytes]
    logfile: Path
    stopped: bool = False

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone
            self.proc.send_signal(signum)


def _stop(going: Sequence[_Going], grace: float) -> None:
    """SIGTERM every process of ``going`` (a training run writes a resumable checkpoint and exits); SIGKILL those
    still there after ``grace`` seconds. Returns once every one has exited."""
    for g in going:
        if g.proc.poll() is None:
            g.stopped = True
            g.signal(signal.SIGTERM)
    until = time.monotonic() + grace
    for g in going:
        try:
            g.proc.wait(max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %gs of SIGTERM: killing it", g.run.name, grace)
            g.signal(signal.SIGKILL)
            g.proc.wait()


def _reason(logfile: Path) -> str:
    """`` (the error)``: the last one-line error (``skipnet CMD: error: ...``) at the end of ``logfile``, or ``""``."""
    try:
        with open(logfile, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line.split(": error: ", 1)[1] for line in tail if line.startswith("skipnet ") and ": error: " in line]
    return f" ({errors[-1].strip()})" if errors else ""


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def select(runs: Sequence[Run], names: Sequence[str]) -> list[Run]:
    """The runs named in ``names`` and every run they need, transitively (in ``runs``' order); refuses unknown
    names."""
    by_name = {r.name: r for r in runs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SkipnetError(f"no run named {', '.join(unknown)}; declared: {', '.join(by_name)}")
    wanted: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(n for n in by_name[name].needs if n in by_name)
    return [r for r in runs if r.name in wanted]


@contextlib.contextmanager
def _one_at_a_time(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing), waiting while another holds it: two
    drivers collecting the same runs calibrate each budget once. The kernel releases it when its holder ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # per open file: also excludes another thread of this process
        yield
    finally:
        os.close(fd)


@dataclass
class Runner:
    """Runs, calibrates and evaluates declared :class:`Run` s under ``out`` on ``data``."""

    out: Path
    data: str
    python: str = sys.executable
    env: dict[str, str] | None = None
    commands: list[str] = field(default_factory=list)  # every command this runner issued, in order
    calibrate_args: tuple[str, ...] = ()  # more ``skipnet calibrate`` options (e.g. ``--grid ...``)
    min_saving: float | None = None  # calibrate only runs whose best.pt saves at least this many % of MACs
    grace: float = 20.0  # seconds a run stopped at a deadline has to write its checkpoint before SIGKILL
    poll: float = 0.2  # seconds between two looks at the runs going side by side

    def dir(self, name: str) -> Path:
        return self.out / name

    def finished(self, run: Run) -> bool:
        return (self.dir(run.name) / SUMMARY).exists()

    def command(self, run: Run) -> list[str]:
        """The ``skipnet train`` command of ``run`` (placeholders filled); an argument with a brace that is neither
        a placeholder nor doubled is refused in one line."""
        args = []
        for a in run.args:
            try:
                args.append(a.format(data=self.data, runs=self.out))
            except (KeyError, IndexError, ValueError, AttributeError):
                raise SkipnetError(
                    f"run {run.name}: argument {a!r} holds a brace that is not {{data}} or {{runs}}; double a literal "
                    "brace ({{ and }}, skipnet.experiments.literal)"
                ) from None
        return ["skipnet", "train", *args, "--data", self.data, "--out", str(self.dir(run.name))]

    def _argv(self, cmd: list[str], logfile: Path) -> list[str]:
        """The process to run for ``cmd`` (a ``skipnet ...`` command), recorded in :attr:`commands`, its log's
        directory made."""
        self.commands.append(" ".join(cmd))
        logfile.parent.mkdir(parents=True, exist_ok=True)
        return [self.python, "-m", "skipnet", *cmd[1:]]

    def _call(self, cmd: list[str], logfile: Path) -> str:
        argv = self._argv(cmd, logfile)
        with open(logfile, "a") as f:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=f, text=True, env=self.env)
        if done.returncode != 0:
            raise RunFailed(f"{' '.join(cmd)} exited {done.returncode}{_reason(logfile)}; see {logfile}")
        return done.stdout

    def train(self, runs: Sequence[Run], parallel: int = 1, deadline: float | None = None) -> list[str]:
        """Train every unfinished run, a run once the runs it needs have finished, up to ``parallel`` at a time;
        a started run (its directory exists) is given ``--resume``: it continues from its ``last.pt`` (or from
        ``best.pt`` when killed during its first checkpoint), or starts afresh when killed before any checkpoint.

        At ``deadline`` (a :func:`time.time`) the runs still going are stopped (SIGTERM, SIGKILL after
        :attr:`grace` s) and no other starts. Returns the names of the runs so left unfinished, stopped or not
        started; they resume the next time. A run that fails stops the starting of others; once those going
        have finished (or been stopped at the deadline), :class:`RunFailed` names its log."""
        if parallel < 1:
            raise SkipnetError(f"parallel must be at least 1, not {parallel}")
        todo = [r for r in order(runs) if not self.finished(r)]
        done = {r.name for r in runs if self.finished(r)}
        going: list[_Going] = []
        ended: list[_Going] = []
        failing = False  # a run failed: start no other
        try:
            while going or (todo and not failing):
                if deadline is not None and time.time() >= deadline:
                    break
                while not failing and len(going) < parallel:
                    ready = next((r for r in todo if all(n in done for n in r.needs)), None)
                    if ready is None:
                        break
                    todo.remove(ready)
                    going.append(self._start(ready))
                if not going:  # nothing can start: only runs needing a run that did not finish are left
                    break
                time.sleep(self.poll)
                for g in [g for g in going if g.proc.poll() is not None]:
                    going.remove(g)
                    ended.append(g)
                    if g.proc.returncode == 0:
                        done.add(g.run.name)
                    else:
                        failing = True
        finally:
            _stop(going, self.grace)
        return self._unfinished([*ended, *going], todo)

    def _start(self, run: Run) -> _Going:
        """Start training ``run`` (``--resume`` when its directory exists), its output appended to its log."""
        cmd = self.command(run)
        if self.dir(run.name).exists():
            cmd.append("--resume")
        log.info("training %s", run.name)
        logfile = self.out / f"{run.name}.log"
        argv = self._argv(cmd, logfile)
        with open(logfile, "ab") as f:  # the child holds its own copy of the descriptor
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self.env)
        return _Going(run, proc, logfile)

    def _unfinished(self, started: list[_Going], todo: list[Run]) -> list[str]:
        """The names of the runs stopped at the deadline or never started, logged; raises :class:`RunFailed` for
        a run of ``started`` that exited non-zero by itself (not stopped)."""
        stopped = [g for g in started if g.stopped and not self.finished(g.run)]  # not those done in time
        for g in stopped:
            log.warning("%s stopped at the deadline (it resumes next time); see %s", g.run.name, g.logfile)
        failed = [g for g in started if not g.stopped and g.proc.returncode]
        if failed:
            cmds = (
                f"{' '.join(self.command(g.run))} exited {g.proc.returncode}{_reason(g.logfile)}; see {g.logfile}"
                for g in failed
            )
            raise RunFailed("; ".join(cmds))
        if todo:
            log.warning("not started: %s", ", ".join(r.name for r in todo))
        return [g.run.name for g in stopped] + [r.name for r in todo]

    def calibrated(self, run: Run, budget: float) -> Path:
        """``best.pt`` of ``run`` calibrated to ``budget`` % fewer MACs (written once, then reused)."""
        path = self.calibrated_path(run, budget)
        if not path.exists():
            with _one_at_a_time(path.with_name(f".{path.name}.lock")):
                if not path.exists():  # another runner may have written it while this one waited
                    self._call(self.calibrate_command(run, budget), self.out / f"{run.name}.log")
        return path

    def calibrate_command(self, run: Run, budget: float) -> list[str]:
        """The ``skipnet calibrate`` command writing :meth:`calibrated_path`."""
        cmd = ["skipnet", "calibrate", str(self.dir(run.name) / BEST), "--data", self.data]
        out = str(self.calibrated_path(run, budget))
        return [*cmd, "--target-reduction", f"{budget:g}", "--out", out, *self.calibrate_args]

    def calibrated_path(self, run: Run, budget: float) -> Path:
        return self.dir(run.name) / f"budget{budget:g}.pt"

    def eval_command(self, checkpoint: Path | str) -> list[str]:
        return ["skipnet", "eval", str(checkpoint), "--data", self.data, "--json"]

    def evaluate_once(self, checkpoint: Path | str) -> dict[str, Any]:
        """``skipnet eval --json`` of ``checkpoint`` (a path or any model ``skipnet eval`` takes, e.g.
        ``pretrained:NAME``) on the test split, not cached."""
        return json.loads(self._call(self.eval_command(checkpoint), self.out / "eval.log"))

    def evaluate(self, checkpoint: Path) -> dict[str, Any]:
        """``skipnet eval --json`` of ``checkpoint`` on the test split, cached beside it for the checkpoint's
        current version (size and modification time): a run still training replaces its ``best.pt``, and the
        row must follow it."""
        cache = checkpoint.with_suffix(".test.json")
        stamp = _stamp(checkpoint)
        if cache.exists():
            cached = json.loads(cache.read_text())
            if cached.pop("checkpoint_stamp", None) == stamp:
                return cached
        result = self.evaluate_once(checkpoint)
        if _stamp(checkpoint) == stamp:  # not replaced while it was evaluated
            atomic_write(cache, lambda f: f.write(json.dumps(result | {"checkpoint_stamp": stamp}).encode()))
        return result

    def results(self, runs: Sequence[Run], finished_only: bool = False) -> Iterator[Result]:
        """The test evaluation of every run with a ``best.pt`` (only the finished ones with ``finished_only``)
        and, for a finished run (saving at least ``min_saving`` %, if set), of each of its budgets."""
        for run in runs:
            best = self.dir(run.name) / BEST
            done = self.finished(run)
            if not best.exists() or (finished_only and not done):
                continue
            test = self.evaluate(best)
            yield Result(run, None, run.name, test, done)
            if self.min_saving is not None and test["macs_reduction"] < self.min_saving:
                continue
            for b in run.budgets if done else ():
                yield Result(run, b, f"{run.name}@{b:g}%", self.evaluate(self.calibrated(run, b)), True)

    def rows(self, runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
        """Test rows of every run with a ``best.pt`` (``"finished": False`` for a run stopped early) and, for a
        finished run, of each of its budgets (``NAME@B%``)."""
        return {r.name: r.test | {"note": r.run.note, "finished": r.finished} for r in self.results(runs)}


__all__ = ["Result", "Run", "RunFailed", "Runner", "literal", "order", "select"]
