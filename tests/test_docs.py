"""The documentation (issue 35): the MkDocs site builds with ``--strict`` (no broken link, no missing reference, the
API reference generated from the docstrings), the paper-claims table of benchmarks/RESULTS.md is the JSON results,
its shipped-models table is ``pretrained/index.json``, and the docs' Python blocks run.

mkdocs, mkdocs-material and mkdocstrings are in the dev extra: a missing one fails here, it is not skipped."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from conftest import patience
from test_readme import section, shipped_model_rows, table_rows

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"
STATUSES = {"holds", "does not hold", "not run"}
# A figure is a number of the "ours" column that is not part of a name (ResNet-38), an alpha value or an epoch count.
FIGURE = re.compile(r"(?<![\w.\-])(?<!α )\d+(?:\.\d+)?(?![\w.\-]*\s*epoch)(?![\w\-])")


def test_site_builds_strict(tmp_path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        assert importlib.util.find_spec(module), f"{module} is missing: pip install -e '.[docs]' (or '.[dev]')"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=patience(300),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "skipnet" / "index.html").read_text()
    for name in ("create_model", "GatedResNet", "SkipOutput", "GateTrace", "LogitsOnly", "load_model"):
        assert f'id="skipnet.{name}"' in api, f"the API reference lacks skipnet.{name}"
    losses = (tmp_path / "site" / "api" / "losses" / "index.html").read_text()
    assert 'id="skipnet.losses.hybrid_returns"' in losses


# ------------------------------------------------------------------------------------ benchmarks/RESULTS.md
def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def claims() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(claims, sources)``: the rows of the claims table and of the table naming each figure's JSON key, by #."""
    text = section(RESULTS.read_text(), "Paper claims")
    rows = [cells(ln) for ln in text.splitlines() if re.match(r"\| \d+ \|", ln)]
    table = {r[0]: r for r in rows if len(r) == 6}
    sources = {r[0]: r for r in rows if len(r) == 3}
    assert len(table) + len(sources) == len(rows)
    return table, sources


def lookup(data: Any, path: str) -> float:
    """``runs[NAME].key``, ``list[0]``, ``key*100``: the value ``path`` names in ``data``."""
    scale = 1.0
    if path.endswith("*100"):
        path, scale = path[:-4], 100.0
    for part in re.findall(r"[^.\[\]]+|\[[^\]]+\]", path):
        if part.startswith("["):
            key = part[1:-1]
            if key.isdigit():
                data = data[int(key)]
            else:
                found = [d for d in data if key in (d.get("name"), d.get("run"))]
                assert len(found) == 1, f"{path}: {len(found)} rows named {key}"
                data = found[0]
        else:
            data = data[part]
    return float(data) * scale


def test_results_is_current_first_and_short() -> None:
    text = RESULTS.read_text()
    assert len(text.splitlines()) <= 250
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[0] == "Paper claims" and "Per-image routing (issue 31)" in headings
    assert not re.search(r"round (two|three|four|five|six|seven)", " ".join(headings)), "rounds go to the log"


def test_every_claim_has_a_status_and_its_figures_are_the_json() -> None:
    table, sources = claims()
    assert list(table) == [str(i) for i in range(1, len(table) + 1)]
    checked = 0
    for n, (_, claim, paper, ours, command, status) in table.items():
        assert status in STATUSES, f"claim {n}: status {status!r}"
        assert claim and paper, f"claim {n}: the claim and the paper's figure"
        figures = FIGURE.findall(ours)
        if status == "not run":
            assert not figures and n not in sources, f"claim {n} is not run: no figures"
            continue
        assert command and n in sources, f"claim {n}: its command and the JSON keys of its figures"
        _, file, keys = sources[n]
        data = json.loads((RESULTS_DIR / file.strip("`")).read_text())
        paths = re.findall(r"`([^`]+)`", keys)
        assert len(paths) == len(figures), f"claim {n}: figures {figures} against keys {paths}"
        for shown, path in zip(figures, paths):
            value = lookup(data, path)
            decimals = len(shown.split(".")[1]) if "." in shown else 0
            assert math.isclose(float(shown), value, abs_tol=0.5 * 10**-decimals + 1e-9), (
                f"claim {n}: {shown} shown, {file} {path} = {value}"
            )
            checked += 1
    assert set(sources) <= set(table)
    assert checked >= 30


def test_results_shipped_models_table_is_the_index() -> None:
    assert table_rows(section(RESULTS.read_text(), "Shipped models")) == shipped_model_rows()


# ------------------------------------------------------------------------------------ the pages
def test_layout_lists_every_module() -> None:
    layout = (DOCS / "how-it-works.md").read_text().split("## Layout", 1)[1]
    package = ROOT / "src" / "skipnet"
    modules = {p.name for p in package.glob("*.py")} - {"__init__.py"}
    for sub in (p.parent for p in package.glob("*/__init__.py") if p.parent.name != "commands"):
        modules |= {f"{sub.name}/"} | {p.name for p in sub.glob("*.py")} - {"__init__.py"}
    missing = sorted(m for m in modules if m not in layout)
    assert not missing, f"docs/how-it-works.md's Layout does not list {missing}"


def test_python_blocks_in_the_docs_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            if "--8<--" not in code:  # an included file: the examples' own test runs it
                blocks.append((page.name, code))
    assert len(blocks) >= 2
    for name, code in blocks:
        with torch.no_grad():
            exec(compile(code, str(DOCS / name), "exec"), {})


def test_figure_script_draws(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("accuracy_macs", DOCS / "figures" / "accuracy_macs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.draw(tmp_path / "figure.png")
    assert out.stat().st_size > 10_000
    assert (DOCS / "figures" / "accuracy_macs.png").is_file()


def test_deploy_page_speed_figures_are_the_json() -> None:
    """docs/deploy.md's efficiencies of skipnet's default (layout="nchwc", batch 1) and of the routed graph
    (batch 32: as written, and in the blocked layout with and without its whole-batch If where measured), and the
    all-executed overheads, are the rows
    of benchmarks/results/deploy_speed*.json."""
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    models = 0
    for path in sorted(RESULTS_DIR.glob("deploy_speed*.json")):
        got = json.loads(path.read_text())
        if got.get("threads", 1) > 1:  # several intra-op threads: in wall time, and so stated on the page
            assert path.name in text, path.name
        for m in got["models"]:
            default = next(r for r in m["batch1"]["rows"] if "layout=nchwc" in r["lever"])
            routed = next(r for r in m["batch32"]["rows"] if r["lever"] == "ORT, routed, ORT_ENABLE_ALL")
            assert f"{default['efficiency']:.3f}" in text, (path.name, m["arch"])
            assert f"{100 * default['overhead_all']:+.1f}%" in text, (path.name, m["arch"])
            assert f"{routed['efficiency']:.3f}" in text, (path.name, m["arch"])
            for tag in ("layout=nchwc", "no whole-batch If"):  # the blocked layout, and before its whole-batch If
                blocked = next((r for r in m["batch32"]["rows"] if tag in r["lever"]), None)
                assert blocked is None or f"{blocked['efficiency']:.3f}" in text, (path.name, m["arch"], tag)
            share = m["batch32"].get("whole_batch_share")  # the blocks the whole-batch If runs ungathered
            assert share is None or f"{100 * share:.1f}%" in text, (path.name, m["arch"])
            models += 1
    assert models >= 3


def test_deploy_page_states_the_shipped_agreement() -> None:
    """docs/deploy.md's agreement of the shipped models' graphs, as skipnet runs them, with the eager model is the
    committed export_agreement_shipped.json: every shipped gated model, its conditional graph at batch 1 and its
    routed graph at batch 100, the whole test split, nothing differing."""
    text = " ".join((ROOT / "docs" / "deploy.md").read_text(encoding="utf-8").split())
    got = json.loads((RESULTS_DIR / "export_agreement_shipped.json").read_text())
    index = json.loads((ROOT / "src" / "skipnet" / "pretrained" / "index.json").read_text())["models"]
    gated = {name: len(m["skip_ratio_per_block"]) for name, m in index.items() if m["gate"] != "none"}
    assert set(got["models"]) == set(gated) and got["images"] == 10000
    runs = [g for r in got["models"].values() for g in (r, r["routed"])]  # conditional (batch 1), routed (100)
    assert all(r["ok"] and r["decision_mismatches"] == 0 and r["images"] == 10000 for r in runs)
    (blocks,) = set(gated.values())
    worst = max(r["max_abs_logit_diff"] for r in runs)
    assert f"0 of {10000 * blocks:,} decisions and 0 classes differ for each of the {len(gated)}" in text
    shown = f"{worst:.1e}".replace("e-0", "e-")  # 8.6e-6, as the page writes it
    assert f"(max logit difference {shown})" in text and " ".join(got["env"]["command"].split()[1:]) in text


def test_reliability_table_names_tests_that_exist() -> None:
    """Every test the fault-class table of docs/reliability.md names (`test_x.py` or `test_x.py::test_name`) is a
    file of tests/ defining that test: a renamed or deleted test cannot leave the table pointing at nothing."""
    page = (DOCS / "reliability.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and "`test_" in line]
    named = [m for line in rows for m in re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?`", line)]
    assert len(rows) >= 15 and len(named) >= len(rows)
    tests = Path(__file__).parent

    def defines(file: str, test: str) -> bool:
        return (tests / file).is_file() and (not test or f"def {test}(" in (tests / file).read_text())

    missing = [f"{f}::{t}" for f, t in named if not defines(f, t)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_workers_figures_are_the_json() -> None:
    """docs/deploy.md's and the README's batch-32 efficiencies with one-thread workers and with intra-op threads are
    benchmarks/results/workers_speed.json's: every model's on the page, their range in the README."""
    got = json.loads((RESULTS_DIR / "workers_speed.json").read_text())
    page = " ".join((ROOT / "docs" / "deploy.md").read_text(encoding="utf-8").split())
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    n, w = got["threads"], got["workers"]
    assert " ".join(got["env"]["command"].split()[1:-2]) in page  # the command, less its --out
    by_way: dict[str, list[float]] = {}
    for m in got["models"]:
        assert m["sharded_equal_one_session"]
        for way in ("t1", f"t{n}", f"w{w}", f"w{w}_vs_best_plain"):
            by_way.setdefault(way, []).append(m["efficiency"][way])
            assert f"{m['efficiency'][way]:.3f}" in page, (m["arch"], way)
    assert all(e >= 0.8 for e in by_way[f"w{w}_vs_best_plain"])  # "all three are above 0.8 at all threads"
    for way in (f"w{w}", f"t{n}"):
        assert f"{min(by_way[way]):.3f}-{max(by_way[way]):.3f}" in readme, way
