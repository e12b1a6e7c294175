"""The reference side of tools.parity: a speedrun record's training script, loaded on CPU without
running it (tools/parity_source.py), and one adapter per record format that builds its model and
optimizers as its main body does.

The 2025-07-12 format (`Record20250712`) needs, beyond the common substitutions, one stand-in:
`flex_attention` is SDPA with the BlockMask expanded to a dense (T, T) mask (`dense_block_mask`):
FlexAttention has no backward on CPU, and eager FlexAttention ignores the block mask's sparsity, which
is where the record's sliding window lives. The per-rank batch split needs no reproduction: with one
rank the record's step is its rank-0 step on one sequence, its gradient that sequence's summed-loss
gradient (AVG over one rank), as on each of its 8 ranks before averaging.

An adapter knows one format: the names its script defines (to recognise it), how its main body builds
the model and optimizers and sets the schedule (written from the record's lines, cited), and the name
table from its parameters to ours (tools/parity_table.py). A new record format is a new adapter, in
FORMATS; record #46's is tools/parity_record46.py.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tools.parity_record46 import Record20251129
from tools.parity_source import Loaded, StandIns, load_definitions, read_source, top_level_names
from tools.parity_table import Entry, Reference, resolve_table

# ---- the attention the CPU runs instead -------------------------------------------------------


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


# ---- the 2025-07-12 format ------------------------------------------------------------------------


class Record20250712(Reference):
    """The 2025-07-12 "BosAlign" record (records/track_1_short/2025-07-12_BosAlign/ in modded-nanogpt);
    line numbers are those of its log's source (lines 1-783)."""

    name = "2025-07-12"
    defines = frozenset({"GPT", "Muon", "DistAdam", "Hyperparameters", "get_lr", "get_window_size_blocks",
                         "next_multiple_of_n"})
    # Newton-Schulz is called on grad.bfloat16() in Muon.step (line 197)
    stand_ins = StandIns("zeropower_via_newtonschulz5",
                         injected={"flex_attention": (sdpa_with_block_mask, None)})
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


FORMATS: list[type[Reference]] = [Record20250712, Record20251129]


def recognise(path: str | Path) -> tuple[type[Reference], Loaded]:
    """The adapter that recognises the reference at `path` (a record log or a .py), and its definitions
    loaded with that adapter's substitutions."""
    source = read_source(path)
    names = top_level_names(source, str(path))
    for adapter in FORMATS:
        if adapter.defines <= names:
            loaded = load_definitions(source, adapter.stand_ins, str(path))
            check_substitutions(loaded, path)
            return adapter, loaded
    known = "; ".join(f"{a.name} defines {sorted(a.defines)}" for a in FORMATS)
    raise SystemExit(f"error: --reference {path}: not a record format tools.parity knows ({known})")


def load_reference(path: str | Path, dim: int, **options) -> tuple[Reference, dict[str, int]]:
    """The reference at `path` built by its adapter at width `dim` (its other `options`: seq_len for
    2025-07-12, batch_divisor for 2025-11-29), with the substitutions made (what, how often)."""
    adapter, loaded = recognise(path)
    return adapter(loaded.namespace, dim, **options), loaded.substitutions


def check_substitutions(loaded: Loaded, path) -> None:
    """The Newton–Schulz precision switch must reach the reference's Newton–Schulz (rewritten, or its own)."""
    if not loaded.uses_ns_dtype:
        raise SystemExit(f"error: --reference {path}: found no `.bfloat16()` cast of its Newton-Schulz "
                         f"input, so the one-step check cannot run it in float32")
