"""The code's shape (issue 17): small functions, and an import graph whose arrows point down (docs/architecture.md).

Imports are read from the source (module level and inside functions alike), so a lazy import that crosses a layer
counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "skipnet"
MAX_FUNCTION_LINES = 80

# the network: knows nothing of training, data, files, devices or the command line
MODEL = {"config", "blocks", "backbones", "capture", "fastgate", "gates", "policy", "executors", "outputs", "gated"}
# below the network: file I/O, devices, data; they must not reach up into it
BASE = {"errors", "fileio", "device", "data", "rundir"}
CLI = {"cli", "__main__"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(tree: ast.Module) -> set[str]:
    """The skipnet modules ``tree`` imports (``skipnet.x.y`` as ``x.y``; ``from skipnet import a`` as ``a``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "skipnet":
            rest = node.module[len("skipnet.") :] if node.module != "skipnet" else ""
            found |= {rest or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name[len("skipnet.") :] for a in node.names if a.name.startswith("skipnet.")}
    return found


def test_no_function_over_80_lines_and_a_short_forward() -> None:
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {size} lines")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
    gated = _modules()["gated"]
    (cls,) = [n for n in gated.body if isinstance(n, ast.ClassDef) and n.name == "GatedResNet"]
    (fwd,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward"]
    assert fwd.end_lineno - fwd.lineno + 1 <= 40


def test_imports_point_down() -> None:
    wrong = []
    for name, tree in _modules().items():
        top = name.split(".")[0]
        for dep in _imports(tree):
            dep_top = dep.split(".")[0]
            if top in MODEL and dep_top not in MODEL | {"errors", ""}:
                wrong.append(f"model module {name} imports {dep}")
            if top in BASE and dep_top not in BASE:
                wrong.append(f"{name} (below the model) imports {dep}")
            if dep_top in CLI | {"commands"} and top not in CLI | {"commands"}:
                wrong.append(f"library module {name} imports the command line ({dep})")
    assert not wrong, "\n".join(wrong)


def test_the_import_checker_sees_lazy_imports() -> None:
    """A function-level import is found, and a crossing one would be reported."""
    tree = ast.parse("def f():\n    from skipnet.cli import main\n    import skipnet.data\n")
    assert _imports(tree) == {"cli", "data"}
    assert _imports(ast.parse("from skipnet import capture, fastgate")) == {"capture", "fastgate"}
