"""The repo's import graph, read from the sources with ast (top-level and function-level imports alike):
the layers

    {model, optim, data} -> {training} -> {tools, bench, experiments} -> train_gpt.py

with no import from a layer to a later one, no cycles, nothing importing the entry script, and nothing
outside tools/ importing from tools/ (its modules are commands). Every .py of the repo outside tests/
is in a layer."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "train_gpt"
# Each layer may import its own layer and those before it, never a later one.
LAYERS = [{"model", "optim", "data"}, {"training"}, {"tools", "bench", "experiments"}, {SCRIPT}]
PACKAGES = set().union(*LAYERS) - {SCRIPT}
COMMANDS = "tools"  # `python -m tools.X`: imported by nothing outside tools/


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


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                  if layer(target) > layer(name))


def imports_of_commands(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                  if target.split(".")[0] == COMMANDS and name.split(".")[0] != COMMANDS)


def test_the_walker_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "training.runtime" in graph["tools.sample"]  # top level
    assert "optim.distributed" in graph["optim.muon"]  # relative: from .distributed import Sharding
    assert "data.demo" in graph["training.run"]  # inside a function


def test_every_module_of_the_repo_is_in_a_layer():
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    scripts = {path.stem for path in ROOT.glob("*.py")}
    assert packages | scripts == set().union(*LAYERS)


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_nothing_imports_the_entry_script():
    importers = sorted(name for name, targets in import_graph().items() if SCRIPT in targets)
    assert importers == []


def test_no_module_imports_a_later_layer():
    assert upward_imports(import_graph()) == []


def test_nothing_outside_tools_imports_from_tools():
    assert imports_of_commands(import_graph()) == []


def test_every_module_of_tools_is_a_command():
    """`python -m tools.X` runs it; tools/parity46.py and tools/parity_*.py are parts of the command
    tools.parity (the record's side, its #46 format, our side of #46, the name table, the loader)."""
    def runs_as_a_command(path: Path) -> bool:
        return any(isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
                   for node in ast.parse(path.read_text()).body)

    parts = {path.stem for path in (ROOT / COMMANDS).glob("parity_*.py")} | {"parity46"}
    modules = {path.stem for path in (ROOT / COMMANDS).glob("*.py")} - {"__init__"} - parts
    assert {name for name in modules if not runs_as_a_command(ROOT / COMMANDS / f"{name}.py")} == set()
    assert modules >= {"bundle", "hellaswag", "parity", "plot", "record_stats", "sample"}


def test_the_checks_name_an_upward_import_and_an_import_of_a_command():
    graph = {"model.gpt": {"optim.muon"}, "training.state": {"training.runlog", "model.gpt"},
             "training.checkpoint": {"bench.memory"}, "data.loader": {"training.state"},
             "bench.gpu": {"tools.parity", "training.runlog"}, "tools.sample": {"tools.parity"},
             SCRIPT: {"tools.plot", "training.state"}}
    assert upward_imports(graph) == ["data.loader -> training.state", "training.checkpoint -> bench.memory"]
    assert imports_of_commands(graph) == ["bench.gpu -> tools.parity", f"{SCRIPT} -> tools.plot"]
