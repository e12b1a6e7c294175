"""A speedrun record's training script, cut to its definitions and moved to the CPU, for tools.parity.

Loading (`load_definitions`) never executes the script's training loop. The source (a record log holds
it before the first line of '=' characters) is parsed with `ast`; of its top-level statements only
imports, function and class definitions, assignments to plain names of constant expressions and
`name = LocalClass()` (the Hyperparameters instance) are kept, so nothing touches a GPU, a file or a
process group at load. Then the CPU substitutions, each counted and reported:

  - torch.compile decorators are removed (eager), but on the adapter's `compiled` methods, kept:
    inductor on the CPU, as the record runs them (counted too);
  - definitions decorated by torch.library (custom operators: the records' FP8 head matmul) and
    definitions decorated through one of them are dropped; the adapter switches the FP8 flag off,
    so the head runs the script's own bf16 path, F.linear(x, W.type_as(x));
  - `device="cuda"` becomes "cpu", `pin_memory=True` becomes False, `.cuda(...)` becomes `.cpu()`;
  - the cast to bf16 of Newton–Schulz's input, `NS(X.bfloat16(), ...)` at the call or
    `X = G.bfloat16()` inside NS itself, becomes `.to(NS_DTYPE)`: bf16 as recorded, float32 for the
    one-optimizer-step check;
  - the adapter's `StandIns`: GPU-only imports (Triton, a kernel hub) dropped, their names bound to
    `Unavailable`; GPU kernels (definitions decorated from those modules) dropped; named functions
    replaced by PyTorch math; globals the dropped main body would have set;
  - always: rank 0, world_size 1, and `dist` is torch.distributed on a one-process gloo group, whose
    async collectives' work objects all get `get_future()` (gloo's reduce-scatter has none): with
    one rank, reduce-scatter and all-gather are copies and ReduceOp.AVG is the identity, so a
    record's update math is unchanged.
"""

import ast
import contextlib
import functools
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import sdpa_kernel

SEPARATOR = re.compile(r"^={20,}\s*$", re.MULTILINE)  # a record log: the source, then a line of '='
CUSTOM_OP = "custom operator dropped (the FP8 head)"
NS_CAST = "Newton-Schulz input .bfloat16() -> .to(NS_DTYPE)"


def read_source(path: str | Path) -> str:
    """The training script: a .py file's text, or a record log's text before its first '=' line."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: --reference {path}: no such file; expected a record log or its .py source")
    text = path.read_text()
    cut = SEPARATOR.search(text)
    return text[: cut.start()] if cut else text


@dataclass(frozen=True)
class StandIns:
    """What an adapter substitutes beyond the common rewrites (module docstring).

    ns_function: the Newton–Schulz function whose bf16 input cast becomes NS_DTYPE.
    compiled: methods ("Class.method") whose torch.compile is kept (their arithmetic is the
        compiled one: inductor computes a bf16 pointwise chain in float32 and rounds at each store).
    gpu_modules: module roots ("triton") whose imports are dropped; the names they bound are
        `Unavailable`, and a top-level definition decorated from them (a GPU kernel) is dropped.
    replaced: top-level function name -> (our stand-in, what it is): the script's definition is
        dropped and ours takes its name.
    injected: global name -> (value, what it is or None): set after the definitions; counted unless
        None (the globals the dropped main body would have set).
    """

    ns_function: str
    compiled: frozenset[str] = frozenset()
    gpu_modules: tuple[str, ...] = ()
    replaced: dict[str, tuple[Callable, str]] = field(default_factory=dict)
    injected: dict[str, tuple[object, str | None]] = field(default_factory=dict)


class Unavailable:
    """The value of a dropped GPU-only import: any use of it is a one-line error naming it."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str):
        raise RuntimeError(f"tools.parity: {self.name}.{attr} is GPU-only and has no CPU stand-in")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"tools.parity: {self.name}() is GPU-only and has no CPU stand-in")


# ---- the source, cut to its definitions and moved to the CPU ----------------------------------------


class CpuRewrite(ast.NodeTransformer):
    """The in-definition substitutions (module docstring); `made` counts each one."""

    def __init__(self, ns_function: str, compiled: frozenset[str] = frozenset()):
        self.ns_function = ns_function
        self.compiled = compiled
        self.inside_ns = False
        self.scope: list[str] = []  # the enclosing class and function names
        self.made: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.made[what] = self.made.get(what, 0) + 1

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        self.scope.append(node.name)
        node = self.generic_visit(node)
        self.scope.pop()
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        name = ".".join([*self.scope, node.name])
        if name in self.compiled and any(is_torch_compile(d) for d in node.decorator_list):
            self.count(f"torch.compile kept on {name} (inductor, CPU)")
        else:
            kept = [d for d in node.decorator_list if not is_torch_compile(d)]
            if len(kept) < len(node.decorator_list):
                self.count("torch.compile removed")
            node.decorator_list = kept
        outer, self.inside_ns = self.inside_ns, self.inside_ns or node.name == self.ns_function
        self.scope.append(node.name)
        node = self.generic_visit(node)
        self.scope.pop()
        self.inside_ns = outer
        return node

    def visit_keyword(self, node: ast.keyword) -> ast.keyword:
        value = node.value
        if node.arg == "device" and isinstance(value, ast.Constant) and value.value == "cuda":
            node.value = ast.Constant("cpu")
            self.count('device="cuda" -> "cpu"')
        elif node.arg == "pin_memory" and isinstance(value, ast.Constant) and value.value is True:
            node.value = ast.Constant(False)
            self.count("pin_memory=True -> False")
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        node = self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "cuda":
            self.count(".cuda() -> .cpu()")
            return ast.Call(ast.Attribute(func.value, "cpu", ast.Load()), [], [])
        if self.inside_ns and is_bf16_cast(node):
            self.count(NS_CAST)
            return ns_cast(node)
        if isinstance(func, ast.Name) and func.id == self.ns_function and node.args \
                and is_bf16_cast(node.args[0]):
            node.args[0] = ns_cast(node.args[0])
            self.count(NS_CAST)
        return node


def is_bf16_cast(node: ast.AST) -> bool:
    """`X.bfloat16()`."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
        and node.func.attr == "bfloat16" and not node.args and not node.keywords


def ns_cast(cast: ast.Call) -> ast.Call:
    """`X.bfloat16()` -> `X.to(NS_DTYPE)`."""
    return ast.Call(ast.Attribute(cast.func.value, "to", ast.Load()), [ast.Name("NS_DTYPE", ast.Load())], [])


def dotted(node: ast.AST) -> str:
    """`torch.library.custom_op` for that attribute chain (calls unwrapped), '' for anything else."""
    if isinstance(node, ast.Call):
        return dotted(node.func)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return node.id if isinstance(node, ast.Name) else ""


def is_torch_compile(decorator: ast.AST) -> bool:
    return dotted(decorator) == "torch.compile"


class Definitions:
    """The top-level statements kept (module docstring), counting what is dropped in `made`."""

    def __init__(self, stand_ins: StandIns):
        self.stand_ins = stand_ins
        self.made: dict[str, int] = {}
        self.unavailable: set[str] = set()  # names bound by dropped GPU-only imports

    def count(self, what: str) -> None:
        self.made[what] = self.made.get(what, 0) + 1

    def keep(self, tree: ast.Module) -> list[ast.stmt]:
        classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
        custom, kept = set(), []
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                if self.keep_import(node):
                    kept.append(node)
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                if self.keep_definition(node, custom):
                    kept.append(node)
            elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets) \
                    and is_definition_value(node.value, classes):
                kept.append(node)
        return kept

    def keep_import(self, node: ast.Import | ast.ImportFrom) -> bool:
        modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        gpu = [m for m in modules if m.split(".")[0] in self.stand_ins.gpu_modules]
        if not gpu:
            return True
        for alias in node.names:
            self.unavailable.add(alias.asname or alias.name.split(".")[0])
        self.count(f"import {gpu[0]} dropped (GPU-only)")
        return False

    def keep_definition(self, node: ast.FunctionDef | ast.ClassDef, custom: set[str]) -> bool:
        roots = [dotted(d) for d in node.decorator_list]
        if any(r.startswith("torch.library.") or r.split(".")[0] in custom for r in roots):
            custom.add(node.name)
            self.count(CUSTOM_OP)
            return False
        if any(r.split(".")[0] in self.unavailable for r in roots):
            self.count("GPU kernel dropped")
            return False
        if node.name in self.stand_ins.replaced:
            self.count(f"{node.name} -> {self.stand_ins.replaced[node.name][1]}")
            return False
        return True


def is_definition_value(value: ast.expr, classes: set[str]) -> bool:
    """A constant expression, or an instance of a class the script defines built with no arguments."""
    if isinstance(value, ast.Call):
        return isinstance(value.func, ast.Name) and value.func.id in classes and not value.args \
            and not value.keywords
    return is_constant(value)


def is_constant(node: ast.expr) -> bool:
    """Literals and arithmetic on them (`48 * 1024`), in tuples, lists or sets."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp):
        return is_constant(node.operand)
    if isinstance(node, ast.BinOp):
        return is_constant(node.left) and is_constant(node.right)
    return isinstance(node, ast.Tuple | ast.List | ast.Set) and all(is_constant(e) for e in node.elts)


def top_level_names(source: str, filename: str = "<reference>") -> set[str]:
    """The names the script's top-level definitions and assignments bind (it is not run)."""
    names = set()
    for node in ast.parse(source, filename).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@dataclass
class Loaded:
    namespace: dict
    substitutions: dict[str, int]
    uses_ns_dtype: bool  # the Newton-Schulz precision switch reaches the code (rewritten, or its own)


def load_definitions(source: str, stand_ins: StandIns, filename: str = "<reference>") -> Loaded:
    """Execute the script's definitions only, moved to the CPU (module docstring); returns its namespace."""
    tree = ast.parse(source, filename)
    kept = Definitions(stand_ins)
    tree.body = kept.keep(tree)
    rewrite = CpuRewrite(stand_ins.ns_function, stand_ins.compiled)
    tree = ast.fix_missing_locations(rewrite.visit(tree))
    made = {**kept.made, **rewrite.made}
    namespace = importable_namespace()
    namespace.update(rank=0, world_size=1, NS_DTYPE=torch.bfloat16)
    namespace.update({name: Unavailable(name) for name in kept.unavailable})
    exec(compile(tree, filename, "exec"), namespace)  # definitions only: no statement with effects is left
    namespace["dist"] = CollectivesWithFutures()
    namespace.update({name: function for name, (function, _) in stand_ins.replaced.items()})
    for name, (value, what) in stand_ins.injected.items():
        namespace[name] = value
        if what is not None:
            made[what] = made.get(what, 0) + 1
    uses = any(isinstance(node, ast.Name) and node.id == "NS_DTYPE" for node in ast.walk(tree))
    return Loaded(namespace, made, uses)


def importable_namespace() -> dict:
    """A fresh module's globals, registered in sys.modules as `reference_<n>`: torch.compile (a kept
    decorator) imports the module of the globals it reads by name."""
    name = f"reference_{sum(m.startswith('reference_') for m in sys.modules)}"
    module = sys.modules[name] = types.ModuleType(name)
    return module.__dict__


# ---- the collectives on one rank ------------------------------------------------------------------


class CompletedWork:
    """A collective's work object whose get_future() works on gloo: waits, then a completed future."""

    def __init__(self, work):
        self.work = work

    def wait(self):
        return self.work.wait()

    def get_future(self) -> torch.futures.Future:
        self.work.wait()
        future = torch.futures.Future()
        future.set_result(None)
        return future


class CollectivesWithFutures:
    """torch.distributed, but every work object an async collective returns has get_future()."""

    def __getattr__(self, name: str):
        attr = getattr(dist, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        @torch._dynamo.disable  # opaque to a kept torch.compile: a graph break, as an async collective
        @functools.wraps(attr)
        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            return CompletedWork(out) if isinstance(out, dist.Work) else out

        return call


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """A gloo process group of one rank, for the reference's collectives (kept if one already exists)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def record_session(threads: int) -> Iterator[None]:
    """Where a record's code runs: `threads` CPU threads (0: torch's choice), one_process_group, and
    the records' deprecated-but-working reduce_scatter_tensor / all_gather_into_tensor not warned of."""
    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings(), one_process_group():
        warnings.filterwarnings("ignore", r"`torch\.distributed\..*` is deprecated", FutureWarning)
        yield


def sdpa_choice(backends: list | None):
    """SDPA restricted to `backends` (a noise floor's other kernel), or its default choice for None."""
    return sdpa_kernel(backends) if backends else contextlib.nullcontext()
