"""Distribution is explicit in optim (issue 22.5): one interface that one process, DataParallel and
FullyShardedParallel implement, which Muon calls without asking which it has; state checks that read
only their arguments; and a public API that is all code outside optim/ imports from it."""

import ast
import contextlib
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import optim
from optim import (
    Distribution,
    Muon,
    OneProcess,
    exchange_elements,
    local_shape,
    muon_state_layout,
    state_shapes,
    step_collectives,
)
from optim.distributed import DataParallel
from optim.fsdp import FullyShardedParallel, OwnerExchange
from optim.state import check_muon_state_dict

ROOT = Path(__file__).resolve().parent.parent
SUBMODULES = {path.stem for path in (ROOT / "optim").glob("*.py")} - {"__init__"}


def optim_submodule_imports(source: str) -> list[str]:
    """`optim.X` for every import of an optim submodule X in source: import optim.X,
    from optim.X import …, from optim import X."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("optim.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("optim."):
                found.append(node.module)
            elif node.module == "optim":
                found += [f"optim.{a.name}" for a in node.names if a.name in SUBMODULES]
    return found


def outside_optim() -> list[Path]:
    """The repo's Python files outside optim/ and tests/ (tests may reach into optim's modules)."""
    skip = {"optim", "tests"}
    parts = {path: path.relative_to(ROOT).parts for path in ROOT.rglob("*.py")}
    return [path for path, where in parts.items()
            if not (set(where[:-1]) & skip or any(part.startswith(".") or part == "dist" for part in where))]


def test_no_module_outside_optim_imports_an_optim_submodule():
    files = outside_optim()
    assert any(path.name == "memory.py" for path in files)  # bench/ is searched
    offenders = {str(path.relative_to(ROOT)): optim_submodule_imports(path.read_text()) for path in files}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_import_check_sees_each_form_of_submodule_import():
    source = ("import optim.kinds\nfrom optim.zero import ALIGNMENT\nfrom optim import fsdp, Muon\n"
              "import optim\n")
    assert optim_submodule_imports(source) == ["optim.kinds", "optim.zero", "optim.fsdp"]


def test_every_public_name_has_a_line_in_the_package_docstring():
    words = set(optim.__doc__.replace(",", " ").split())
    assert [name for name in optim.__all__ if name not in words] == []
    assert [name for name in SUBMODULES if name not in words] == []  # each module's job is listed


@pytest.mark.parametrize("implementation", [OneProcess, DataParallel, FullyShardedParallel])
def test_each_distribution_implements_the_interface(implementation):
    for name, declared in vars(Distribution).items():
        if inspect.isfunction(declared) and not name.startswith("_"):
            assert list(inspect.signature(getattr(implementation, name)).parameters) == list(
                inspect.signature(declared).parameters), name
    for name in Distribution.__annotations__:
        assert isinstance(getattr(implementation, name), bool), name


def test_muon_never_asks_which_distribution_it_has():
    """No comparison or isinstance involving self._distribution in optim/muon.py: every rank-dependent
    call goes through the Distribution interface."""
    tree = ast.parse((ROOT / "optim" / "muon.py").read_text())
    asked = [ast.unparse(node) for node in ast.walk(tree)
             if isinstance(node, (ast.Compare, ast.Call, ast.BoolOp, ast.UnaryOp, ast.IfExp, ast.If))
             and _asks_about_distribution(node)]
    assert asked == []


def _asks_about_distribution(node: ast.AST) -> bool:
    def bare(n: ast.AST) -> bool:  # self._distribution itself, not one of its attributes
        return isinstance(n, ast.Attribute) and n.attr == "_distribution"

    if isinstance(node, ast.Compare):
        return any(bare(n) for n in (node.left, *node.comparators))
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "type") and any(
            bare(a) for a in node.args)
    if isinstance(node, ast.BoolOp):
        return any(bare(v) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        return bare(node.operand)
    return bare(node.test)


def test_one_process_muon_steps_through_one_process():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = Muon([w])
    assert isinstance(opt._distribution, OneProcess)
    assert opt.state_dict()["distribution"] == {"rank": 0, "world_size": 1}


def saved_state(opt: Muon, p: torch.Tensor) -> dict:
    p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def test_the_state_check_reads_the_layout_it_is_given():
    """check_muon_state_dict takes groups, hyper-parameter names, stamp and state shapes as arguments:
    a state shape of None (another rank's parameter), another shape or another stamp is refused."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Muon([p])
    state = saved_state(opt, p)
    stamp = {"rank": 0, "world_size": 1}
    check_muon_state_dict(state, opt.param_groups, opt.defaults, stamp, lambda q: tuple(q.shape))
    with pytest.raises(ValueError, match="which this rank does not own"):
        check_muon_state_dict(state, opt.param_groups, opt.defaults, stamp, lambda q: None)
    with pytest.raises(ValueError, match=r"momentum_buffer.*\(2, 3\)"):
        check_muon_state_dict(state, opt.param_groups, opt.defaults, stamp, lambda q: (2, 3))
    with pytest.raises(ValueError, match="rank 0 of 1, but this optimizer is rank 1 of 2"):
        check_muon_state_dict(state, opt.param_groups, opt.defaults, {"rank": 1, "world_size": 2},
                              lambda q: tuple(q.shape))
    with pytest.raises(ValueError, match=r"lacks \['extra'\]"):
        check_muon_state_dict(state, opt.param_groups, [*opt.defaults, "extra"], stamp,
                              lambda q: tuple(q.shape))


GROUPS = {"hidden": [(8, 4)] * 5 + [(4, 8)], "embed": [(13, 4)], "adam": [(4,), (7,), (3, 3)]}


def meta_groups() -> list[dict]:
    return [{"params": [torch.zeros(s, device="meta") for s in shapes], "kind": kind}
            for kind, shapes in GROUPS.items()]


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """A default process group whose collectives do nothing (torch's "fake" backend), this being `rank`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("rank", "world_size"), [(0, 3), (2, 3), (1, 4)])
def test_state_shapes_are_the_shapes_data_parallel_keeps(rank, world_size):
    """optim.state_shapes, without a process group, equals what a DataParallel Muon of that rank keeps
    (a fake world: its collectives do nothing, the shards are the real ones)."""
    groups = [{"params": [torch.zeros(s) for s in shapes], "kind": kind} for kind, shapes in GROUPS.items()]
    with fake_world(rank, world_size):
        opt = Muon(groups)
        kept = [[opt._distribution.state_shape(p) for p in group["params"]] for group in opt.param_groups]
        opt.close()
    assert state_shapes(meta_groups(), rank, world_size) == kept
    assert any(shape is None for shapes in kept for shape in shapes)  # some matrices are another rank's
    assert state_shapes(meta_groups(), 0, 1) == [[tuple(p.shape) for p in g["params"]] for g in meta_groups()]


@pytest.mark.parametrize("world_size", [2, 3])
def test_exchange_elements_are_the_owner_exchange_buffers(world_size):
    """optim.exchange_elements per stack equals the size of the (W, C, c, …) buffer OwnerExchange packs."""
    groups = [g for g in meta_groups() if g["kind"] == "hidden"]
    packed, dealt = [], 0
    for shape in dict.fromkeys(GROUPS["hidden"]):
        stack = [p for p in groups[0]["params"] if tuple(p.shape) == shape]
        exchange = OwnerExchange(stack, dealt, 0, world_size, group=None)
        updates = [torch.zeros(local_shape(shape, 0, world_size)) for _ in stack]
        packed.append(exchange._pack(updates).numel())
        dealt += len(stack)
    assert exchange_elements(groups, world_size) == packed
    assert packed[0] == world_size * math.ceil(5 / world_size) * math.ceil(8 / world_size) * 4


def test_the_public_state_layout_is_the_one_step_makes():
    p = torch.nn.Parameter(torch.randn(6, 2, dtype=torch.bfloat16))
    opt = Muon([{"params": [p], "kind": "adam"}])
    p.grad = torch.ones_like(p)
    opt.step()
    got = {k: (tuple(v.shape), v.dtype) for k, v in opt.state[p].items()}
    assert got == muon_state_layout(p, "adam", (6, 2))
    assert step_collectives(meta_groups(), 1) == []
