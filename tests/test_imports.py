"""The repo's import graph, read from the sources with ast: no cycles, nothing imports the entry script,
and no library imports a layer above it (the entry script imports libraries, never the reverse)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "train_gpt"
# Each layer may import its own layer and those before it, never a later one.
LAYERS = [{"model", "optim", "data"}, {"tools", "training"}, {"bench", "experiments"}, {SCRIPT}]
PACKAGES = set().union(*LAYERS) - {SCRIPT}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def repo_modules() -> dict[str, Path]:
    modules = {SCRIPT: ROOT / f"{SCRIPT}.py"}
    for package in PACKAGES:
        modules.update({module_name(path): path for path in (ROOT / package).rglob("*.py")})
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Repo modules that `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports pkg and, where sub is a module, pkg.sub too
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {t for t in targets if t in modules}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = repo_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def layer(name: str) -> int:
    return next(i for i, members in enumerate(LAYERS) if name.split(".")[0] in members)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with an explicit path)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_the_walker_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "training.runtime" in graph["tools.sample"]  # top level
    assert "optim.distributed" in graph["optim.muon"]  # relative: from .distributed import Sharding
    assert "data.demo" in graph["training.run"]  # inside a function


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_nothing_imports_the_entry_script():
    importers = sorted(name for name, targets in import_graph().items() if SCRIPT in targets)
    assert importers == []


def test_no_module_imports_a_later_layer():
    upward = sorted(f"{name} -> {target}" for name, targets in import_graph().items() for target in targets
                    if layer(target) > layer(name))
    assert upward == []
