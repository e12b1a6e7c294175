"""One standalone train_gpt.py for a record submission: the entry script with every repo module it
imports inlined, so that the file runs with nothing of the repo around it.

    python -m tools.bundle [--entry train_gpt.py] [--out dist/train_gpt.py]      # make bundle

Everything is derived by parsing the sources at bundling time:
  - Repo modules are the .py files and packages next to the entry script. Every `from X import name`
    of one, at top level or inside a function, pulls X (and its packages) in.
  - A module is inlined where it would first run: before the statement whose import runs it. A module
    imported only inside functions follows the module that imports it (for the entry script: just
    before its `if __name__ == "__main__":` block).
  - Only what the bundle uses is kept: a top-level statement that binds names is inlined if kept code
    reads one of them; one that binds nothing (a side effect) always is. Each module's banner lists
    what was left out. Inlined modules' `if __name__ == "__main__":` blocks are dropped.
  - One namespace: imports disappear and every use of an imported name is rewritten to the name of
    its definition. Where two modules bind one name to different things, the later module's binding
    gets a `__<module>` suffix at every place that refers to it (scope-aware); the entry's names never
    change. Names shadowing a builtin that other modules use are renamed the same way.
  - `__file__` in an inlined module means its repo path next to the bundle, so relative data paths
    (data/demo.py's cache: <bundle folder>/data/cache/demo) work as they do in the repo.
Refused with a one-line error naming the place: a module object (`import pkg`, `from pkg import
submodule`), `from X import *`, `from __future__` in an inlined module, import cycles, and a repo
import sharing its line with other code.
"""

import argparse
import ast
import builtins
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

ENTRY = "__main__"
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
SCOPES = (*FUNCTIONS, *COMPREHENSIONS, ast.ClassDef)
BUILTINS = frozenset(dir(builtins))
FILE_HELPER = "_inlined_file"
FILE_HELPER_SOURCE = f'''

def {FILE_HELPER}(relative: str) -> str:
    """__file__ of an inlined module: its path in the repo, taken from this file's folder."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), relative)
'''


class BundleError(Exception):
    """The entry's modules cannot be flattened into one file; the message names the place and why."""


class Span(NamedTuple):
    """Replace bytes [start, end) of source line `line` (1-based), which hold `old`, by `text`."""

    line: int
    start: int
    end: int
    old: str
    text: str


@dataclass
class RepoImport:
    node: ast.ImportFrom
    target: str  # absolute dotted name of the module imported from
    names: list[tuple[str, str]]  # (name in target, name bound here)
    scope: str  # "module" or "function": where it runs and binds


@dataclass
class Statement:
    node: ast.stmt
    first_line: int  # its text starts here, with the comments above it
    kind: str  # "docstring", "main" (an inlined module's __main__ block), "import" (repo only), "code"
    binds: set[str]  # top-level names it binds, other than by repo imports
    refs: set[str]  # every name used anywhere inside it
    imports: list[RepoImport]
    kept: bool = False


@dataclass
class Module:
    name: str  # dotted; ENTRY for the entry script
    rel: str  # path relative to the repo root
    is_package: bool
    tree: ast.Module
    lines: list[str]
    statements: list[Statement]
    imported: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (module, name) it imports
    flat: dict[str, str] = field(default_factory=dict)  # top-level name -> its name in the bundle


# ----------------------------------------------------------------------------------------------------
# Reading sources


def find_module(root: Path, dotted: str) -> tuple[Path, bool] | None:
    """(file, is_package) of repo module `dotted`, or None if the repo has no such module."""
    base = root.joinpath(*dotted.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    return None


def prefixes(dotted: str) -> list[str]:
    """"a.b.c" -> ["a", "a.b", "a.b.c"]: the modules that importing a.b.c runs, in order."""
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imports_in(node: ast.AST, scope: str = "module"):
    """(import statement, "module" | "class" | "function") for node and all inside it, in source order."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, scope
        return
    if isinstance(node, FUNCTIONS):
        scope = "function"
    elif isinstance(node, ast.ClassDef) and scope == "module":
        scope = "class"
    for child in ast.iter_child_nodes(node):
        yield from imports_in(child, scope)


def alias_binding(alias: ast.alias, node: ast.Import | ast.ImportFrom) -> str:
    """The name an import binds for one alias: `import a.b` binds a, `from a import b` binds b."""
    if isinstance(node, ast.Import):
        return alias.asname or alias.name.partition(".")[0]
    return alias.asname or alias.name


def bound_by_import(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [alias_binding(a, node) for a in node.names]


def scope_bindings(nodes: list[ast.AST], skip: set[int] = frozenset()) -> tuple[set[str], set[str]]:
    """(names bound, names declared global) by code in one scope; nested scopes are not entered.

    Imports whose id is in `skip` are left out of the names bound.
    """
    bound, declared = set(), set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
            return
        if isinstance(node, (ast.Lambda, *COMPREHENSIONS)):
            return
        if isinstance(node, ast.Global):
            declared.update(node.names)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skip:
            bound.update(bound_by_import(node))
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for node in nodes:
        visit(node)
    return bound - declared, declared


def declared_global(node: ast.AST) -> set[str]:
    return {name for n in ast.walk(node) if isinstance(n, ast.Global) for name in n.names}


def is_main_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') in (
        '__name__ == "__main__"', '"__main__" == __name__')


def is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(
        node.value.value, str)


def external_origin(node: ast.stmt, name: str) -> str | None:
    """The dotted object that import statement `node` binds to `name` ("torch.nn"), else None."""
    if isinstance(node, ast.Import):
        return next((a.name if a.asname else name for a in node.names if alias_binding(a, node) == name),
                    None)
    if isinstance(node, ast.ImportFrom) and not node.level:
        return next((f"{node.module}.{a.name}" for a in node.names if alias_binding(a, node) == name), None)
    return None


# ----------------------------------------------------------------------------------------------------
# Scope-aware renaming of a module's globals


class _Scope(NamedTuple):
    kind: str  # "module", "function" or "class"
    bound: set[str]
    declared_global: set[str]


def _open_scope(node: ast.AST) -> tuple[_Scope, list[ast.AST], list[ast.AST]]:
    """(the scope node opens, children evaluated outside it, children evaluated inside it)."""
    if isinstance(node, ast.ClassDef):
        inner = node.body
        outer = [*node.decorator_list, *node.bases, *node.keywords]
    elif isinstance(node, FUNCTIONS):
        inner = node.body if isinstance(node.body, list) else [node.body]  # a lambda's body is one expr
        outer = [*getattr(node, "decorator_list", []), node.args]
        if getattr(node, "returns", None):
            outer.append(node.returns)
    else:  # a comprehension: its targets are its own (the first iterable is read outside; ignored here)
        inner, outer = list(ast.iter_child_nodes(node)), []
    bound, declared = scope_bindings(inner)
    if isinstance(node, FUNCTIONS):
        a = node.args
        bound |= {arg.arg for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if arg}
    kind = "class" if isinstance(node, ast.ClassDef) else "function"
    return _Scope(kind, bound, declared), outer, inner


def _is_global(name: str, stack: list[_Scope]) -> bool:
    """Whether `name`, read in the innermost scope of stack, means the module's global."""
    current = stack[-1]
    if current.kind == "module" or name in current.declared_global:
        return True
    if name in current.bound:
        return False
    for scope in reversed(stack[1:-1]):
        if scope.kind == "class":  # class bodies are not visible to the functions inside them
            continue
        if name in scope.declared_global:
            return True
        if name in scope.bound:
            return False
    return True


def rename_spans(module: Module, renames: dict[str, str]) -> list[Span]:
    """The edits that make every reference to the module-level names in `renames` use the new text."""
    spans: list[Span] = []
    where = module.rel

    def name_span(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> Span:
        line = module.lines[node.lineno - 1].encode()
        keyword = rb"class" if isinstance(node, ast.ClassDef) else rb"(?:async\s+)?def"
        match = re.compile(keyword + rb"\s+(" + node.name.encode() + rb")\b").search(line, node.col_offset)
        if match is None:
            raise BundleError(f"{where}:{node.lineno}: put `{node.name}` on the line of its def/class "
                              f"to rename it")
        return Span(node.lineno, match.start(1), match.end(1), node.name, renames[node.name])

    def alias_span(alias: ast.alias, bound: str) -> Span:
        if "." in alias.name and not alias.asname:
            raise BundleError(f"{where}:{alias.lineno}: `import {alias.name}` must be renamed to avoid a "
                              f"name collision; write `import {alias.name} as NAME` there")
        text = f"{alias.name} as {renames[bound]}"
        return Span(alias.lineno, alias.col_offset, alias.end_col_offset, module_text(alias), text)

    def module_text(node: ast.AST) -> str:
        return module.lines[node.lineno - 1].encode()[node.col_offset:node.end_col_offset].decode()

    def visit(node: ast.AST, stack: list[_Scope], importer: ast.stmt | None = None) -> None:
        if isinstance(node, ast.Name) and node.id in renames and _is_global(node.id, stack):
            spans.append(Span(node.lineno, node.col_offset, node.end_col_offset, node.id, renames[node.id]))
        elif isinstance(node, ast.alias) and importer is not None:
            bound = alias_binding(node, importer)
            if bound in renames and _is_global(bound, stack):
                spans.append(alias_span(node, bound))
        elif isinstance(node, ast.Global) and set(node.names) & set(renames):
            text = "global " + ", ".join(renames.get(n, n) for n in node.names)
            spans.append(Span(node.lineno, node.col_offset, node.end_col_offset, module_text(node), text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and (
                node.name in renames and _is_global(node.name, stack)):
            spans.append(name_span(node))
        if isinstance(node, SCOPES):
            scope, outer, inner = _open_scope(node)
            for child in outer:
                visit(child, stack)
            for child in inner:
                visit(child, [*stack, scope])
            return
        for child in ast.iter_child_nodes(node):
            visit(child, stack, node if isinstance(node, ast.Import | ast.ImportFrom) else None)

    visit(module.tree, [_Scope("module", set(), set())])
    return spans


# ----------------------------------------------------------------------------------------------------
# The bundler


class Bundler:
    """bundle = Bundler(entry).run(): the entry script with its repo modules inlined, as text."""

    def __init__(self, entry: Path):
        self.entry = Path(entry).resolve()
        self.root = self.entry.parent
        self.modules: dict[str, Module] = {}  # in load order, the entry first
        self.pending: list[tuple[str, str]] = []  # (module, name) some kept code reads
        self.needed: set[tuple[str, str]] = set()
        self.state: dict[str, str] = {}  # module -> "open" while it is being written, then "done"
        self.chunks: list[str] = []
        self.inlined: list[str] = []  # files inlined, in the bundle's order

    def run(self) -> str:
        self.include(ENTRY)
        while self.pending:
            self.need(*self.pending.pop())
        self.assign_flat_names()
        self.emit(ENTRY)
        text = self.header() + "".join(self.chunks)
        self.verify(text)
        return text

    # -- what the bundle holds ------------------------------------------------------------------------

    def load(self, name: str) -> Module:
        if name == ENTRY:
            path, is_package = self.entry, False
        else:
            path, is_package = find_module(self.root, name)
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        module = Module(name, path.relative_to(self.root).as_posix(), is_package, tree,
                        source.splitlines(keepends=True), [])
        first_line = 1
        for index, node in enumerate(tree.body):
            if node.lineno < first_line:
                raise BundleError(f"{module.rel}:{node.lineno}: put each top-level statement on lines of "
                                  f"its own")
            module.statements.append(self.classify(module, node, index, first_line))
            first_line = node.end_lineno + 1
        for stmt in module.statements:
            for imp in stmt.imports:
                if imp.scope == "module" and stmt.kind != "main":
                    module.imported.update({local: (imp.target, name) for name, local in imp.names})
        return module

    def classify(self, module: Module, node: ast.stmt, index: int, first_line: int) -> Statement:
        imports = [i for i in (self.repo_import(module, n, scope) for n, scope in imports_in(node)) if i]
        refs = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | declared_global(node)
        if index == 0 and is_docstring(node):
            kind = "docstring"
        elif module.name != ENTRY and is_main_block(node):
            kind = "main"
        elif imports and imports[0].node is node:
            kind = "import"
        else:
            kind = "code"
        binds = set()
        if kind == "code":
            bound, declared = scope_bindings([node], {id(i.node) for i in imports})
            binds = bound | declared | declared_global(node)
        return Statement(node, first_line, kind, binds, refs, imports)

    def repo_import(self, module: Module, node: ast.Import | ast.ImportFrom, scope: str) -> RepoImport | None:
        where = f"{module.rel}:{node.lineno}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if self.is_repo(alias.name):
                    raise BundleError(f"{where}: `import {alias.name}` binds a module object, which one flat "
                                      f"file cannot hold; write `from {alias.name} import NAME`")
            return None
        if node.module == "__future__" and module.name != ENTRY:
            raise BundleError(f"{where}: `from __future__ import` in an inlined module would change the "
                              f"whole bundle; move it to the entry script or drop it")
        target = self.absolute(module, node)
        if not self.is_repo(target):
            return None
        if find_module(self.root, target) is None:
            raise BundleError(f"{where}: no module {target} in {self.root}")
        if scope == "class":
            raise BundleError(f"{where}: a repo import inside a class body cannot be flattened; move it out")
        for alias in node.names:
            if alias.name == "*":
                raise BundleError(f"{where}: `from {target} import *` cannot be flattened; import the names")
            if find_module(self.root, f"{target}.{alias.name}"):
                raise BundleError(f"{where}: `{alias.name}` is a module object, which one flat file cannot "
                                  f"hold; write `from {target}.{alias.name} import NAME`")
        return RepoImport(node, target, [(a.name, a.asname or a.name) for a in node.names], scope)

    def absolute(self, module: Module, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        parts = package.split(".") if package else []
        if node.level > len(parts):
            raise BundleError(f"{module.rel}:{node.lineno}: relative import beyond the top-level package")
        base = ".".join(parts[:len(parts) - node.level + 1])
        return f"{base}.{node.module}" if node.module else base

    def is_repo(self, dotted: str) -> bool:
        return find_module(self.root, dotted.partition(".")[0]) is not None

    def include(self, name: str) -> None:
        """Load module `name` and its packages, keeping what runs when they are imported."""
        for prefix in prefixes(name) if name != ENTRY else [ENTRY]:
            if prefix in self.modules:
                continue
            module = self.modules[prefix] = self.load(prefix)
            for stmt in module.statements:
                if stmt.kind == "code" and (prefix == ENTRY or not stmt.binds):
                    self.keep(module, stmt)
                for imp in stmt.imports:
                    if imp.scope == "module" and stmt.kind != "main":
                        self.include(imp.target)

    def keep(self, module: Module, stmt: Statement) -> None:
        if stmt.kept:
            return
        stmt.kept = True
        self.pending += [(module.name, ref) for ref in stmt.refs]
        for imp in stmt.imports:
            self.include(imp.target)
            self.pending += [(imp.target, name) for name, _ in imp.names]

    def need(self, module_name: str, name: str) -> None:
        """Keep what binds `name` in the module (if anything does: it may be a local or a builtin)."""
        if (module_name, name) in self.needed:
            return
        self.needed.add((module_name, name))
        module = self.modules[module_name]
        for stmt in module.statements:
            if stmt.kind == "code" and name in stmt.binds:
                self.keep(module, stmt)
        if name in module.imported:
            self.pending.append(module.imported[name])

    # -- one namespace --------------------------------------------------------------------------------

    def kept_binds(self, module: Module) -> set[str]:
        return {name for stmt in module.statements if stmt.kept for name in stmt.binds}

    def identity(self, module: Module, name: str) -> tuple:
        """What `name` is in module: the same external import everywhere, or this module's own thing."""
        origins = {external_origin(s.node, name) for s in module.statements if s.kept and name in s.binds}
        if len(origins) == 1 and None not in origins:
            return ("external", origins.pop())
        return ("defined", module.name, name)

    def origin(self, module_name: str, name: str, where: str) -> tuple[str, str]:
        """The (module, name) defining what `name` in module_name is, following imports."""
        seen = set()
        while name not in self.kept_binds(self.modules[module_name]):
            module = self.modules[module_name]
            if name not in module.imported or (module_name, name) in seen:
                raise BundleError(f"{where}: cannot import name {name!r} from {module.rel}")
            seen.add((module_name, name))
            module_name, name = module.imported[name]
        return module_name, name

    def reads_builtin(self, name: str) -> bool:
        return any(name in s.refs and name not in self.kept_binds(m) and name not in m.imported
                   for m in self.modules.values() for s in m.statements if s.kept)

    def assign_flat_names(self) -> None:
        """Each module's kept top-level names: their own, or suffixed where modules bind them differently."""
        groups: dict[str, dict[tuple, list[Module]]] = {}
        for module in self.modules.values():
            for name in sorted(self.kept_binds(module)):
                if name in module.imported and (module.name, name) in self.needed:
                    raise BundleError(f"{module.rel}: binds {name!r} both by a repo import and by its own "
                                      f"code; rename one")
                groups.setdefault(name, {}).setdefault(self.identity(module, name), []).append(module)
        if FILE_HELPER in groups:
            owner = next(iter(groups[FILE_HELPER].values()))[0]
            raise BundleError(f"{owner.rel}: binds {FILE_HELPER!r}, which the bundle reserves; rename it")
        taken = set(groups) | BUILTINS
        for name, by_identity in groups.items():
            shadows_builtin = name in BUILTINS and self.reads_builtin(name)
            for k, modules in enumerate(by_identity.values()):
                flat = name if k == 0 and not shadows_builtin else self.fresh(name, modules[0], taken)
                for module in modules:
                    module.flat[name] = flat
        for module in self.modules.values():
            for local, (target, name) in module.imported.items():
                if (module.name, local) in self.needed:
                    module.flat[local] = self.flat_name(target, name, module.rel)

    def fresh(self, name: str, module: Module, taken: set[str]) -> str:
        flat = f"{name}__{module.name.replace('.', '_')}"
        while flat in taken:
            flat += "_"
        taken.add(flat)
        return flat

    def flat_name(self, target: str, name: str, where: str) -> str:
        defining, defined = self.origin(target, name, where)
        return self.modules[defining].flat[defined]

    # -- writing --------------------------------------------------------------------------------------

    def emit(self, name: str) -> None:
        """Write module `name`, each repo module it runs first; modules its functions import after it."""
        module = self.modules[name]
        self.state[name] = "open"
        if name != ENTRY:
            if not self.inlined and self.uses_file():
                self.chunks.append(FILE_HELPER_SOURCE)
            self.inlined.append(module.rel)
            self.chunks.append(self.banner(module))
        spans = self.spans(module)
        deferred: list[str] = []
        first = True  # an inlined module's first statement follows its banner with no blank lines
        for stmt in module.statements:
            if name == ENTRY and is_main_block(stmt.node):
                self.ensure_all(deferred)
            if stmt.kind == "main":
                continue
            for imp in stmt.imports:
                if imp.scope == "module":
                    self.ensure(imp.target, f"{module.rel}:{imp.node.lineno}")
                elif stmt.kept:
                    deferred.append(imp.target)
            if stmt.kept or (name == ENTRY and stmt.kind == "docstring"):
                text = self.render(module, stmt, spans)
                self.chunks.append(text.lstrip("\n") if name != ENTRY and first else text)
                first = False
        self.ensure_all(deferred)
        self.state[name] = "done"

    def ensure(self, target: str, where: str | None = None) -> None:
        """Write `target` and its packages unless done. where=None: a function's import (no cycle check)."""
        for prefix in prefixes(target):
            state = self.state.get(prefix)
            if state == "open" and where and prefix == target:
                raise BundleError(f"{where}: import cycle through {self.modules[target].rel}; a flat file "
                                  f"needs an order (import inside a function to break it)")
            if state is None:
                self.emit(prefix)

    def ensure_all(self, targets: list[str]) -> None:
        for target in targets:
            self.ensure(target)
        targets.clear()

    def uses_file(self) -> bool:
        return any(s.kept and "__file__" in s.refs for m in self.modules.values() if m.name != ENTRY
                   for s in m.statements)

    def spans(self, module: Module) -> dict[int, list[Span]]:
        renames = {old: new for old, new in module.flat.items() if old != new}
        if module.name != ENTRY:
            renames["__file__"] = f'{FILE_HELPER}("{module.rel}")'
        by_line: dict[int, list[Span]] = {}
        for span in rename_spans(module, renames) if renames else []:
            by_line.setdefault(span.line, []).append(span)
        return by_line

    def render(self, module: Module, stmt: Statement, spans: dict[int, list[Span]]) -> str:
        """The statement's text with the comments above it: renames applied, repo imports replaced."""
        replaced = self.import_replacements(module, stmt)
        out, line = [], stmt.first_line
        while line <= stmt.node.end_lineno:
            if line in replaced:
                end, new_lines = replaced[line]
                out += new_lines
                line = end + 1
                continue
            out.append(apply_spans(module.lines[line - 1], spans.get(line, []), module.rel))
            line += 1
        text = "".join(out)
        return text if text.endswith("\n") else text + "\n"

    def import_replacements(self, module: Module, stmt: Statement) -> dict[int, tuple[int, list[str]]]:
        """first line -> (last line, new lines) for each repo import inside a kept statement.

        A function's import becomes `local = flat_name` where the names differ, else disappears (then
        the function reads the global); an import that was a block's only content becomes `pass`.
        """
        replaced: dict[int, tuple[int, list[str]]] = {}
        emptied: set[int] = set()
        for imp in stmt.imports:
            node = imp.node
            indent = self.own_lines(module, node)
            new = []
            if imp.scope == "function":
                for name, local in imp.names:
                    flat = self.flat_name(imp.target, name, f"{module.rel}:{node.lineno}")
                    if flat != local:
                        new.append(f"{indent}{local} = {flat}\n")
            end = node.end_lineno
            if not new and end < len(module.lines) and not module.lines[end].strip():
                end += 1  # and the blank line after it
            replaced[node.lineno] = (end, new)
            if not new:
                emptied.add(id(node))
        for block in blocks(stmt.node):
            if all(id(s) in emptied for s in block):
                first = block[0]
                replaced[first.lineno] = (first.end_lineno, [f"{self.own_lines(module, first)}pass\n"])
        return replaced

    def own_lines(self, module: Module, node: ast.stmt) -> str:
        """The indentation of a statement that must stand alone on its lines (else a BundleError)."""
        first = module.lines[node.lineno - 1].encode()
        rest = module.lines[node.end_lineno - 1].encode()[node.end_col_offset:].strip()
        if first[:node.col_offset].strip() or (rest and not rest.startswith(b"#")):
            raise BundleError(f"{module.rel}:{node.lineno}: put this repo import on lines of its own")
        return first[:node.col_offset].decode()

    def banner(self, module: Module) -> str:
        docstring = ast.get_docstring(module.tree) or ""
        left_out = sorted({n for s in module.statements if s.kind == "code" and not s.kept for n in s.binds})
        renamed = [f"{old} -> {new}" for old, new in sorted(module.flat.items())
                   if old != new and old in self.kept_binds(module)]
        lines = ["", "", "# " + "-" * 98, f"# {module.rel}"]
        lines += [f"#   {line}".rstrip() for line in docstring.splitlines()]
        if left_out:
            lines += textwrap.wrap(", ".join(left_out), 100, initial_indent="# left out (unused here): ",
                                   subsequent_indent="#   ")
        if renamed:
            lines += textwrap.wrap(", ".join(renamed), 100, initial_indent="# renamed (name collision): ",
                                   subsequent_indent="#   ")
        return "\n".join(lines) + "\n\n"

    def header(self) -> str:
        rel = self.modules[ENTRY].rel
        files = [rel, *self.inlined]
        lines = [f"# Standalone {rel}: the repo modules it imports are inlined below, so this one file runs",
                 "# with nothing of the repo around it. Made by `python -m tools.bundle` (make bundle).",
                 f"# Source commit: {source_commit(self.root, files)}"]
        lines += textwrap.wrap(", ".join(self.inlined) or "none", 100, initial_indent="# Inlined, in order: ",
                               subsequent_indent="#   ")
        return "\n".join(lines) + "\n\n"

    def verify(self, text: str) -> None:
        try:
            tree = compile(text, "bundle", "exec", ast.PyCF_ONLY_AST)
            compile(tree, "bundle", "exec")
        except SyntaxError as error:
            raise BundleError(f"internal error: the bundle does not compile ({error})") from None
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or self.is_repo(node.module)) or (
                    isinstance(node, ast.Import) and any(self.is_repo(a.name) for a in node.names)):
                raise BundleError(f"internal error: bundle line {node.lineno} still imports from the repo")


def blocks(node: ast.AST):
    """Every statement list (body, orelse, finalbody) inside node."""
    for n in ast.walk(node):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(n, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield block


def apply_spans(line: str, spans: list[Span], where: str) -> str:
    data = line.encode()
    for span in sorted(spans, key=lambda s: s.start, reverse=True):
        if data[span.start:span.end] != span.old.encode():  # positions inside some f-strings before 3.12
            raise BundleError(f"{where}:{span.line}: cannot locate `{span.old}` to rename it; "
                              f"rename it in the source")
        data = data[:span.start] + span.text.encode() + data[span.end:]
    return data.decode()


def source_commit(root: Path, files: list[str]) -> str:
    """HEAD's hash, plus which of `files` differ from it; "unknown" outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--", *files).splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bundle",
                                     description="Write train_gpt.py with its repo modules inlined.")
    parser.add_argument("--entry", type=Path, default=Path(__file__).resolve().parents[1] / "train_gpt.py",
                        help="the script to bundle (default: the repo's train_gpt.py)")
    parser.add_argument("--out", type=Path, default=Path("dist/train_gpt.py"))
    args = parser.parse_args(argv)
    if not args.entry.is_file():
        sys.exit(f"error: --entry {args.entry}: no such file")
    if args.out.resolve() == args.entry.resolve():
        sys.exit(f"error: --out {args.out} would overwrite the entry script")
    bundler = Bundler(args.entry)
    try:
        text = bundler.run()
    except BundleError as error:
        sys.exit(f"error: {error}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {args.entry.name} with {len(bundler.inlined)} repo modules inlined, "
          f"{text.count(chr(10))} lines")


if __name__ == "__main__":
    main()
