"""The committed benchmark results regenerate from their stored rows: each training benchmark's collect-only path
(``--no-train``, no run directory present) rebuilds its ``benchmarks/results`` files from the committed JSON, equal
byte for byte to the committed ones but for the date and the command line of the collecting run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from conftest import patience

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"


def script(name: str) -> ModuleType:
    """A benchmark script imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stamp_of(path: Path) -> tuple[str, str]:
    """The date and command line recorded in a results JSON."""
    d = json.loads(path.read_text())
    return d["date"], d["command"]


def same_but_stamp(new: Path, old: Path, stamp: tuple[tuple[str, str], tuple[str, str]]) -> None:
    """``new`` equals ``old`` byte for byte once the collecting run's own date and command line (``stamp``: new,
    committed) are replaced by the committed ones."""
    text = new.read_text()
    for now, then in zip(*stamp):
        text = text.replace(now, then)
    assert text == old.read_text(), f"{new.name} differs from the committed file"


def regenerate(name: str, files: list[str], argv: list[str], tmp_path: Path, inputs: list[str] = ()) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    for f in [*files, *inputs]:
        shutil.copy(RESULTS / f, out / f)
    rc = script(name).main([*argv, "--no-train", "--out", str(tmp_path / "runs"), "--results", str(out)])
    assert rc == 0
    return out


def check(out: Path, stem: str, suffixes: tuple[str, ...] = (".json", ".md")) -> None:
    stamp = stamp_of(out / f"{stem}.json"), stamp_of(RESULTS / f"{stem}.json")
    for suffix in suffixes:
        same_but_stamp(out / f"{stem}{suffix}", RESULTS / f"{stem}{suffix}", stamp)


GROUPS = [("headline30", "headline30_cifar10_cpu"), ("ablations", "ablations_cifar10_cpu")]


@pytest.mark.parametrize("name, stem", GROUPS)
def test_group_regenerates(name: str, stem: str, tmp_path: Path) -> None:
    out = regenerate(name, [f"{stem}.json"], [], tmp_path)
    check(out, stem)


@pytest.mark.parametrize(
    "argv", [["digits"], ["cifar10", "--sp", "runs/bn/sp3/best.pt", "--epochs", "0.5", "--out", "runs/bn"]]
)
def test_hrl_batchnorm_regenerates(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stem = f"hrl_batchnorm_{argv[0]}"
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(RESULTS / f"{stem}.json", out)
    monkeypatch.chdir(tmp_path)  # no run directory here
    assert script("hrl_batchnorm").main([*argv, "--no-train", "--results", str(out)]) == 0
    date = (
        json.loads((out / f"{stem}.json").read_text())["date"],
        json.loads((RESULTS / f"{stem}.json").read_text())["date"],
    )
    same_but_stamp(out / f"{stem}.json", RESULTS / f"{stem}.json", ((date[0],), (date[1],)))
    new, old = (out / f"{stem}.md").read_text(), (RESULTS / f"{stem}.md").read_text()
    assert new.split("\n", 1)[1] == old.split("\n", 1)[1]  # the first line: the date and the command


def test_reproduce_cifar10_regenerates(tmp_path: Path) -> None:
    """The short schedules' group, its headline the 30-epoch group's (read from headline30's results)."""
    stem = "reproduce_cifar10_cpu"
    argv = ["--scale", "cpu", "--no-bench"]
    out = regenerate("reproduce_cifar10", [f"{stem}.json"], argv, tmp_path, ["headline30_cifar10_cpu.json"])
    check(out, stem)
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dynamic_routing_regenerates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stem = "dynamic_routing"
    out = tmp_path / "results"
    out.mkdir()
    for f in (f"{stem}.json", "headline30_cifar10_cpu.json"):
        shutil.copy(RESULTS / f, out / f)
    monkeypatch.chdir(tmp_path)  # runs/dyn is not here: every row is the recorded one
    argv = ["--data", "../shared/data/cifar10-jpeg.tar.gz", "--figure", "routing.png", "--results", str(out)]
    assert script(stem).main([*argv, "--no-train"]) == 0
    check(out, stem)
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_repeat_streak_counts_unbroken_passes_of_one_commit() -> None:
    """suite_repeat's summary: a failure or another commit starts the count again; loaded runs are counted."""
    streak = script("suite_repeat").streak

    def run(commit: str, rc: int = 0, hog: int = 0, parallel: int = 1, seconds: int = 360) -> dict:
        return {"commit": commit, "rc": rc, "hog": hog, "parallel": parallel, "seconds": seconds}

    records = [run("a"), run("a", hog=2), run("a", rc=1), run("a"), run("a", parallel=2, seconds=1400), run("a", hog=1)]
    got = streak(records)
    assert (got["commit"], got["passes"], got["beside_load"]) == ("a", 3, 2)
    assert got["minutes"] == {"alone": [6, 6], "loaded": [6, 23]}
    records += [run("b", seconds=300), run("b"), run("b"), run("b", parallel=2)]
    got = streak(records)
    assert (got["commit"], got["passes"], got["beside_load"]) == ("b", 4, 1)
    assert got["minutes"]["alone"] == [5, 6]
    assert streak([run("a", rc=1)])["passes"] == 0 and streak([])["commit"] is None
    assert streak([run("c"), {**run("c"), "beside": "a training job"}])["beside_load"] == 1
    assert streak([run("d"), {**run("d", rc=1), "void": "its clone was removed"}, run("d")])["passes"] == 2


def test_reliability_page_states_the_suite_repetitions() -> None:
    """docs/reliability.md states the longest streak in the committed suite_repeat.jsonl, as --summary does."""
    bench = script("suite_repeat")
    page = " ".join((REPO / "docs" / "reliability.md").read_text().split())
    assert bench.sentence(bench.streak(bench.read_records(RESULTS / "suite_repeat.jsonl"))) in page


def _children(pid: int) -> dict[int, str]:
    """The command lines of ``pid``'s child processes (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            pass  # a process that ended meanwhile
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_suite_repeat_stopped_ends_its_suite_removes_its_clone_and_records_nothing(tmp_path) -> None:
    """SIGTERM to suite_repeat mid-run: the suite's pytest (in a session of its own) is ended, the clone beside the
    repository removed, no record written, exit 130. (It once left the suite running and the clone behind.)"""
    records = tmp_path / "records.jsonl"
    argv = [sys.executable, str(BENCH / "suite_repeat.py"), "--runs", "3", "--out", str(records), "--", "-x"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, suite = time.monotonic() + patience(60), None
    while suite is None and time.monotonic() < deadline and proc.poll() is None:
        suite = next(((k, c) for k, c in _children(proc.pid).items() if " pytest " in c), None)
        time.sleep(0.1)
    try:
        assert suite is not None, "suite_repeat started no suite"
        pid, cmdline = suite
        clone = Path(cmdline.split("--basetemp ")[1].split()[0]).parent
        assert clone.parent == REPO.parent and clone.is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=patience(30)) == 130
    finally:
        proc.kill()
    assert not clone.exists() and not records.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_own_static_table_and_pages_are_its_results() -> None:
    """benchmarks/results/own_static.md is the table of own_static.json's rows; each static figure lies between the
    two tested routes around the policy's saving and each gap is its two figures' difference; the policy's top
    blocks are the blocks it skips least; docs/routing.md includes the table and RESULTS.md states the gaps' range."""
    mod = script("own_static")
    rows = json.loads((RESULTS / "own_static.json").read_text())["models"]
    assert (RESULTS / "own_static.md").read_text() == mod.table(rows) + "\n"
    assert {r["name"] for r in rows} == set(mod.MODELS)
    for r in rows:
        assert r["selection"] == mod.SELECTION and r["select_images"] >= 500
        for curve, pairs in (
            ("lesion", (("static_accuracy", "accuracy"), ("static_bn_accuracy", "accuracy_bn"))),
            ("rate_routes", (("rate_accuracy", "accuracy"), ("rate_bn_accuracy", "accuracy_bn"))),
        ):
            tested = [p for p in r[curve] if "accuracy" in p]
            assert len(tested) == 2
            assert tested[0]["macs_reduction"] <= r["macs_reduction"] <= tested[1]["macs_reduction"]
            for key, point in pairs:
                lo, hi = sorted(p[point] for p in tested)
                assert lo - 0.01 <= r[key] <= hi + 0.01, (r["name"], key)
                assert abs(r["policy_minus_" + key.removesuffix("_accuracy")] - (r["accuracy"] - r[key])) < 0.011
        skipped = [i for i, s in enumerate(r["skip_ratio_per_block"]) if s > 0]
        dropped = set(r["rate_routes"][1]["dropped"])  # the first block a rate route drops: the most skipped
        assert max(r["skip_ratio_per_block"]) == r["skip_ratio_per_block"][dropped.pop()] and skipped
    page = " ".join((REPO / "docs" / "routing.md").read_text().split())
    assert '--8<-- "benchmarks/results/own_static.md"' in page
    per_image = sorted(mod.best_gap(r) for r in rows if r["distinct_routes"] >= 100)
    static = [mod.best_gap(r) for r in rows if r["distinct_routes"] < 100]
    assert per_image[0] > 0 and len(static) == 1  # the claim: every per-image policy above its static routes
    assert f"by {per_image[0]:.2f} (`_long`) to {per_image[-1]:.2f} points" in page
    results = " ".join((BENCH / "RESULTS.md").read_text().split())
    assert f"{per_image[0]:+.2f} to {per_image[-1]:+.2f} points" in results and f"{static[0]:+.2f}" in results
