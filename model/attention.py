"""Rotary embeddings and causal attention with two back ends.

Attention inputs are (B, H, T, D). Query i sees key j iff
    j <= i  (causal),  d(i, j) < limit  (sliding window; no limit when window is None),
    and i, j lie in the same document (when document ids are given),
where a document starts at each BOS token (GPT-2's <|endoftext|>, which precedes every document in
our shards). A window of w tokens (w >= 1; "varlen" w >= 0) sets the distance d and its limit by
the window rule:
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
  - "varlen": d(i, j) = i - j,                     limit = w + 1: token-exact, w + 1 keys (w >= 0):
    FlashAttention-3's varlen kernel with causal=True and window_size=(w, 0), as record #46 calls it
    (w = 128 x its window in blocks): query i sees keys i - w, ..., i of its own segment. The record's
    segments (cu_seqlens) are exactly our documents: in training every segment starts at a BOS and
    holds no other (data/loader.py's max_doc_len packing: each document cut to at most max_doc_len
    tokens, its tail dropped, the last one cut at the row's end; cu_seqlens padded with empty
    segments, which hold no token); in validation the stream is unaligned, so the tokens before the
    first BOS form one more segment, as our document id 0. FA3's max_seqlen (2048 = max_doc_len in
    training, the rank's whole sequence in validation) only bounds the segment lengths for its kernel;
    the document ids bound them exactly, so the masks here need no such argument.
Short-window layers take half the long window (`short_window`): "token" max(1, floor(w/2)) tokens,
"block" floor(W/2) blocks (at least 1), the record's halving of its block count: at W = 3 the short
window is 1 block, where "token" gives 192 tokens; "varlen" 128 floor(floor(w/128)/2) tokens, record
#46's ws_long // 2 blocks (w = 384: 128 tokens, 129 keys). Record #46's final validation breaks the
halving (short 6 blocks = 768 tokens, long 20 = 2560): the model takes the short window explicitly
there (GPT.forward's `short`).

The window is a 0-dim integer tensor, so one compiled graph serves every window value: nothing below
branches on it or reads it on the host.

Back ends, which compute the same function (tests check it on CPU):
  - "flex": FlexAttention with a BlockMask built from per-128-token-block quantities (see
    `flex_block_mask`): O((T/128)^2) work to build, the elementwise rule only inside partial blocks.
    Used on CUDA, where it compiles to a fused block-sparse kernel.
  - "sdpa": scaled_dot_product_attention with a dense (T, T) boolean mask; CPU and any other device.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 128  # FlexAttention's tile: the block mask says, per 128 x 128 tile, none / some / all allowed

# torch's CPU cos, sin, exp, ... go through MKL's vector math, which sets itself up on its first call.
# When that first call is split over threads (tensors of more than 2048 elements), a thread can come
# out of the set-up on a low-accuracy path for that call: the rotary tables below, a 256 x 32 cos on 2
# threads, were then off by up to 2e-4 past position 64 (the second thread's half), in 5 to 40% of
# fresh processes (torch 2.13, MKL 2024.2), and every loss after them moved. One single-threaded call
# now, before any table is built, sets it up; tests/test_model.py checks both.
torch.ones(1).cos()


class Rotary(torch.nn.Module):
    """Rotary position embedding on the last dim (size head_dim), for positions < max_seq_len.

    Pairs (x1_i, x2_i), i < head_dim/2, are rotated by angle t * theta_i. The first n = `rotated`
    pairs get theta_i = base^(-i / (n - 1)), spanning 1 down to 1/base; the remaining pairs get
    theta = 0 (stay put), which keeps some dimensions purely content-based. theta (head_dim/2,) and
    the tables cos, sin (max_seq_len, head_dim/2) of t * theta are float32 buffers, not saved.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 1024.0, rotated_fraction: float = 0.5):
        super().__init__()
        half = head_dim // 2
        rotated = max(1, int(half * rotated_fraction))
        theta = base ** -torch.linspace(0, 1, rotated, dtype=torch.float32)
        theta = torch.cat([theta, theta.new_zeros(half - rotated)])
        self.register_buffer("theta", theta, persistent=False)
        cos, sin = rotation_tables(theta, max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """x: (B, H, T, D) -> same shape, rotated by position along T, then times scale if given (in
        float32, one rounding to x's dtype)."""
        T = x.size(-2)
        if T > self.cos.size(0):
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.cos.size(0)}")
        cos, sin = self.cos[:T], self.sin[:T]
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
        if scale is not None:
            rotated = rotated * scale
        return rotated.type_as(x)


def rotation_tables(theta: Tensor, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """(cos, sin) of the angles t * theta_i, t < max_seq_len: two (max_seq_len, len(theta)) float32 tables."""
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=theta.device), theta)
    return angles.cos(), angles.sin()


def yarn_factors(theta: Tensor, old_window: int, new_window: int, alpha: float = 1.0,
                 beta: float = 32.0) -> Tensor:
    """YaRN's per-frequency factors (Peng et al. 2023, interpolation "by parts") for a window grown
    from old_window to new_window tokens: theta_i <- theta_i * (s + g_i (1 - s)), with

        s = old / new,  r_i = old * theta_i / (2 pi)  (turns over the old window),
        g_i = clamp((r_i - alpha) / (beta - alpha), 0, 1).

    A frequency that turns fewer than alpha times over the old window is slowed by s (the new window
    then spans the angles the old one did); one that turns more than beta times is kept; a linear ramp
    in between. theta = 0 stays 0. The record applies it at every long-window change (alpha 1, beta 32).
    """
    turns = old_window * theta / (2 * torch.pi)
    s = old_window / new_window
    ramp = torch.clamp((turns - alpha) / (beta - alpha), 0, 1)
    return s + ramp * (1 - s)


def yarn_attention_factor(old_window: int, new_window: int) -> float:
    """The attention-logit scale's factor for a window grown from old to new: 0.2 ln(new / old) + 1
    (YaRN's sqrt(1/t) = 0.1 ln(s) + 1 on q and on k, to first order)."""
    return 0.2 * math.log(new_window / old_window) + 1


class YarnRotary(Rotary):
    """Rotary whose frequencies YaRN rescales as the attention window grows (`extend`), with the
    attention-logit scale that goes with them: attn_scale, a 0-dim float32 buffer (not saved), from
    the given scale, times yarn_attention_factor at each extension (kept as a Python float, rounded
    once to float32, as the record's float scale reaches its kernel). `reset` restores both."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float, attn_scale: float):
        super().__init__(head_dim, max_seq_len, base)
        self.initial = (self.theta.clone(), attn_scale)
        self.scale = attn_scale
        self.register_buffer("attn_scale", torch.tensor(attn_scale, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def set_state(self, theta: Tensor, scale: float) -> None:
        """Frequencies theta and logit scale, written in place (compiled graphs keep reading them)."""
        self.theta.copy_(theta)
        cos, sin = rotation_tables(self.theta, self.cos.size(0))
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.scale = scale
        self.attn_scale.fill_(scale)

    def reset(self) -> None:
        """Back to the base frequencies and the initial scale."""
        theta, scale = self.initial
        self.set_state(theta.to(self.theta.device), scale)

    def extend(self, old_window: int, new_window: int, alpha: float = 1.0, beta: float = 32.0) -> None:
        """One YaRN step, window old_window -> new_window tokens (yarn_factors, yarn_attention_factor)."""
        theta = self.theta * yarn_factors(self.theta, old_window, new_window, alpha, beta)
        self.set_state(theta, self.scale * yarn_attention_factor(old_window, new_window))


def document_ids(idx: Tensor, bos_token: int) -> Tensor:
    """(B, T) token ids -> (B, T) document index: the count of BOS tokens at or before each position."""
    return (idx == bos_token).cumsum(dim=-1)


WINDOW_RULES = ("token", "block", "varlen")


def window_blocks(window: Tensor) -> Tensor:
    """W = max(1, ceil(w / 128)): a window of w >= 1 tokens in whole blocks, as a tensor op."""
    return torch.clamp_min((window + BLOCK - 1) // BLOCK, 1)


def short_window(window: Tensor, rule: str) -> Tensor:
    """The short-window layers' window in tokens, as a tensor op (no host read): "token" max(1, w // 2);
    "block" 128 * max(1, W // 2), W = window_blocks(w); "varlen" 128 * ((w // 128) // 2) (0 at w < 256:
    each query then sees itself alone, as FA3's window (0, 0))."""
    if rule == "block":
        return BLOCK * torch.clamp_min(window_blocks(window) // 2, 1)
    if rule == "varlen":
        return BLOCK * (window // BLOCK // 2)
    return torch.clamp_min(window // 2, 1)


def in_window(i: Tensor, j: Tensor, window: Tensor, rule: str) -> Tensor:
    """d(i, j) < limit, the window rule's condition (module docstring), elementwise over i, j.

    d never decreases in i and never increases in j, under either rule."""
    if rule == "block":
        return i // BLOCK - j // BLOCK < window_blocks(window)
    if rule == "varlen":
        return i - j <= window
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
                < w and last_m - first_n < w; "varlen" the same with w + 1; "block": both read
                m - n < W;
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

