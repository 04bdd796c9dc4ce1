"""Run the full test suite again and again on clean clones of HEAD, to catch the tests that fail at a low rate.

    python benchmarks/suite_repeat.py --runs 10                   # one clone at a time, nothing beside it
    python benchmarks/suite_repeat.py --runs 10 --hog 2           # two spinning processes beside each run
    python benchmarks/suite_repeat.py --runs 10 --parallel 2      # two clones at once: each is the other's hog
    python benchmarks/suite_repeat.py --runs 1 -- --durations=10  # pytest's options after --: the slowest recorded

Each run clones the commit that HEAD was at the start (uncommitted edits are not tested) beside the repository, so
that ../shared is found as CI finds it, runs the README's test command there with the clone's own sources first on
the path, and appends one JSON line to benchmarks/results/suite_repeat.jsonl: the commit, the exit status, pytest's
summary line, the failed test ids, the seconds and the load average before and after. ``--summary`` prints the
longest unbroken run of passes of one commit, and how many of them ran beside a hog or a second clone.
Stopping it (Ctrl-C or SIGTERM) ends the running suites and their workers, removes their clones and records nothing
for the interrupted runs; it exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "suite_repeat.jsonl"
_write = threading.Lock()
_stop = threading.Event()  # set by SIGTERM or Ctrl-C: the running suites are ended and nothing more is started
_suites: set[subprocess.Popen] = set()
_registry = threading.Lock()


def _load() -> float:
    return os.getloadavg()[0]


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


class Plan(NamedTuple):
    """What every run of one invocation shares: the commit, what runs beside it, pytest's extra options."""

    commit: str
    out: Path
    hog: int = 0
    parallel: int = 1
    beside: str = ""
    pytest_args: tuple[str, ...] = ()


def _suite(command: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``command`` in a session of its own, registered so that :func:`_interrupt` can end it and its workers."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
    ) as p:
        with _registry:
            _suites.add(p)
        try:
            if _stop.is_set():
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        finally:
            with _registry:
                _suites.discard(p)
    return subprocess.CompletedProcess(command, p.returncode, out, err)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM or Ctrl-C: end every running suite's process group; their lanes then remove the clones and stop."""
    _stop.set()
    with _registry:
        for p in _suites:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def one_run(plan: Plan, lane: int) -> dict | None:
    """Clone ``plan.commit`` beside the repository, run the suite there, and return its record, or None when the run
    was interrupted (the clone is removed, whatever happens)."""
    # a directory of its own (two suite_repeat processes at once must not share a clone), beside ../shared
    clone = Path(tempfile.mkdtemp(prefix=f".{REPO.name}-suite-repeat-{lane}-", dir=REPO.parent))
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        _git("checkout", "-q", plan.commit, cwd=clone)
        env = {**os.environ, "PYTHONPATH": str(clone / "src")}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(clone / ".tmp")]
        start, load0 = time.monotonic(), _load()
        done = _suite([*command, *plan.pytest_args], cwd=clone, env=env)
        seconds, lines = time.monotonic() - start, done.stdout.strip().splitlines()
    finally:
        shutil.rmtree(clone, ignore_errors=True)
    if _stop.is_set():  # an interrupted run is no record either way
        return None
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "commit": plan.commit,
        "rc": done.returncode,
        "summary": lines[-1].strip("= ") if lines else done.stderr.strip()[-200:],
        "failed": re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M),
        "seconds": round(seconds),
        "slowest": re.findall(r"^([\d.]+)s (?:call|setup|teardown) +(\S+)", done.stdout, re.M)[:10],  # --durations
        "load": [round(load0, 2), round(_load(), 2)],
        "hog": plan.hog,
        "parallel": plan.parallel,
        "beside": plan.beside,
    }


def _lane(plan: Plan, lane: int, runs: int) -> None:
    for _ in range(runs):
        record = None if _stop.is_set() else one_run(plan, lane)
        if record is None:
            return
        with _write, plan.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{record['date']} lane {lane} {record['commit']} rc {record['rc']} {record['summary']}", flush=True)


def read_records(path: Path) -> list[dict]:
    """The records of ``path``, one JSON object a line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


KINDS = {"alone": False, "loaded": True}


def loaded(record: dict) -> bool:
    """Whether the run had a hog, a second clone or another named job (``--beside``) beside it."""
    return record["hog"] > 0 or record["parallel"] > 1 or bool(record.get("beside"))


def streak(records: list[dict]) -> dict:
    """The longest unbroken run of passes of one commit, in the order the runs finished: its commit, its length,
    how many of its runs were :func:`loaded`, and the least and most minutes a run took, alone and loaded."""
    best: list[dict] = []
    commit, now = None, []
    for r in records:
        if r.get("void"):  # a run spoilt from outside, its reason recorded: neither a pass nor a failure
            continue
        if r["commit"] != commit:
            commit, now = r["commit"], []
        now = [*now, r] if r["rc"] == 0 else []
        if len(now) > len(best):
            best = now
    minutes = {kind: [round(r["seconds"] / 60) for r in best if loaded(r) == on] for kind, on in KINDS.items()}
    return {
        "commit": best[0]["commit"] if best else None,
        "passes": len(best),
        "beside_load": sum(map(loaded, best)),
        "minutes": {k: [min(v), max(v)] if v else None for k, v in minutes.items()},
    }


def sentence(best: dict) -> str:
    """How docs/reliability.md states a :func:`streak` (a test holds the page to it)."""

    def took(kind: str) -> str:
        lo_hi = best["minutes"][kind]
        if lo_hi is None:
            return ""
        return f" ({lo_hi[0]} min a run)" if lo_hi[0] == lo_hi[1] else f" ({lo_hi[0]}–{lo_hi[1]} min a run)"

    alone = best["passes"] - best["beside_load"]
    return (
        f"**{best['passes']} runs of commit `{best['commit']}` in a row passed**: {best['beside_load']} beside load"
        f"{took('loaded')} and {alone} alone{took('alone')}."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="runs in all (spread over the parallel clones)")
    ap.add_argument("--hog", type=int, default=0, help="spinning processes beside the suite")
    ap.add_argument("--parallel", type=int, default=1, help="clones tested at once")
    ap.add_argument("--beside", default="", help="another job running beside the suite, to record (e.g. a training)")
    ap.add_argument("--commit", default="HEAD", help="the commit to test (resolved once, at the start)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--summary", action="store_true", help="print the longest streak in --out and stop")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.summary:
        try:
            best = streak(read_records(args.out))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            ap.error(f"cannot read the records {args.out}: {e!r}")
        print(json.dumps(best))
        print(sentence(best))
        return 0
    if not (1 <= args.runs <= 1000 and 0 <= args.hog <= 64 and 1 <= args.parallel <= 8):
        ap.error("--runs must be 1..1000, --hog 0..64, --parallel 1..8")
    try:  # every run tests this commit, whatever lands meanwhile
        commit = _git("rev-parse", "--short", "--verify", f"{args.commit}^{{commit}}")
    except subprocess.CalledProcessError:
        ap.error(f"--commit {args.commit} is not a commit of {REPO}")
    plan = Plan(commit, args.out, args.hog, args.parallel, args.beside, tuple(args.pytest_args))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hog)]
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        lanes = [
            threading.Thread(target=_lane, args=(plan, k, len(range(k, args.runs, args.parallel))))
            for k in range(args.parallel)
        ]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
    finally:
        for h in hogs:
            h.kill()
    return 130 if _stop.is_set() else 0


if __name__ == "__main__":
    raise SystemExit(main())
