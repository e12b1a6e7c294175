"""One standalone train_gpt.py for a record submission: the entry script with every repo module it
imports inlined, so that the file runs with nothing of the repo around it.

    python -m tools.bundle [--entry train_gpt.py] [--out dist/train_gpt.py]      # make bundle

How, all by parsing the sources (repo modules are the .py files and packages next to the entry):
  - Every `from X import name` of a repo module, at top level or inside a function, pulls X in. X is
    inlined where it would first run: before the statement whose import runs it, or, imported only
    inside functions, after the module importing it (for the entry: before its `__main__` block).
  - Only what runs is kept: a top-level statement that binds names if kept code reads one of them, one
    that binds nothing (a side effect) always. Banners list what was left out; inlined modules'
    `if __name__ == "__main__":` blocks are dropped.
  - Repo imports disappear; every name keeps its spelling. `__file__` in an inlined module is its repo
    path next to the bundle, so data paths (data/demo.py's <bundle folder>/data/cache/demo) still hold.

Rules it imposes on repo code, each refused with one line naming the file, the line and the name:
  1. One name, one thing. Two modules may not define one top-level name the bundle keeps (the same
     external import, such as `import torch` in several modules, is one thing), nor may a module define
     a builtin's name at top level that another module uses. A repo import binds the name it imports
     (no `as`).
  2. No module objects: `from X import name` only, never `import X`, `from X import submodule` or
     `from X import *`.
  3. No import cycle through top-level imports (import inside a function to break one).
  4. No `from __future__` in an inlined module, no repo import in a class body, and each top-level
     statement and each repo import on lines of its own.
"""

import argparse
import ast
import builtins
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from data.durable import write_text_atomic

ENTRY = "__main__"
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
BUILTINS = frozenset(dir(builtins))
FILE_HELPER = "_inlined_file"
FILE_HELPER_SOURCE = f'''

def {FILE_HELPER}(relative: str) -> str:  # __file__ of an inlined module: its repo path beside this file
    import os
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), relative)
'''


class BundleError(Exception):
    """The entry's modules cannot be flattened into one file; the message names the place and why."""


@dataclass
class RepoImport:
    node: ast.ImportFrom
    target: str  # absolute dotted name of the module imported from
    names: list[str]
    scope: str  # "module" or "function": where it runs


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
    tree: ast.Module
    lines: list[str]
    statements: list[Statement] = field(default_factory=list)
    imported: dict[str, str] = field(default_factory=dict)  # name -> the module its top-level import reads


def find_module(root: Path, dotted: str) -> Path | None:
    """The file of repo module `dotted` (a package's __init__.py), or None if the repo has no such module."""
    base = root.joinpath(*dotted.split("."))
    return next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)


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


def bound_name(alias: ast.alias, node: ast.Import | ast.ImportFrom) -> str:
    """The name an import binds for one alias: `import a.b` binds a, `from a import b` binds b."""
    if isinstance(node, ast.Import):
        return alias.asname or alias.name.partition(".")[0]
    return alias.asname or alias.name


def top_level_binds(node: ast.stmt, skip: set[int]) -> set[str]:
    """Module-level names a top-level statement binds (`global` ones included); imports in `skip` aside."""
    bound = set()

    def visit(n: ast.AST, top: bool) -> None:
        if isinstance(n, ast.Global):
            bound.update(n.names)
        elif top and isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(n.name)
        elif top and isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            bound.add(n.id)
        elif top and isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skip:
            bound.update(bound_name(a, n) for a in n.names)
        elif top and isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
        nested = isinstance(n, (*FUNCTIONS, ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp,
                                ast.GeneratorExp))
        for child in ast.iter_child_nodes(n):
            visit(child, top and not nested)

    visit(node, True)
    return bound


def is_main_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') in (
        '__name__ == "__main__"', '"__main__" == __name__')


def external_origin(node: ast.stmt, name: str) -> str | None:
    """The dotted object that import statement `node` binds to `name` ("torch.nn"), else None."""
    if isinstance(node, ast.Import):
        return next((a.name if a.asname else name for a in node.names if bound_name(a, node) == name), None)
    if isinstance(node, ast.ImportFrom) and not node.level:
        return next((f"{node.module}.{a.name}" for a in node.names if bound_name(a, node) == name), None)
    return None


def blocks(node: ast.AST):
    """Every statement list (body, orelse, finalbody) inside node."""
    for n in ast.walk(node):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(n, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield block


class Bundler:
    """bundle = Bundler(entry).run(): the entry script with its repo modules inlined, as text."""

    def __init__(self, entry: Path):
        self.entry = Path(entry).resolve()
        self.root = self.entry.parent
        self.modules: dict[str, Module] = {}  # in load order, the entry first
        self.pending: list[tuple[str, str]] = []  # (module, name) that kept code reads
        self.needed: set[tuple[str, str]] = set()
        self.state: dict[str, str] = {}  # module -> "open" while it is being written, then "done"
        self.chunks: list[str] = []
        self.inlined: list[str] = []  # files inlined, in the bundle's order

    def run(self) -> str:
        self.include(ENTRY)
        while self.pending:
            self.need(*self.pending.pop())
        self.check_namespace()
        self.emit(ENTRY)
        return self.header() + "".join(self.chunks)

    # -- reading: what the bundle holds ----------------------------------------------------------------

    def load(self, name: str) -> Module:
        path = self.entry if name == ENTRY else find_module(self.root, name)
        source = path.read_text(encoding="utf-8")
        module = Module(name, path.relative_to(self.root).as_posix(), ast.parse(source, filename=str(path)),
                        source.splitlines(keepends=True))
        first_line = 1
        for index, node in enumerate(module.tree.body):
            if node.lineno < first_line:
                raise BundleError(f"{module.rel}:{node.lineno}: put each top-level statement on lines of "
                                  f"its own")
            stmt = self.classify(module, node, index, first_line)
            module.statements.append(stmt)
            for imp in stmt.imports if stmt.kind != "main" else []:
                if imp.scope == "module":
                    module.imported.update(dict.fromkeys(imp.names, imp.target))
            first_line = node.end_lineno + 1
        return module

    def classify(self, module: Module, node: ast.stmt, index: int, first_line: int) -> Statement:
        imports = [i for i in (self.repo_import(module, n, scope) for n, scope in imports_in(node)) if i]
        refs = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if index == 0 and isinstance(node, ast.Expr) and isinstance(getattr(node.value, "value", None), str):
            kind = "docstring"
        elif module.name != ENTRY and is_main_block(node):
            kind = "main"
        elif imports and imports[0].node is node:
            kind = "import"
        else:
            kind = "code"
        binds = top_level_binds(node, {id(i.node) for i in imports}) if kind == "code" else set()
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
            if alias.asname not in (None, alias.name):
                raise BundleError(f"{where}: `{alias.name} as {alias.asname}` gives a repo name a second "
                                  f"name, which one flat namespace cannot hold; import it as `{alias.name}`")
        return RepoImport(node, target, [a.name for a in node.names], scope)

    def absolute(self, module: Module, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module
        package = module.name if module.rel.endswith("__init__.py") else module.name.rpartition(".")[0]
        base = package.rsplit(".", node.level - 1)[0]
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
            for target in dict.fromkeys(module.imported.values()):
                self.include(target)

    def keep(self, module: Module, stmt: Statement) -> None:
        if stmt.kept:
            return
        stmt.kept = True
        self.pending += [(module.name, ref) for ref in stmt.refs]
        for imp in stmt.imports:
            self.include(imp.target)
            self.pending += [(imp.target, name) for name in imp.names]

    def need(self, module_name: str, name: str) -> None:
        """Keep what binds `name` in the module, if anything does (it may be a local or a builtin)."""
        if (module_name, name) in self.needed:
            return
        self.needed.add((module_name, name))
        module = self.modules[module_name]
        for stmt in module.statements:
            if stmt.kind == "code" and name in stmt.binds:
                self.keep(module, stmt)
        if name in module.imported:
            self.pending.append((module.imported[name], name))

    # -- one namespace --------------------------------------------------------------------------------

    def meanings(self, module: Module) -> dict[str, tuple[str, tuple]]:
        """name -> (where and how, what it is) for each top-level name the module's kept code binds, and
        each builtin's name it reads without binding it (as the builtin, or as a local: telling those
        apart needs scopes, so a local counts too)."""
        found: dict[str, tuple[int, set]] = {}
        for stmt in module.statements:
            for name in stmt.binds if stmt.kept else ():
                line, origins = found.setdefault(name, (stmt.node.lineno, set()))
                origins.add(external_origin(stmt.node, name))
        meant = {name: (f"imported at {module.rel}:{line}", ("external", *origins))
                 if len(origins) == 1 and None not in origins else
                 (f"defined at {module.rel}:{line}", ("defined", module.name))
                 for name, (line, origins) in found.items()}
        reads = {name for stmt in module.statements if stmt.kept for name in stmt.refs}
        for name in reads & BUILTINS - meant.keys() - module.imported.keys():
            meant[name] = (f"read as the builtin in {module.rel}", ("builtin",))
        return meant

    def check_namespace(self) -> None:
        """One name, one thing: refuse a top-level name that means two things in the bundle."""
        first = {FILE_HELPER: ("reserved by the bundle", ("reserved",))}
        for module in self.modules.values():
            for name, (how, what) in sorted(self.meanings(module).items()):
                seen_how, seen_what = first.setdefault(name, (how, what))
                if seen_what != what:
                    raise BundleError(f"`{name}` is {seen_how} and {how}, but the bundle is one namespace: "
                                      f"rename one")

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
        edits, deferred = self.line_edits(module), []
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
                text = "".join(edits.get(i, module.lines[i - 1])
                               for i in range(stmt.first_line, stmt.node.end_lineno + 1))
                text = text if text.endswith("\n") else text + "\n"
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

    def line_edits(self, module: Module) -> dict[int, str]:
        """Line -> its new text, for the lines of kept statements that change: each repo import goes (with
        a blank line after it; a block it empties gets `pass`); in an inlined module, `__file__` becomes
        its repo path next to the bundle."""
        edits: dict[int, str] = {}
        for stmt in (s for s in module.statements if s.kept):
            for imp in stmt.imports:
                self.indent(module, imp.node)
                end = imp.node.end_lineno
                if end < stmt.node.end_lineno and not module.lines[end].strip():
                    end += 1  # and the blank line after it
                edits.update(dict.fromkeys(range(imp.node.lineno, end + 1), ""))
            removed = {id(imp.node) for imp in stmt.imports}
            for block in blocks(stmt.node):
                if all(id(s) in removed for s in block):
                    edits[block[0].lineno] = f"{self.indent(module, block[0])}pass\n"
            names = [n for n in ast.walk(stmt.node) if isinstance(n, ast.Name) and n.id == "__file__"]
            for n in sorted(names, key=lambda n: -n.col_offset) if module.name != ENTRY else ():
                line = edits.get(n.lineno, module.lines[n.lineno - 1]).encode()
                if line[n.col_offset:n.end_col_offset] != b"__file__":  # inside some f-strings (<3.12)
                    raise BundleError(f"{module.rel}:{n.lineno}: cannot locate `__file__`; move it out "
                                      f"of the f-string")
                edits[n.lineno] = (line[:n.col_offset] + f'{FILE_HELPER}("{module.rel}")'.encode()
                                   + line[n.end_col_offset:]).decode()
        return edits

    def indent(self, module: Module, node: ast.stmt) -> str:
        """The indentation of a repo import, which must stand alone on its lines (else a BundleError)."""
        first = module.lines[node.lineno - 1].encode()
        rest = module.lines[node.end_lineno - 1].encode()[node.end_col_offset:].strip()
        if first[:node.col_offset].strip() or (rest and not rest.startswith(b"#")):
            raise BundleError(f"{module.rel}:{node.lineno}: put this repo import on lines of its own")
        return first[:node.col_offset].decode()

    def banner(self, module: Module) -> str:
        docstring = ast.get_docstring(module.tree) or ""
        left_out = sorted({n for s in module.statements if s.kind == "code" and not s.kept for n in s.binds})
        lines = ["", "", "# " + "-" * 98, f"# {module.rel}"]
        lines += [f"#   {line}".rstrip() for line in docstring.splitlines()]
        lines += textwrap.wrap(", ".join(left_out), 100, initial_indent="# left out (unused here): ",
                               subsequent_indent="#   ")
        return "\n".join(lines) + "\n\n"

    def header(self) -> str:
        rel = self.modules[ENTRY].rel
        lines = [f"# Standalone {rel}: the repo modules it imports are inlined below, so this one file runs",
                 "# with nothing of the repo around it. Made by `python -m tools.bundle` (make bundle).",
                 f"# Source commit: {source_commit(self.root, [rel, *self.inlined])}"]
        lines += textwrap.wrap(", ".join(self.inlined) or "none", 100, initial_indent="# Inlined, in order: ",
                               subsequent_indent="#   ")
        return "\n".join(lines) + "\n\n"


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
    parser.add_argument("--out", type=Path, default=Path("dist/train_gpt.py"),
                        help="where to write the bundle (default: dist/train_gpt.py)")
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
    write_text_atomic(args.out, text)  # a reader never sees half a bundle
    print(f"{args.out}: {args.entry.name} with {len(bundler.inlined)} repo modules inlined, "
          f"{text.count(chr(10))} lines")


if __name__ == "__main__":
    main()
