"""The reference side of tools.parity: a speedrun record's training script, loaded on CPU without
running it, and one adapter per record format that builds its model and optimizers as its main body does.

Loading (`load_reference`) never executes the script's training loop. The source (a record log holds
it before the first line of '=' characters) is parsed with `ast`; of its top-level statements only
imports, function and class definitions, assignments of constant expressions and `name = LocalClass()` (the
Hyperparameters instance) are kept, so nothing touches a GPU, a file or a process group at load.
Then the CPU substitutions, each counted and reported:

  - torch.compile decorators are removed (eager);
  - definitions decorated by torch.library (custom operators: the record's FP8 head matmul) and
    definitions decorated through one of them are dropped; the adapter switches the FP8 flag off,
    so the head runs the script's own bf16 path, F.linear(x, W.type_as(x));
  - `device="cuda"` becomes "cpu", `pin_memory=True` becomes False, `.cuda(...)` becomes `.cpu()`;
  - the cast before the adapter's Newton–Schulz call, `NS(X.bfloat16(), ...)`, becomes
    `NS(X.to(NS_DTYPE), ...)`: bf16 as recorded, float32 for the one-optimizer-step check;
  - the globals the dropped main body would have set: rank 0, world_size 1;
  - `dist` is torch.distributed on a one-process gloo group, whose async collectives' work objects
    all get `get_future()` (gloo's reduce-scatter has none): with one rank, reduce-scatter and
    all-gather are copies and ReduceOp.AVG is the identity, so the record's update math is unchanged;
  - `flex_attention` is SDPA with the BlockMask expanded to a dense (T, T) mask (`dense_block_mask`):
    FlexAttention has no backward on CPU, and eager FlexAttention ignores the block mask's
    sparsity, which is where the record's sliding window lives.

The per-rank batch split needs no reproduction: with one rank the record's step is its rank-0 step on
one sequence, its gradient that sequence's summed-loss gradient (AVG over one rank), as on each of
its 8 ranks before averaging.

An adapter (`Record20250712`) knows one format: the names its script defines (to recognise it), how
its main body builds the model and optimizers and sets the schedule (written from the record's
lines, cited), and the name table from its parameters to ours. A new record format is a new adapter.
"""

import ast
import contextlib
import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

SEPARATOR = re.compile(r"^={20,}\s*$", re.MULTILINE)  # a record log: the source, then a line of '='


def read_source(path: str | Path) -> str:
    """The training script: a .py file's text, or a record log's text before its first '=' line."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: --reference {path}: no such file; expected a record log or its .py source")
    text = path.read_text()
    cut = SEPARATOR.search(text)
    return text[: cut.start()] if cut else text


# ---- the source, cut to its definitions and moved to the CPU ----------------------------------------


class CpuRewrite(ast.NodeTransformer):
    """The in-definition substitutions (module docstring); `made` counts each one."""

    def __init__(self, ns_function: str):
        self.ns_function = ns_function
        self.made: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.made[what] = self.made.get(what, 0) + 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        kept = [d for d in node.decorator_list if not is_torch_compile(d)]
        if len(kept) < len(node.decorator_list):
            self.count("torch.compile removed")
        node.decorator_list = kept
        return self.generic_visit(node)

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
        if isinstance(func, ast.Name) and func.id == self.ns_function and node.args:
            first = node.args[0]
            if isinstance(first, ast.Call) and isinstance(first.func, ast.Attribute) \
                    and first.func.attr == "bfloat16" and not first.args:
                node.args[0] = ast.Call(ast.Attribute(first.func.value, "to", ast.Load()),
                                        [ast.Name("NS_DTYPE", ast.Load())], [])
                self.count("Newton-Schulz input .bfloat16() -> .to(NS_DTYPE)")
        return node


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


CUSTOM_OP = "custom operator dropped (the FP8 head)"


def definitions(tree: ast.Module, dropped: dict[str, int]) -> list[ast.stmt]:
    """The top-level statements kept (module docstring); `dropped` counts the custom operators dropped."""
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    custom, kept = set(), []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            kept.append(node)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            roots = [dotted(d) for d in node.decorator_list]
            if any(r.startswith("torch.library.") or r.split(".")[0] in custom for r in roots):
                custom.add(node.name)
                dropped[CUSTOM_OP] = dropped.get(CUSTOM_OP, 0) + 1
            else:
                kept.append(node)
        elif isinstance(node, ast.Assign) and is_definition_value(node.value, classes):
            kept.append(node)
    return kept


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


@dataclass
class Loaded:
    namespace: dict
    substitutions: dict[str, int]
    uses_ns_dtype: bool  # the Newton-Schulz precision switch reaches the code (rewritten, or its own)


def load_definitions(source: str, ns_function: str, filename: str = "<reference>") -> Loaded:
    """Execute the script's definitions only, moved to the CPU (module docstring); returns its namespace."""
    tree = ast.parse(source, filename)
    made: dict[str, int] = {}
    tree.body = definitions(tree, made)
    rewrite = CpuRewrite(ns_function)
    tree = ast.fix_missing_locations(rewrite.visit(tree))
    made.update(rewrite.made)
    namespace = {"__name__": "reference", "rank": 0, "world_size": 1, "NS_DTYPE": torch.bfloat16}
    exec(compile(tree, filename, "exec"), namespace)  # definitions only: no statement with effects is left
    namespace["dist"] = CollectivesWithFutures()
    namespace["flex_attention"] = sdpa_with_block_mask
    uses = any(isinstance(node, ast.Name) and node.id == "NS_DTYPE" for node in ast.walk(tree))
    return Loaded(namespace, made, uses)


# ---- the collectives and attention the CPU runs instead ---------------------------------------------


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


def listed_blocks(num: Tensor, indices: Tensor, kv_blocks: int) -> Tensor:
    """(B, H, Q) counts and (B, H, Q, K) indices -> (B, H, Q, kv_blocks) bool: row q's first num[q]
    indices set. A count of zero or below lists no block (the record clamps counts to -1 at window 1)."""
    rank = torch.arange(indices.size(-1), device=indices.device)
    listed = (rank < num[..., None]).to(torch.int32)
    table = torch.zeros(*indices.shape[:-1], kv_blocks, dtype=torch.int32, device=indices.device)
    return table.scatter_add_(-1, indices.long(), listed) > 0


def dense_block_mask(block_mask, q_len: int, kv_len: int) -> Tensor:
    """A FlexAttention BlockMask as the dense (B, H, q_len, kv_len) bool mask it stands for.

    Key j is allowed for query i iff j's block is one of i's full blocks, or one of its partial
    blocks and mask_mod(b, h, i, j) holds.
    """
    q_block, kv_block = block_mask.BLOCK_SIZE
    kv_blocks = math.ceil(kv_len / kv_block)
    full = torch.zeros(1, dtype=torch.bool)
    if block_mask.full_kv_num_blocks is not None:
        full = listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, kv_blocks)
    partial = listed_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, kv_blocks)

    def tokens(blocks: Tensor) -> Tensor:
        return blocks.repeat_interleave(q_block, -2).repeat_interleave(kv_block, -1)[..., :q_len, :kv_len]

    q_idx = torch.arange(q_len)[:, None]
    kv_idx = torch.arange(kv_len)[None, :]
    rule = block_mask.mask_mod(torch.tensor(0), torch.tensor(0), q_idx, kv_idx)
    return tokens(full) | (tokens(partial) & rule)


def sdpa_with_block_mask(q: Tensor, k: Tensor, v: Tensor, block_mask=None, scale: float | None = None,
                         **unused) -> Tensor:
    """flex_attention(q, k, v, block_mask=..., scale=...) on CPU: SDPA under the block mask made dense."""
    if unused:
        raise NotImplementedError(f"tools.parity: flex_attention options {sorted(unused)} have no CPU "
                                  f"stand-in")
    mask = dense_block_mask(block_mask, q.size(-2), k.size(-2))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---- the name table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """Reference parameter `reference` (its elements `part`, a slice of dim 0, or all) is our `ours`;
    `ours` None: the reference's forward never reads those elements (checked: zero gradient)."""

    reference: str
    part: slice | None
    ours: str | None
    kind: str  # hidden, embed, value_embed, head, scalar: how the differences are reported


class NameTableError(SystemExit):
    """A parameter the name table does not cover, or covers with the wrong shape: a one-line exit."""


def resolve_table(rules: list[tuple[str, str, str]], extra: list[Entry], reference: nn.Module,
                  ours: nn.Module) -> list[Entry]:
    """The entries for every reference parameter: `extra` (slices), then one rule match per name.

    A rule is (reference pattern, our pattern, kind), `{i}` matching a block or table index.
    Fails (NameTableError, naming the parameter) on a reference parameter no rule or entry covers,
    on an element covered twice, on our parameter left uncovered or named twice, and on a shape
    mismatch.
    """
    ref_params, our_params = dict(reference.named_parameters()), dict(ours.named_parameters())
    entries = list(extra)
    sliced = {e.reference for e in extra}
    for name in ref_params:
        if name not in sliced:
            entries.append(rule_entry(name, rules, ref_params[name]))
    check_table(entries, ref_params, our_params)
    return entries


def rule_entry(name: str, rules: list[tuple[str, str, str]], param: Tensor) -> Entry:
    """The entry of the first rule whose pattern matches `name` ({i}: an index), else NameTableError."""
    for pattern, target, kind in rules:
        found = re.fullmatch(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)"), name)
        if found:
            ours = target.replace("{i}", found.group(1)) if found.groups() else target
            return Entry(name, None, ours, kind)
    raise NameTableError(f"error: tools.parity: reference parameter {name} {tuple(param.shape)} is not in "
                         f"the name table")


def check_table(entries: list[Entry], ref_params: dict, our_params: dict) -> None:
    """Every reference element covered once, every our parameter once, shapes equal (else NameTableError)."""
    covered = {name: torch.zeros(p.shape[:1] if p.ndim else (), dtype=torch.int64)
               for name, p in ref_params.items()}
    used: dict[str, str] = {}
    for e in entries:
        if e.reference not in ref_params:
            raise NameTableError(f"error: tools.parity: the name table names reference parameter "
                                 f"{e.reference}, which the reference does not have")
        view = ref_params[e.reference] if e.part is None else ref_params[e.reference][e.part]
        counts = covered[e.reference] if e.part is None else covered[e.reference][e.part]
        counts += 1
        if e.ours is None:
            continue
        if e.ours not in our_params:
            raise NameTableError(f"error: tools.parity: the name table maps {describe(e)} to {e.ours}, "
                                 f"which our model does not have")
        if e.ours in used:
            raise NameTableError(f"error: tools.parity: our parameter {e.ours} is mapped twice "
                                 f"({used[e.ours]} and {describe(e)})")
        used[e.ours] = describe(e)
        if view.shape != our_params[e.ours].shape:
            raise NameTableError(f"error: tools.parity: reference {describe(e)} {tuple(view.shape)} and our "
                                 f"{e.ours} {tuple(our_params[e.ours].shape)} differ in shape")
    for name, counts in covered.items():
        if (counts != 1).any():
            how = "not" if (counts == 0).any() else "doubly"
            raise NameTableError(f"error: tools.parity: reference parameter {name} "
                                 f"{tuple(ref_params[name].shape)} is {how} covered by the name table")
    missing = sorted(set(our_params) - set(used))
    if missing:
        raise NameTableError(f"error: tools.parity: our parameter {missing[0]} "
                             f"{tuple(our_params[missing[0]].shape)} has no reference counterpart in the "
                             f"name table")


def describe(e: Entry) -> str:
    return e.reference if e.part is None else f"{e.reference}[{e.part.start}:{e.part.stop}]"


# ---- record formats ----------------------------------------------------------------------------------


class Reference:
    """What tools.parity needs of a reference, whatever its format (one subclass per format).

    model: its nn.Module; optimizers: its optimizers. Methods: table(ours) its name table to our
    model (list[Entry]); schedule(step) sets lr and momentum as its main body does; window(step) the
    attention window its forward takes; loss(inputs, targets, window) its training loss, summed over
    the (1, T) batch's tokens; step() steps its optimizers and clears the gradients;
    set_ns_dtype(dtype) the precision of its Newton–Schulz.
    """

    defines: frozenset[str] = frozenset()
    ns_function: str = ""

    @classmethod
    def recognises(cls, namespace: dict) -> bool:
        return cls.defines <= namespace.keys()


class Record20250712(Reference):
    """The 2025-07-12 "BosAlign" record (records/track_1_short/2025-07-12_BosAlign/ in modded-nanogpt);
    line numbers are those of its log's source (lines 1-783)."""

    name = "2025-07-12"
    defines = frozenset({"GPT", "Muon", "DistAdam", "Hyperparameters", "get_lr", "get_window_size_blocks",
                         "next_multiple_of_n"})
    ns_function = "zeropower_via_newtonschulz5"  # called on grad.bfloat16() in Muon.step (line 197)
    # Record name -> ours, kind. scalars (lines 425-431) is sliced in `scalar_entries`.
    rules = [
        ("embed.weight", "embed.weight", "embed"),
        ("value_embeds.{i}.weight", "value_embeds.{i}.weight", "value_embed"),
        ("blocks.{i}.attn.qkv_w", "blocks.{i}.attn.qkv.weight", "hidden"),
        ("blocks.{i}.attn.c_proj.weight", "blocks.{i}.attn.o.weight", "hidden"),
        ("blocks.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.fc.weight", "hidden"),
        ("blocks.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.proj.weight", "hidden"),
        ("lm_head.weight", "lm_head.weight", "head"),
    ]

    def __init__(self, namespace: dict, dim: int, seq_len: int, n_layer: int = 12):
        ns = self.ns = namespace
        self.n_layer = n_layer
        # Model, lines 583-586, at width `dim`: heads of 128 (its CausalSelfAttention's head_dim), as
        # many as fill the width (6 at 768; value embeddings need heads x 128 = dim); tables in bf16.
        self.model = ns["GPT"](vocab_size=ns["next_multiple_of_n"](50257, n=128), num_layers=n_layer,
                               num_heads=dim // 128, model_dim=dim, max_seq_len=seq_len)
        for m in self.model.modules():
            if isinstance(m, nn.Embedding):
                m.bfloat16()
            if getattr(m, "use_fp8", False):
                m.use_fp8 = False  # the FP8 head (line 421) runs its bf16 path: F.linear(x, W.type_as(x))
        self.model.train()
        # Optimizers, lines 591-605.
        model = self.model
        hidden = [p for n, p in model.blocks.named_parameters() if p.ndim >= 2 and "embed" not in n]
        embed = [p for n, p in model.named_parameters() if "embed" in n]
        scalar = [p for p in model.parameters() if p.ndim < 2]
        head = [model.lm_head.weight]
        self.adam = ns["DistAdam"](scalar + head + embed, lr=0.008, betas=(0.8, 0.95), eps=1e-10,
                                   weight_decay=0.0, rank=0, world_size=1)
        self.muon = ns["Muon"](hidden, lr=0.05, momentum=0.95, rank=0, world_size=1, weight_decay=0.0)
        self.optimizers = [self.adam, self.muon]
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]

    def table(self, ours: nn.Module) -> list[Entry]:
        return resolve_table(self.rules, self.scalar_entries(), self.model, ours)

    def scalar_entries(self) -> list[Entry]:
        """scalars (lines 425-431): [0, L) skip weights, of which the forward reads [0, L/2) (line 477);
        [L, 3L) block lambdas, a pair per block; [3L, 5L) attention value lambdas, a pair per block,
        unread for attention-free blocks; then padding to a multiple of world_size (none at 1)."""
        L, half = self.n_layer, self.n_layer // 2
        entries = [Entry("scalars", slice(0, half), "skip_weights", "scalar"),
                   Entry("scalars", slice(half, L), None, "scalar")]
        for i, block in enumerate(self.model.blocks):
            entries.append(Entry("scalars", slice(L + 2 * i, L + 2 * i + 2), f"blocks.{i}.lambdas", "scalar"))
            ours = f"blocks.{i}.attn.value_lambdas" if block.attn is not None else None
            entries.append(Entry("scalars", slice(3 * L + 2 * i, 3 * L + 2 * i + 2), ours, "scalar"))
        total = self.model.scalars.numel()
        if total > 5 * L:
            entries.append(Entry("scalars", slice(5 * L, total), None, "scalar"))
        return entries

    def schedule(self, step: int) -> None:
        """Lines 743-748: every group's lr = initial_lr * get_lr(step); Muon momentum 0.85 -> 0.95 over
        300 steps."""
        factor = self.ns["get_lr"](step)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        frac = min(step / 300, 1)
        for group in self.muon.param_groups:
            group["momentum"] = (1 - frac) * 0.85 + frac * 0.95

    def window(self, step: int) -> Tensor:
        """Line 742: get_window_size_blocks(step), the long window in 128-token blocks."""
        return self.ns["get_window_size_blocks"](step)

    def loss(self, inputs: Tensor, targets: Tensor, window: Tensor) -> Tensor:
        """Line 742: the summed cross-entropy over the sequence (inputs int32, targets int64, 1-D)."""
        return self.model(inputs[0].to(torch.int32), targets[0], window)

    def step(self) -> None:
        """Lines 750-753."""
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)

    def set_ns_dtype(self, dtype: torch.dtype) -> None:
        self.ns["NS_DTYPE"] = dtype


FORMATS: list[type[Reference]] = [Record20250712]


def load_reference(path: str | Path, dim: int, seq_len: int) -> tuple[Reference, dict[str, int]]:
    """The reference at `path` (a record log or a .py), loaded by the adapter that recognises it,
    with the substitutions made (what, how often)."""
    source = read_source(path)
    for adapter in FORMATS:
        loaded = load_definitions(source, adapter.ns_function, str(path))
        if adapter.recognises(loaded.namespace):
            check_substitutions(loaded, path)
            return adapter(loaded.namespace, dim, seq_len), loaded.substitutions
    known = ", ".join(a.name for a in FORMATS)
    raise SystemExit(f"error: --reference {path}: not a record format tools.parity knows ({known}): "
                     f"it does not define {sorted(FORMATS[0].defines)}")


def check_substitutions(loaded: Loaded, path) -> None:
    """The Newton–Schulz precision switch must reach the reference's Muon (rewritten, or its own)."""
    if not loaded.uses_ns_dtype:
        raise SystemExit(f"error: --reference {path}: found no `.bfloat16()` cast before its Newton-Schulz "
                         f"call, so the one-step check cannot run it in float32")

