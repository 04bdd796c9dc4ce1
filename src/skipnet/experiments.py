"""Experiments as declared runs: each a ``skipnet train`` command with explicit fields, resumable, run in the
order of their dependencies, then calibrated to compute budgets and evaluated once on the test split.

A benchmark script declares its :class:`Run` list and calls :class:`Runner`; running it again resumes a killed
run (``--resume``), skips finished ones (``summary.json`` present) and reuses every cached calibration and
evaluation (a JSON file beside the checkpoint). A failed command raises :class:`RunFailed` naming its log;
nothing else is retried or skipped. Progress goes to :mod:`logging`; this module prints nothing.

Placeholders in a run's arguments: ``{data}`` (the data set) and ``{runs}`` (the directory holding every run, so
``--init {runs}/policy/best.pt`` names another run's checkpoint; list that run in ``needs``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_write

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

    def dir(self, name: str) -> Path:
        return self.out / name

    def finished(self, run: Run) -> bool:
        return (self.dir(run.name) / "summary.json").exists()

    def command(self, run: Run) -> list[str]:
        """The ``skipnet train`` command of ``run`` (placeholders filled)."""
        args = [a.format(data=self.data, runs=self.out) for a in run.args]
        return ["skipnet", "train", *args, "--data", self.data, "--out", str(self.dir(run.name))]

    def _call(self, cmd: list[str], logfile: Path) -> str:
        self.commands.append(" ".join(cmd))
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a") as f:
            done = subprocess.run(
                [self.python, "-m", "skipnet", *cmd[1:]], stdout=subprocess.PIPE, stderr=f, text=True, env=self.env
            )
        if done.returncode != 0:
            raise RunFailed(f"{' '.join(cmd)} exited {done.returncode}; see {logfile}")
        return done.stdout

    def train(self, runs: Sequence[Run]) -> None:
        """Train every unfinished run, dependencies first; a started run (its directory exists) is given
        ``--resume``: it continues from its ``last.pt`` (or from ``best.pt`` when killed during its first
        checkpoint), or starts afresh when killed before any checkpoint."""
        for run in order(runs):
            if self.finished(run):
                continue
            cmd = self.command(run)
            if self.dir(run.name).exists():
                cmd.append("--resume")
            log.info("training %s", run.name)
            self._call(cmd, self.out / f"{run.name}.log")

    def calibrated(self, run: Run, budget: float) -> Path:
        """``best.pt`` of ``run`` calibrated to ``budget`` % fewer MACs (written once, then reused)."""
        path = self.calibrated_path(run, budget)
        if not path.exists():
            self._call(self.calibrate_command(run, budget), self.out / f"{run.name}.log")
        return path

    def calibrate_command(self, run: Run, budget: float) -> list[str]:
        """The ``skipnet calibrate`` command writing :meth:`calibrated_path`."""
        cmd = ["skipnet", "calibrate", str(self.dir(run.name) / "best.pt"), "--data", self.data]
        out = str(self.calibrated_path(run, budget))
        return [*cmd, "--target-reduction", f"{budget:g}", "--out", out, *self.calibrate_args]

    def calibrated_path(self, run: Run, budget: float) -> Path:
        return self.dir(run.name) / f"budget{budget:g}.pt"

    def eval_command(self, checkpoint: Path) -> list[str]:
        return ["skipnet", "eval", str(checkpoint), "--data", self.data, "--json"]

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
        result = json.loads(self._call(self.eval_command(checkpoint), self.out / "eval.log"))
        if _stamp(checkpoint) == stamp:  # not replaced while it was evaluated
            atomic_write(cache, lambda f: f.write(json.dumps(result | {"checkpoint_stamp": stamp}).encode()))
        return result

    def results(self, runs: Sequence[Run], finished_only: bool = False) -> Iterator[Result]:
        """The test evaluation of every run with a ``best.pt`` (only the finished ones with ``finished_only``)
        and, for a finished run (saving at least ``min_saving`` %, if set), of each of its budgets."""
        for run in runs:
            best = self.dir(run.name) / "best.pt"
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


__all__ = ["Result", "Run", "RunFailed", "Runner", "order", "select"]
