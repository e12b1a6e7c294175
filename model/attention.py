"""Rotary embeddings and causal attention with two back ends.

Attention inputs are (B, H, T, D). Query i sees key j iff
    j <= i  (causal),  d(i, j) < limit  (sliding window; no limit when window is None),
    and i, j lie in the same document (when document ids are given),
where a document starts at each BOS token (GPT-2's <|endoftext|>, which precedes every document in
our shards). A window of w >= 1 tokens sets the distance d and its limit by the window rule:
  - "token":  d(i, j) = i - j,                      limit = w: token-exact, any w;
  - "block":  d(i, j) = floor(i/128) - floor(j/128), limit = W = max(1, ceil(w/128)) blocks: a query
    sees the keys of its own 128-token block up to itself and of the W - 1 blocks before it: at most
    W·128 keys, at least (W - 1)·128 + 1 where its document reaches that far back; no token-level
    window inside those blocks. This is the rule of the
    2025-07-12 speedrun record (docs/RECIPE.md), as its create_blockmasks builds it: for each query
    block m it lists the blocks whose causal + document rule is partial (P of them) and full (F),
    each nearest first, and keeps min(F, W - 1) full and min(P, max(1, W - F)) partial ones, then
    applies only causal + document inside the partial ones. Documents are contiguous, so if block m
    lies inside one document its full blocks are m - 1, ..., m - F and its partial ones m and
    perhaps m - F - 1 (where the document starts); if a document starts inside block m it has no
    full block and its partial ones are m, m - 1, ... In both cases the kept blocks are exactly those
    with m - n < W (W = 0, the record's short window when its long one is 1 block, keeps block m
    alone, as W = 1 does).
Short-window layers take half the long window (`short_window`): "token" max(1, floor(w/2)) tokens,
"block" floor(W/2) blocks (at least 1), the record's halving of its block count: at W = 3 the short
window is 1 block, where "token" gives 192 tokens.

The window is a 0-dim integer tensor, so one compiled graph serves every window value: nothing below
branches on it or reads it on the host.

Back ends, which compute the same function (tests check it on CPU):
  - "flex": FlexAttention with a BlockMask built from per-128-token-block quantities (see
    `flex_block_mask`): O((T/128)^2) work to build, the elementwise rule only inside partial blocks.
    Used on CUDA, where it compiles to a fused block-sparse kernel.
  - "sdpa": scaled_dot_product_attention with a dense (T, T) boolean mask; CPU and any other device.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 128  # FlexAttention's tile: the block mask says, per 128 x 128 tile, none / some / all allowed


class Rotary(torch.nn.Module):
    """Rotary position embedding on the last dim (size head_dim), for positions < max_seq_len.

    Pairs (x1_i, x2_i), i < head_dim/2, are rotated by angle t * theta_i. The first n = `rotated`
    pairs get theta_i = base^(-i / (n - 1)), spanning 1 down to 1/base; the remaining pairs get
    theta = 0 (stay put), which keeps some dimensions purely content-based.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 1024.0, rotated_fraction: float = 0.5):
        super().__init__()
        half = head_dim // 2
        rotated = max(1, int(half * rotated_fraction))
        theta = base ** -torch.linspace(0, 1, rotated, dtype=torch.float32)
        theta = torch.cat([theta, theta.new_zeros(half - rotated)])
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), theta)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, T, D) -> same shape, rotated by position along T."""
        T = x.size(-2)
        if T > self.cos.size(0):
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.cos.size(0)}")
        cos, sin = self.cos[:T], self.sin[:T]
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
        return rotated.type_as(x)


def document_ids(idx: Tensor, bos_token: int) -> Tensor:
    """(B, T) token ids -> (B, T) document index: the count of BOS tokens at or before each position."""
    return (idx == bos_token).cumsum(dim=-1)


WINDOW_RULES = ("token", "block")


def window_blocks(window: Tensor) -> Tensor:
    """W = max(1, ceil(w / 128)): a window of w >= 1 tokens in whole blocks, as a tensor op."""
    return torch.clamp_min((window + BLOCK - 1) // BLOCK, 1)


def short_window(window: Tensor, rule: str) -> Tensor:
    """The short-window layers' window in tokens, as a tensor op (no host read): "token" max(1, w // 2);
    "block" 128 * max(1, W // 2), W = window_blocks(w)."""
    if rule == "block":
        return BLOCK * torch.clamp_min(window_blocks(window) // 2, 1)
    return torch.clamp_min(window // 2, 1)


def in_window(i: Tensor, j: Tensor, window: Tensor, rule: str) -> Tensor:
    """d(i, j) < limit, the window rule's condition (module docstring), elementwise over i, j.

    d never decreases in i and never increases in j, under either rule."""
    if rule == "block":
        return i // BLOCK - j // BLOCK < window_blocks(window)
    return i - j < window


def dense_mask(seq_len: int, window: Tensor | None, docs: Tensor | None, device,
               rule: str = "token") -> Tensor:
    """Boolean mask (B or 1, 1, T, T), True where query i may attend to key j."""
    i = torch.arange(seq_len, device=device)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed = allowed & in_window(i[:, None], i[None, :], window, rule)
    allowed = allowed[None, None]
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    return allowed


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """Reference back end: scaled_dot_product_attention; mask None means plain causal."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def block_classes(seq_len: int, window: Tensor | None, docs: Tensor | None, device,
                  rule: str = "token") -> tuple[Tensor, Tensor]:
    """(some, every): (B or 1, N, N) booleans over N = ceil(T/128) query blocks x key blocks.

    some[m, n]: some query of block m may see some key of block n; every[m, n]: all may (a full block).
    Exact, from per-block quantities only: with first/last the block's first and last position and
    lo/hi the document ids there (ids never decrease along the sequence),
      causal:   some iff m >= n;                     every iff m > n;
      window:   some iff d(first_m, last_n) < limit; every iff d(last_m, first_n) < limit (d is
                monotone: smallest and largest over the block pair there). "token": first_m - last_n
                < w and last_m - first_n < w; "block": both read m - n < W;
      document: some iff lo_m <= hi_n and lo_n <= hi_m (a document shared; it then covers the
                nearest pair (first_m, last_n), so the three conditions hold on one pair);
                every iff hi_m == lo_n and lo_m == hi_n (one document spans both blocks).
    A block cut short by the sequence end is never full, as in FlexAttention's own padding.
    """
    first = torch.arange(0, seq_len, BLOCK, device=device)
    last = torch.clamp_max(first + BLOCK, seq_len) - 1
    whole = first + BLOCK <= seq_len
    m, n = torch.arange(first.numel(), device=device)[:, None], torch.arange(first.numel(), device=device)
    some = m >= n
    every = (m > n) & whole[:, None] & whole[None, :]
    if window is not None:
        some = some & in_window(first[:, None], last[None, :], window, rule)
        every = every & in_window(last[:, None], first[None, :], window, rule)
    some, every = some[None], every[None]
    if docs is not None:
        lo, hi = docs[:, first], docs[:, last]  # (B, N)
        some = some & (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
        every = every & (hi[:, :, None] == lo[:, None, :]) & (lo[:, :, None] == hi[:, None, :])
    return some, every


def ordered_blocks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N, N) booleans -> FlexAttention's (num_blocks (B, 1, N), indices (B, 1, N, N)), int32.

    Row m lists the key blocks set in blocks[:, m] first, in increasing order (then the others).
    """
    num = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[:, None].contiguous(), indices[:, None].contiguous()


def flex_block_mask(seq_len: int, window: Tensor | None, docs: Tensor | None, device, rule: str = "token"):
    """FlexAttention BlockMask for causal (+ sliding window) (+ same document) attention.

    Full blocks (`every`) skip the mask_mod; partial blocks (`some` and not `every`) apply the
    elementwise rule; other blocks are skipped. Nothing here is evaluated over all T^2 pairs.
    Under the "block" rule the window term is true on every pair of a kept block: the block lists
    alone apply the window, as in the record. The mask_mod still states it (a few integer operations
    per pair of a partial block) because eager FlexAttention evaluates mask_mod on every pair and
    ignores the block lists.
    """
    from torch.nn.attention.flex_attention import BlockMask

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = q_idx >= kv_idx
        if window is not None:
            allowed = allowed & in_window(q_idx, kv_idx, window, rule)
        if docs is not None:
            allowed = allowed & (docs[b, q_idx] == docs[b, kv_idx])
        return allowed

    some, every = block_classes(seq_len, window, docs, device, rule)
    partial_num, partial_indices = ordered_blocks(some & ~every)
    full_num, full_indices = ordered_blocks(every)
    return BlockMask.from_kv_blocks(partial_num, partial_indices, full_num, full_indices, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(seq_len, seq_len))


def flex_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, block_mask) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return _flex(q, k, v, block_mask=block_mask, scale=scale)


def build_mask(backend: str, seq_len: int, window: Tensor | None, docs: Tensor | None, device,
               rule: str = "token"):
    """The mask object `attend` expects: a BlockMask for "flex", a dense bool tensor or None for "sdpa"."""
    if backend == "flex":
        return flex_block_mask(seq_len, window, docs, device, rule)
    if window is None and docs is None:
        return None
    return dense_mask(seq_len, window, docs, device, rule)


def attend(backend: str, q: Tensor, k: Tensor, v: Tensor, scale: float, mask) -> Tensor:
    """Causal attention (B, H, T, D) -> (B, H, T, D) through the chosen back end."""
    if backend == "flex":
        return flex_attention(q, k, v, scale, mask)
    return sdpa_attention(q, k, v, scale, mask)

