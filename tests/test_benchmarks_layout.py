"""The benchmark scripts and examples are clients of the installed ``skipnet`` package: no ``sys.path``
manipulation, no script importing another, and short functions (the limit of ``src/skipnet``'s test, 60 lines,
with an allow-list that may only shrink)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "examples").rglob("*.py"))
MAX_LINES = 60
# functions still over the limit, at their present size: an entry may only shrink or go (when the function is split);
# none is left, and none may be added
LONG: dict[str, int] = {}


# a script still importing another (from the script's own folder, which Python puts first on sys.path): none is left
# (the shared export helpers moved into skipnet.bench), and none may be added
IMPORTS: set[str] = set()


def test_no_sys_path_manipulation() -> None:
    found = [
        f"{p.relative_to(REPO)}:{i}"
        for p in SCRIPTS
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "sys.path" in line
    ]
    assert not found, "sys.path used (import shared code from skipnet instead): " + ", ".join(found)


def test_no_script_imports_another() -> None:
    names = {p.stem for p in SCRIPTS}
    wrong = []
    for p in SCRIPTS:
        for node in ast.walk(ast.parse(p.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            mods += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            wrong += [f"{p.relative_to(REPO)} imports {m}" for m in mods if m.split(".")[0] in names]
    assert set(wrong) <= IMPORTS, "\n".join(sorted(set(wrong) - IMPORTS))


def test_functions_short() -> None:
    sizes = {}
    for p in SCRIPTS:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                sizes[f"{p.relative_to(REPO)}:{node.name}"] = node.end_lineno - node.lineno + 1
    long = [f"{k}: {v} lines" for k, v in sizes.items() if v > LONG.get(k, MAX_LINES)]
    assert not long, f"functions over {MAX_LINES} lines (or grown past their allow-list size):\n" + "\n".join(long)
    stale = [k for k, v in LONG.items() if sizes.get(k, 0) < v]
    assert not stale, "shrunk or gone: lower or drop their allow-list entries: " + ", ".join(stale)
