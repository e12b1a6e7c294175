"""The structure of the 124M speedrun step beside the 2025-07-12 record's, counted on a CPU.

What the GPUs are asked to do, not how long it takes: nothing is timed.

    python -m bench.structure

Ours is measured from this repo's own code; the record's figures are constants below, counted by
reading its source (the code at the top of each of its logs, modded-nanogpt's
records/track_1_short/2025-07-12_BosAlign/*.txt, not in this repo), each with how it was counted.
The step described is the H100's: 8 GPUs (W = 8), each one BOS-aligned sequence of T = 49,152
tokens a step, bf16 tables and residual stream, FlexAttention, and the LM head's matmul as the
model picks it on an H100: LMHead.matmul asked about a CUDA device of compute capability 9.0 (FP8,
model/fp8.py, whose custom ops the census opens).

  GEMMs, weight casts  one forward and backward of the real 124M model on the meta device (shapes and
                 dtypes, no memory, no arithmetic), every aten matmul (mm, addmm, bmm, baddbmm,
                 _scaled_mm) and every dtype conversion of a weight counted by a TorchDispatchMode
                 (Census), by block. A forward op belongs to the block whose forward runs it; a
                 backward op to the block whose forward made the autograd node running it. A weight
                 cast: a conversion of a parameter or of something made from one alone (a view, a
                 division by a constant), and in backward the conversion of such a cast's gradient.
                 Attention (one fused kernel on the GPU) is left out: its tiles are the next row.
  attention tiles  the 128 x 128 tiles FlexAttention computes over the 1,750 training steps
                 (forward; backward visits the same ones), and the partial ones among them, which
                 run the elementwise mask_mod, read from the BlockMask the model builds
                 (model/attention.py build_mask) for each layer at each step's window, on one
                 sequence of documents with geometric lengths, mean 670 tokens (about FineWeb's: a
                 billion-token sample holds ~1.49M documents); the same sequence for the record.
  collectives    each collective of one optimizer step at W = 8: what one rank receives from a
                 reduce-scatter and sends into an all-gather, bytes, and whether that is a multiple
                 of 16 (NCCL's protocols slow down on chunks that are not).
  allocations    tensors one optimizer step allocates (optim.allocations: new storages made by aten
                 operators, seen at the dispatcher), rank 0 of 8, after the first step (which makes
                 the state and the buffers): the speedrun's optimizer on the meta model in a process
                 group of torch's "fake" backend (collectives do nothing), with what CUDA compiles
                 (Newton–Schulz, Adam's update) opaque, as inductor's code is to the dispatcher.
  graphs         graphs the compiled model (training.compiling.compile_model, counted by mode) builds
                 over the whole schedule: a training forward and backward and training.run.validation_loss at
                 the first step of each of the 14 windows, each window the 0-dim tensor the loop
                 passes (training.schedule.Schedule), the 124M architecture at width 32 and
                 64-token sequences (a graph's count does not depend on the sizes).
"""

import argparse
import contextlib
import dataclasses
from collections import Counter, defaultdict
from unittest import mock

import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import BlockMask
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

import model.gpt
from bench.gpu_check import synthetic_tokens
from bench.memory import meta_gpt, speedrun_groups
from model import GPT, PRESETS
from model.attention import build_mask, document_ids, short_window
from model.gpt import LMHead
from optim import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, count_allocations, step_collectives
from training.compiling import compile_model
from training.recipe import build_optimizer, parse_config, schedule_of, unused_parameters
from training.run import validation_loss

T = 48 * 1024  # tokens per GPU per step
WORLD_SIZE = 8
MEAN_DOCUMENT, LAYOUT_SEED = 670, 0  # the document-length model of the attention rows
ALIGNMENT = 16  # bytes (optim.zero.ALIGNMENT is ours; the record's sizes are checked against it too)
aten = torch.ops.aten
GEMMS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten._scaled_mm.default)
CASTS = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other)

# ---------------------------------------------------------------------------------------------------
# The record's figures. Shapes are (M, N, K) of an (M, K) x (K, N) product as aten runs it: F.linear of
# a (1, T, d_in) input is one mm (T, d_out, d_in); its backward one mm for the input's gradient
# (T, d_in, d_out) and one for the weight's, (d_out, d_in, T) (aten's mm_mat2_backward for a
# transposed weight).
BF16, E4M3, E5M2 = "bf16", "e4m3", "e5m2"


def _linear(d_out: int, d_in: int) -> dict:
    return dict(forward=[(T, d_out, d_in, BF16)], backward=[(T, d_in, d_out, BF16), (d_out, d_in, T, BF16)])


def _join(*linears: dict) -> dict:
    return {phase: [g for lin in linears for g in lin[phase]] for phase in ("forward", "backward")}


RECORD_GEMMS = {
    # CausalSelfAttention.forward: one F.linear with qkv_w (3, 768, 768) flattened to (2304, 768);
    # c_proj, then MLP.forward's c_fc and c_proj: CastedLinear.forward, whose use_fp8 is False there.
    "attention block": _join(_linear(2304, 768), _linear(768, 768), _linear(3072, 768), _linear(768, 3072)),
    # Block.__init__: no attention at layer_idx 7, the MLP only.
    "attention-free block": _join(_linear(3072, 768), _linear(768, 3072)),
    # GPT.__init__ builds lm_head with use_fp8=True: in training CastedLinear.forward calls
    # nanogpt::mm, whose impl is one _scaled_mm of e4m3 operands; nanogpt::mm_backward two: the
    # input's gradient (e5m2 gradient x e4m3 weight) and the weight's (e4m3 input x e5m2 gradient).
    "head": dict(forward=[(T, 50304, 768, E4M3)],
                 backward=[(T, 768, 50304, f"{E5M2}x{E4M3}"), (768, 50304, T, f"{E4M3}x{E5M2}")]),
}
RECORD_WEIGHT_CASTS = {
    # Each F.linear's weight is cast by type_as (qkv_w.flatten(end_dim=1).type_as(x) and
    # CastedLinear.forward's self.weight.type_as(x)): float32 -> bf16; autograd casts each one's
    # gradient back to float32 in backward.
    "attention block": dict(forward=4, backward=4),
    "attention-free block": dict(forward=2, backward=2),
    # mm_op's impl: w.div(w_s).to(float8_e4m3fn); mm_backward_op's impl makes the weight's gradient
    # in float32 directly (out_dtype), and w_f8.T.contiguous() changes the layout, not the dtype.
    "head": dict(forward=1, backward=0),
}
RECORD_ATTENTION_TILES = dict(
    # GPT.create_blockmasks on the sequence of attention_layout(): block_idx and docs_low/docs_high give
    # per 128-token block "any" (causal and a document shared) and "all" (strictly causal, one
    # document) tiles; build_bm keeps per query block min(full, w - 1) full and
    # min(partial, max(w - full, 1)) partial tiles, w = get_window_size_blocks(step) (long layers
    # 0, 4, 11) or w // 2 (short layers 1-3, 5, 6, 8-10; layer 7 has no attention); a negative count
    # keeps none. Summed over steps 0..1749 of the training loop (a throwaway script of that rule
    # on this sequence, not kept).
    computed=24_841_472,
    # The partial tiles kept above; document_causal is their mask_mod (the window is in the counts).
    partial=12_680_786,
)
RECORD_COLLECTIVES = (
    # (op, dtype, bytes one rank receives or sends, count). Muon.step: per shape group (set(shape) of
    # the hidden matrices: qkv_w (3, 768, 768) x 11, c_proj (768, 768) x 11, c_fc (3072, 768) x 12,
    # MLP c_proj (768, 3072) x 12, float32), for every W matrices one dist.reduce_scatter of a list of
    # W gradients (each rank gets one whole matrix) and one dist.all_gather of the updated matrices:
    # ceil(11/8) = ceil(12/8) = 2 of each per group.
    (REDUCE_SCATTER, "float32", 3 * 768 * 768 * 4, 2),
    (REDUCE_SCATTER, "float32", 768 * 768 * 4, 2),
    (REDUCE_SCATTER, "float32", 3072 * 768 * 4, 4),
    (ALL_GATHER, "float32", 3 * 768 * 768 * 4, 2),
    (ALL_GATHER, "float32", 768 * 768 * 4, 2),
    (ALL_GATHER, "float32", 3072 * 768 * 4, 4),
    # DistAdam.step: per parameter one dist.reduce_scatter_tensor into grad[:shape[0] // W] and one
    # dist.all_gather_into_tensor of that slice. scalars: GPT.__init__ pads 5 x 12 to 64 (W = 8),
    # float32, 8 each; lm_head (50304, 768) float32, 6288 rows each; embed and the 3 value_embeds
    # (50304, 768), bf16 (the main script's m.bfloat16() on every nn.Embedding), 6288 rows each.
    (REDUCE_SCATTER, "float32", 64 // 8 * 4, 1),
    (REDUCE_SCATTER, "float32", 6288 * 768 * 4, 1),
    (REDUCE_SCATTER, "bfloat16", 6288 * 768 * 2, 4),
    (ALL_GATHER, "float32", 64 // 8 * 4, 1),
    (ALL_GATHER, "float32", 6288 * 768 * 4, 1),
    (ALL_GATHER, "bfloat16", 6288 * 768 * 2, 4),
)
RECORD_ALLOCATIONS = (
    # Tensors one step of rank 0 (W = 8) allocates through the dispatcher after the first step, as
    # optim.allocations counts them (what a torch.compile'd graph allocates inside is not seen).
    # Muon.step, eager: per shape group (4) torch.empty_like(params[-1]) and torch.zeros_like for the
    # padding of the reduce-scatter lists, torch.empty_like for the all-gather list's padding: 12;
    # per matrix rank 0 owns (2 of each group's 11 or 12: 8) grad.bfloat16(): 8. Its
    # zeropower_via_newtonschulz5 is compiled, and so is the whole DistAdam.step: 0 there.
    4 * 3 + 8
)
RECORD_GRAPHS = dict(
    # torch.compile(model, dynamic=False); the window is a device tensor (get_window_size_blocks_helper),
    # the sequence length fixed per mode (args.seq_len, args.val_seq_len): one graph in training and
    # one in eval mode (self.training picks the FP8 head and the loss reduction).
    training=1,
    validation=1,
)


# ---------------------------------------------------------------------------------------------------
# GEMMs and weight casts


class Census(TorchDispatchMode):
    """Counts GEMMs and weight casts by (section, phase); see the module docstring for the rules.

    section: "block i" or "outside" (embeddings, head, loss); phase: "forward" or "backward".
    A custom op (e.g. the FP8 head's) is opaque to the dispatcher: its Python implementation is run
    under this mode so that its matmuls and casts are seen.
    """

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.section = "outside"
        self.gemms: dict[tuple[str, str], list] = defaultdict(list)
        self.casts: Counter = Counter()
        self.weights = {p.untyped_storage()._cdata for p in params}
        self.alive: list[torch.Tensor] = []  # made from weights: kept so their storages are not reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        definition = torch._library.custom_ops.OPDEFS.get(func._schema.name)
        if definition is not None:
            with self:
                return definition._init_fn(*args, **kwargs)
        node = torch._C._current_autograd_node()
        where = self._where(node)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        if func in GEMMS:
            a, b = args[1:3] if func in (aten.addmm.default, aten.baddbmm.default) else args[:2]
            self.gemms[where].append((a.shape[-2], b.shape[-1], a.shape[-1], gemm_dtype(a, b)))
        elif node is None and self._from_weights(inputs):
            self._mark(out)
            self.casts[where] += is_cast(func, inputs[0], out)
        elif node is not None and casts_a_weight(node):
            self.casts[where] += is_cast(func, inputs[0], out)
        return out

    def _where(self, node) -> tuple[str, str]:
        """(section, phase) of an op run in forward (node None) or by an autograd node in backward."""
        if node is None:
            return self.section, "forward"
        return node.metadata.get("section", "outside"), "backward"

    def _from_weights(self, inputs: list[torch.Tensor]) -> bool:
        return bool(inputs) and all(t.untyped_storage()._cdata in self.weights for t in inputs)

    def _mark(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.weights.add(t.untyped_storage()._cdata)
                self.alive.append(t)


def is_cast(func, source: torch.Tensor, out) -> bool:
    """A dtype conversion: one of CASTS whose output's dtype differs from its input's."""
    return func in CASTS and out.dtype != source.dtype


def gemm_dtype(a: torch.Tensor, b: torch.Tensor) -> str:
    names = {torch.bfloat16: BF16, torch.float32: "fp32", torch.float8_e4m3fn: E4M3, torch.float8_e5m2: E5M2}
    left, right = names.get(a.dtype, str(a.dtype)), names.get(b.dtype, str(b.dtype))
    return left if left == right else f"{left}x{right}"


def casts_a_weight(node) -> bool:
    """A backward cast of a weight's gradient: a ToCopyBackward node whose gradient reaches a
    parameter's AccumulateGrad through views only."""
    if node.name() != "ToCopyBackward0":
        return False
    while True:
        edges = [n for n, _ in node.next_functions if n is not None]
        if len(edges) != 1:
            return False
        node = edges[0]
        if node.name() == "torch::autograd::AccumulateGrad":
            return True
        if "View" not in node.name():
            return False


def tag(tensors, section: str) -> None:
    """Mark every autograd node behind `tensors` not yet marked as made in `section`."""
    stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if "section" in node.metadata:
            continue
        node.metadata["section"] = section
        stack.extend(n for n, _ in node.next_functions if n is not None and "section" not in n.metadata)


class AttentionStandIn(torch.autograd.Function):
    """FlexAttention's place in the graph: an output like q from q, k and v, gradients to all three."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


def on_an_h100(matmul):
    """LMHead.matmul as it decides on an H100: for a CUDA device of compute capability 9.0."""
    def decide(self, device):
        with mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: (9, 0)):
            return matmul(self, torch.device("cuda"))
    return decide


def census(preset: str = "124m") -> Census:
    """One training forward and backward of the preset's model on the meta device, counted."""
    gpt = meta_gpt(PRESETS[preset], fsdp=False)
    counter = Census(list(gpt.parameters()))

    def enter(i):
        def hook(module, args):
            tag(args, "outside")
            counter.section = f"block {i}"
        return hook

    def leave(i):
        def hook(module, args, out):
            tag([out], f"block {i}")
            counter.section = "outside"
        return hook

    for i, block in enumerate(gpt.blocks):
        block.register_forward_pre_hook(enter(i))
        block.register_forward_hook(leave(i))
    idx = torch.zeros(1, T, dtype=torch.long, device="meta")
    with contextlib.ExitStack() as patches:
        stand_in = lambda backend, q, k, v, *_: AttentionStandIn.apply(q, k, v)  # noqa: E731
        patches.enter_context(mock.patch.object(model.gpt, "attend", stand_in))
        patches.enter_context(mock.patch.object(model.gpt, "build_mask", lambda *args: None))
        patches.enter_context(mock.patch.object(LMHead, "matmul", on_an_h100(LMHead.matmul)))
        with counter:
            loss = gpt(idx, idx)
            tag([loss], "outside")
            loss.backward()
    return counter


def gemms_and_casts(counted: Census, gpt: GPT) -> tuple[dict, dict]:
    """Per kind of section ("attention block", "attention-free block", "head": outside the blocks), its
    GEMMs and weight casts by phase; refuses blocks of one kind that differ."""
    kinds = {f"block {i}": "attention block" if block.attn is not None else "attention-free block"
             for i, block in enumerate(gpt.blocks)}
    gemms, casts = {}, {}
    for section in [*kinds, "outside"]:
        kind = kinds.get(section, "head")
        mine = {phase: sorted(counted.gemms[section, phase]) for phase in ("forward", "backward")}
        mine_casts = {phase: counted.casts[section, phase] for phase in ("forward", "backward")}
        if gemms.setdefault(kind, mine) != mine or casts.setdefault(kind, mine_casts) != mine_casts:
            raise AssertionError(f"bench.structure: {section} differs from the first {kind}")
    return gemms, casts


# ---------------------------------------------------------------------------------------------------
# Attention tiles


def attention_layout() -> torch.Tensor:
    """(1, T) token ids of one BOS-aligned sequence: documents of geometric length, mean MEAN_DOCUMENT."""
    return torch.from_numpy(synthetic_tokens(T, MEAN_DOCUMENT, LAYOUT_SEED).astype("int64"))[None]


def mask_tiles(mask: BlockMask) -> tuple[int, int]:
    """(tiles computed, partial tiles) of a BlockMask: its full and partial kv block counts (< 0: none)."""
    partial = int(mask.kv_num_blocks.clamp_min(0).sum())
    return partial + int(mask.full_kv_num_blocks.clamp_min(0).sum()), partial


def attention_tiles(preset: str = "124m") -> dict[str, int]:
    """Tiles computed and partial tiles over the speedrun's training steps, on attention_layout(): each
    attention layer's BlockMask as GPT.forward builds it (its window rule; long or short window)."""
    cfg = parse_config(["--preset", "speedrun-2025-07-12"])
    gpt = meta_gpt(PRESETS[preset], fsdp=False)
    rule, idx = gpt.config.window_rule, attention_layout()
    docs = document_ids(idx, gpt.config.bos_token)
    attending = [i for i, block in enumerate(gpt.blocks) if block.attn is not None]
    long = sum(i in gpt.long_window for i in attending)
    computed = partial = 0
    schedule = schedule_of(cfg)
    for window, steps in Counter(schedule.at(s).window for s in range(cfg.max_steps)).items():
        w = torch.tensor(window)
        for layers, layer_window in ((long, w), (len(attending) - long, short_window(w, rule))):
            tiles = mask_tiles(build_mask("flex", T, layer_window, docs, idx.device, rule))
            computed += steps * layers * tiles[0]
            partial += steps * layers * tiles[1]
    return dict(computed=computed, partial=partial)


# ---------------------------------------------------------------------------------------------------
# Collectives


def collectives(preset: str = "124m", world_size: int = WORLD_SIZE) -> list[tuple[str, str, int]]:
    """(op, dtype, bytes per rank) of each collective of one optimizer step at world_size ranks:
    optim.step_collectives, the list the step issues, computed without a process group, for
    the speedrun's optimizer as training/recipe.py build_optimizer makes it (unused_parameters: flags
    only where the model leaves a parameter without a gradient; the 124M model does not)."""
    gpt = meta_gpt(PRESETS[preset], fsdp=False)
    plan = step_collectives(speedrun_groups(gpt, "adam"), world_size, unused_parameters(gpt))
    return [(c.op, dtype_name(c.dtype), c.bytes) for c in plan]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def record_collectives() -> list[tuple[str, str, int]]:
    return [(op, dtype, size) for op, dtype, size, count in RECORD_COLLECTIVES for _ in range(count)]


def collective_counts(plan: list[tuple[str, str, int]]) -> dict[str, int]:
    """The counts the test compares: collectives and bytes by op, and chunks not a multiple of 16 bytes."""
    counts = {}
    for op in (REDUCE_SCATTER, ALL_GATHER, ALL_REDUCE):
        sizes = [size for name, _, size in plan if name == op]
        counts[op], counts[f"{op} bytes"] = len(sizes), sum(sizes)
    counts["not a multiple of 16 bytes"] = sum(size % ALIGNMENT != 0 for _, _, size in plan)
    return counts


# ---------------------------------------------------------------------------------------------------
# Allocations


@contextlib.contextmanager
def fake_world(world_size: int):
    """A default process group of world_size ranks in this one process, this being rank 0, whose
    collectives do nothing (torch's "fake" backend); destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("bench.structure: a process group is already initialized; run it in a process "
                           "of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def opaque(fn, backend):
    """Stands in for optim's compiled(fn, backend): fn run where the dispatcher's Python modes see none
    of it, as none of what inductor's generated code allocates goes through them."""
    def call(*args, **kwargs):
        with _disable_current_modes():
            return fn(*args, **kwargs)
    return call


def allocations(preset: str = "124m", world_size: int = WORLD_SIZE, steps: int = 3) -> list[int]:
    """Tensors allocated by each of `steps` optimizer steps of rank 0 of world_size (optim.allocations),
    the speedrun's optimizer on the preset's meta model; what CUDA compiles (Newton–Schulz, Adam's
    update) runs opaque, as on an H100. The first step makes the state and buffers."""
    cfg = parse_config(["--preset", "speedrun-2025-07-12"])
    gpt = meta_gpt(PRESETS[preset], fsdp=False)
    counts = []
    with contextlib.ExitStack() as patches, fake_world(world_size):
        # Instrumentation by name, not API: the two modules that compile on CUDA take CUDA's path, and
        # DataParallel's launch order, which on meta tensors cannot be read from the host, is rank 0's.
        for module in ("optim.newton_schulz", "optim.update"):
            patches.enter_context(mock.patch(f"{module}.compile_backend", lambda *_: "inductor"))
            patches.enter_context(mock.patch(f"{module}.compiled", opaque))
        in_index_order = lambda self: list(range(len(self.buckets)))  # noqa: E731
        patches.enter_context(mock.patch("optim.distributed.DataParallel._agree_order", in_index_order))
        optimizer = build_optimizer(gpt, cfg)
        for _ in range(steps):
            for p in gpt.parameters():
                p.grad = torch.zeros_like(p)
            with count_allocations() as counted:
                optimizer.step()
            counts.append(counted.count)
            optimizer.zero_grad(set_to_none=True)
        optimizer.close()
    return counts


# ---------------------------------------------------------------------------------------------------
# Compiled graphs


def compiled_graphs(preset: str = "124m") -> dict[str, int]:
    """Graphs of the compiled model over the speedrun's schedule, per mode: a training forward and
    backward (as training.run.Run.train_step runs them) and training.run.validation_loss, at the first
    step of each window, on the preset's architecture at width 32 with 64-token sequences."""
    cfg = parse_config(["--preset", "speedrun-2025-07-12"])
    small = dataclasses.replace(PRESETS[preset], dim=32, n_head=2, head_dim=16, max_seq_len=64,
                                attention="sdpa")  # FlexAttention has no backward on a CPU
    gpt = GPT(small)
    torch._dynamo.reset()  # no graphs or recompile budget left over
    forward, graphs = compile_model(gpt, "eager")
    tokens = torch.from_numpy(synthetic_tokens(65, 16, LAYOUT_SEED).astype("int64"))[None]
    batch = (tokens[:, :-1], tokens[:, 1:])
    schedule = schedule_of(cfg, torch.device("cpu"))
    for first in schedule.first_steps():
        window = schedule.window_tensor(first)
        forward(*batch, window=window).backward()
        validation_loss(forward, [batch], window, contextlib.nullcontext)
    return dict(training=graphs.training, validation=graphs.validation)


# ---------------------------------------------------------------------------------------------------
# The table


def shapes(gemms: list) -> str:
    """GEMMs as "n x MxNxK dtype", sorted."""
    counted = sorted(Counter(gemms).items())
    return "; ".join(f"{n} x {m}x{cols}x{k} {dtype}" for (m, cols, k, dtype), n in counted)


def ours() -> dict:
    """Every figure of the tables for this repo's step, measured."""
    gemms, casts = gemms_and_casts(census(), meta_gpt(PRESETS["124m"], fsdp=False))
    return dict(gemms=gemms, casts=casts, tiles=attention_tiles(), collectives=collectives(),
                allocations=allocations()[-1], graphs=compiled_graphs())


def record() -> dict:
    """The same figures for the record, from the constants above."""
    return dict(gemms=RECORD_GEMMS, casts=RECORD_WEIGHT_CASTS, tiles=RECORD_ATTENTION_TILES,
                collectives=record_collectives(), allocations=RECORD_ALLOCATIONS, graphs=RECORD_GRAPHS)


def count_rows(mine: dict, theirs: dict) -> list[str]:
    rows = ["| count | ours | record |", "|---|---|---|"]
    for kind in RECORD_GEMMS:
        for phase in ("forward", "backward"):
            rows.append(f"| GEMMs, {kind}, {phase} | {len(mine['gemms'][kind][phase])} | "
                        f"{len(theirs['gemms'][kind][phase])} |")
            rows.append(f"| weight casts, {kind}, {phase} | {mine['casts'][kind][phase]} | "
                        f"{theirs['casts'][kind][phase]} |")
    for name in ("computed", "partial"):
        a, b = mine["tiles"][name], theirs["tiles"][name]
        rows.append(f"| attention tiles {name}, 1,750 steps | {a:,} ({a / b - 1:+.0%}) | {b:,} |")
    a, b = collective_counts(mine["collectives"]), collective_counts(theirs["collectives"])
    rows += [f"| collectives per step: {name} | {a[name]:,} | {b[name]:,} |" for name in a]
    rows.append(f"| allocations per optimizer step, rank 0 of 8 | {mine['allocations']} | "
                f"{theirs['allocations']} |")
    rows += [f"| compiled graphs, {mode} | {mine['graphs'][mode]} | {theirs['graphs'][mode]} |"
             for mode in ("training", "validation")]
    return rows


def gemm_rows(mine: dict, theirs: dict) -> list[str]:
    rows = ["| GEMMs (M x N x K) | ours | record |", "|---|---|---|"]
    for kind in RECORD_GEMMS:
        for phase in ("forward", "backward"):
            rows.append(f"| {kind}, {phase} | {shapes(mine['gemms'][kind][phase])} | "
                        f"{shapes(theirs['gemms'][kind][phase])} |")
    return rows


def collective_rows(mine: dict, theirs: dict) -> list[str]:
    plans = Counter(mine["collectives"]), Counter(theirs["collectives"])
    rows = ["| collective | dtype | bytes per rank | multiple of 16 | ours | record |",
            "|---|---|---|---|---|---|"]
    for op, dtype, size in sorted(set(plans[0]) | set(plans[1])):
        aligned = "yes" if size % ALIGNMENT == 0 else "no"
        rows.append(f"| {op} | {dtype} | {size:,} | {aligned} | {plans[0][op, dtype, size]} | "
                    f"{plans[1][op, dtype, size]} |")
    return rows


def markdown(mine: dict, theirs: dict) -> str:
    """Three tables: the counts, the GEMMs' shapes, the collectives."""
    tables = (rows(mine, theirs) for rows in (count_rows, gemm_rows, collective_rows))
    return "\n\n".join("\n".join(table) for table in tables) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.structure", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(markdown(ours(), record()), end="")


if __name__ == "__main__":
    main()
