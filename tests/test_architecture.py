"""The code's shape (issues 17, 34): small functions, and an import graph whose arrows point down (architecture.md).

Every module of ``src/skipnet`` is placed in one layer of :data:`LAYERS`, which names the layers each may import from;
a new module fails here until it is placed. Imports are read from the source (module level and inside functions
alike), so a lazy import that crosses a layer counts as much as a top-level one, and no import cycle is allowed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "skipnet"
ARCHITECTURE_MD = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 60  # every function of src/skipnet, no exception (issue 34: the old allow-list is empty, gone)

COMMANDS = {
    "commands.__init__",
    "commands._common",
    *(f"commands.{p.stem}" for p in (PACKAGE / "commands").glob("*.py") if not p.stem.startswith("_")),
}
DATA = ["data.sources", "data.folders", "data.decode", "data.loaders", "data.bundle", "data.__init__"]  # in this order

# name: (modules, the layers they may import from besides their own). Layers are listed bottom up.
LAYERS: dict[str, tuple[set[str], set[str]]] = {
    "errors": ({"errors"}, set()),
    # file I/O, devices, run directories, data: nothing of the network
    "io": ({"fileio", "device", "rundir", "runlog", "zoo", *DATA}, {"errors"}),
    # the network: knows nothing of training, data, files, devices or the command line
    "network": (
        {"config", "capture", "outputs", "blocks", "backbones", "fastgate", "gates", "policy", "executors", "gated"},
        {"errors"},
    ),
    "model": ({"registry"}, {"errors", "network"}),
    "around the model": (
        {
            "cost",
            "losses",
            "stages",
            "routes",
            "checkpoint",
            "pretrained",
            "trainconfig",
            "evaluate",
            "analysis",
            "results",
            "plots",
            "ortgraph",
            "export",
            "predict",
            "bench",
            "bench_onnx",
            "distributed",
            "experiments",
        },
        {"errors", "io", "network", "model"},
    ),
    "training": ({"runsetup", "runstate", "train"}, {"errors", "io", "network", "model", "around the model"}),
    "package": ({"__init__"}, {"errors", "io", "network", "model", "around the model", "training"}),
    # the command line: a command never imports a sibling command (test_commands_do_not_import_each_other)
    "cli": (
        {"cli", "__main__", *COMMANDS},
        {"errors", "io", "network", "model", "around the model", "training", "package"},
    ),
}

# Imports that break the rules today, each with why and who removes it. Being fixed by another engineer (issue 34):
# delete an entry once its import is gone (test_known_exceptions_are_still_needed says when), never add one.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}  # the checkpoint <-> pretrained cycle and registry -> pretrained
# are gone (issue 33): the zoo's index is skipnet.zoo (I/O) under checkpoint; loading models is pretrained, above it


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(tree: ast.Module) -> set[str]:
    """The skipnet names ``tree`` imports (``skipnet.x.y`` as ``x.y``; ``from skipnet.x import a`` as ``x.a``,
    ``from skipnet import a`` as ``a``): a module, or a name inside one (see :func:`_resolve`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "skipnet":
            rest = node.module[len("skipnet.") :] if node.module != "skipnet" else ""
            found |= {f"{rest}.{a.name}" if rest else a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name[len("skipnet.") :] for a in node.names if a.name.startswith("skipnet.")}
    return found


def _resolve(name: str, modules: set[str]) -> str:
    """The module an imported ``name`` lives in: itself, its package's ``__init__``, or the module it is read from
    (``data.load_data`` -> ``data.__init__``, ``__version__`` -> ``__init__``)."""
    parts = name.split(".")
    for k in range(len(parts), -1, -1):
        for candidate in (".".join(parts[:k]), ".".join([*parts[:k], "__init__"])):
            if candidate.strip(".") in modules:
                return candidate.strip(".")
    return name


def _graph() -> dict[str, set[str]]:
    """Module -> the skipnet modules it imports (itself excluded)."""
    trees = _modules()
    names = set(trees)
    return {m: {_resolve(d, names) for d in _imports(t)} - {m} for m, t in trees.items()}


def _layer_of() -> dict[str, str]:
    return {m: layer for layer, (members, _) in LAYERS.items() for m in members}


def _qualified_functions(tree: ast.AST, prefix: str):
    """``(qualified name, lines)`` of every function, methods and nested functions named by their class/function."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}.{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node.end_lineno - node.lineno + 1
            yield from _qualified_functions(node, name)
        else:
            yield from _qualified_functions(node, prefix)


# ------------------------------------------------------------------------------------------------------- size
def test_no_function_over_60_lines_and_a_short_forward() -> None:
    sizes = {q: n for m, tree in _modules().items() for q, n in _qualified_functions(tree, m)}
    long = [f"{q}: {n} lines" for q, n in sizes.items() if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(long)
    gated = _modules()["gated"]
    (cls,) = [n for n in gated.body if isinstance(n, ast.ClassDef) and n.name == "GatedResNet"]
    (fwd,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward"]
    assert fwd.end_lineno - fwd.lineno + 1 <= 40


# ----------------------------------------------------------------------------------------------------- layers
MAX_CLASS_LINES = 300


def test_no_class_over_300_lines() -> None:
    """Issue 34: a class that grows past a screenful of screens holds more than one job (the trainer was three)."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_every_module_is_in_exactly_one_layer() -> None:
    placed = [m for members, _ in LAYERS.values() for m in members]
    twice = sorted({m for m in placed if placed.count(m) > 1})
    assert not twice, f"modules in more than one layer: {twice}"
    missing = sorted(set(_modules()) - set(placed))
    assert not missing, f"modules in no layer (place them in LAYERS, and in docs/architecture.md): {missing}"
    gone = sorted(set(placed) - set(_modules()))
    assert not gone, f"LAYERS names modules that do not exist: {gone}"
    order = list(LAYERS)
    for layer, (_, allowed) in LAYERS.items():
        assert allowed <= set(order[: order.index(layer)]), f"layer {layer!r} may only import layers below it"


def test_imports_point_down() -> None:
    layer_of = _layer_of()
    wrong = []
    for name, deps in _graph().items():
        for dep in sorted(deps):
            if (name, dep) in KNOWN_EXCEPTIONS or dep not in layer_of or name not in layer_of:
                continue
            mine, theirs = layer_of[name], layer_of[dep]
            if theirs != mine and theirs not in LAYERS[mine][1]:
                wrong.append(f"{name} (layer {mine!r}) imports {dep} (layer {theirs!r})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = {m: {d for d in deps if (m, d) not in KNOWN_EXCEPTIONS} for m, deps in _graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*path[path.index(d) :], d]))
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_known_exceptions_are_still_needed() -> None:
    graph = _graph()
    stale = sorted(f"{a} -> {b}" for a, b in KNOWN_EXCEPTIONS if b not in graph.get(a, set()))
    assert not stale, f"these imports are gone: remove them from KNOWN_EXCEPTIONS: {stale}"


def test_data_modules_sit_below_training_and_the_cli_in_their_order() -> None:
    layer_of, graph = _layer_of(), _graph()
    assert {m for m in _modules() if m.split(".")[0] == "data"} == set(DATA)
    for m in DATA:
        assert layer_of[m] == "io"
        earlier = DATA[: DATA.index(m)]
        later = [d for d in graph[m] if d.split(".")[0] == "data" and d not in earlier]
        assert not later, f"{m} imports {later}: a data module imports only those before it in DATA"
    for user in ("train", "commands.train"):
        assert "io" in LAYERS[layer_of[user]][1]


def test_commands_do_not_import_each_other() -> None:
    graph = _graph()
    shared = {"commands.__init__", "commands._common"}
    wrong = [f"{m} imports {d}" for m in COMMANDS - shared for d in graph[m] & COMMANDS - shared]
    assert not wrong, "\n".join(wrong)


def test_the_architecture_doc_names_every_module() -> None:
    text = ARCHITECTURE_MD.read_text(encoding="utf-8")
    section = text[text.index("## Layers") : text.index("\n## ", text.index("## Layers") + 1)]
    named = set(re.findall(r"`([\w/]+\.py)`", section))
    top = {f"{m}.py" for m in _modules() if "." not in m and m not in ("__init__", "__main__")}
    data = {f"data/{m.split('.')[1]}.py" for m in DATA if not m.endswith("__init__")}
    missing = sorted((top | data) - named)
    assert not missing, f"docs/architecture.md's Layers section does not name: {missing}"


def test_the_import_checker_sees_lazy_imports() -> None:
    """A function-level import is found, and a crossing one would be reported."""
    tree = ast.parse("def f():\n    from skipnet.cli import main\n    import skipnet.data\n")
    assert _imports(tree) == {"cli.main", "data"}
    assert _imports(ast.parse("from skipnet import capture, fastgate")) == {"capture", "fastgate"}
    names = set(_modules())
    assert _resolve("cli.main", names) == "cli" and _resolve("data", names) == "data.__init__"
    assert _resolve("data.bundle.DataSpec", names) == "data.bundle" and _resolve("__version__", names) == "__init__"
