"""Rotary embeddings and causal attention with two back ends.

Attention inputs are (B, H, T, D). Query i sees key j iff
    j <= i  (causal),  i - j < window  (sliding window; no limit when window is None),
    and i, j lie in the same document (when document ids are given),
where a document starts at each BOS token (GPT-2's <|endoftext|>, which precedes every document in
our shards). The rule is token-exact: a window need not be a multiple of anything.

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


def short_window(window: Tensor) -> Tensor:
    """The short-window layers' window: half the long one (at least 1), as a tensor op (no host read)."""
    return torch.clamp_min(window // 2, 1)


def dense_mask(seq_len: int, window: Tensor | None, docs: Tensor | None, device) -> Tensor:
    """Boolean mask (B or 1, 1, T, T), True where query i may attend to key j."""
    i = torch.arange(seq_len, device=device)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    allowed = allowed[None, None]
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    return allowed


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """Reference back end: scaled_dot_product_attention; mask None means plain causal."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def block_classes(seq_len: int, window: Tensor | None, docs: Tensor | None, device) -> tuple[Tensor, Tensor]:
    """(some, every): (B or 1, N, N) booleans over N = ceil(T/128) query blocks x key blocks.

    some[m, n]: some query of block m may see some key of block n; every[m, n]: all may (a full block).
    Exact, from per-block quantities only: with first/last the block's first and last position and
    lo/hi the document ids there (ids never decrease along the sequence),
      causal:   some iff m >= n;                     every iff m > n;
      window:   some iff first_m - last_n < window;  every iff last_m - first_n < window;
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
        some = some & (first[:, None] - last[None, :] < window)
        every = every & (last[:, None] - first[None, :] < window)
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


def flex_block_mask(seq_len: int, window: Tensor | None, docs: Tensor | None, device):
    """FlexAttention BlockMask for causal (+ sliding window) (+ same document) attention.

    Full blocks (`every`) skip the mask_mod; partial blocks (`some` and not `every`) apply the
    elementwise rule; other blocks are skipped. Nothing here is evaluated over all T^2 pairs.
    """
    from torch.nn.attention.flex_attention import BlockMask

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = q_idx >= kv_idx
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        if docs is not None:
            allowed = allowed & (docs[b, q_idx] == docs[b, kv_idx])
        return allowed

    some, every = block_classes(seq_len, window, docs, device)
    partial_num, partial_indices = ordered_blocks(some & ~every)
    full_num, full_indices = ordered_blocks(every)
    return BlockMask.from_kv_blocks(partial_num, partial_indices, full_num, full_indices, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(seq_len, seq_len))


def flex_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, block_mask) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return _flex(q, k, v, block_mask=block_mask, scale=scale)


def build_mask(backend: str, seq_len: int, window: Tensor | None, docs: Tensor | None, device):
    """The mask object `attend` expects: a BlockMask for "flex", a dense bool tensor or None for "sdpa"."""
    if backend == "flex":
        return flex_block_mask(seq_len, window, docs, device)
    if window is None and docs is None:
        return None
    return dense_mask(seq_len, window, docs, device)


def attend(backend: str, q: Tensor, k: Tensor, v: Tensor, scale: float, mask) -> Tensor:
    """Causal attention (B, H, T, D) -> (B, H, T, D) through the chosen back end."""
    if backend == "flex":
        return flex_attention(q, k, v, scale, mask)
    return sdpa_attention(q, k, v, scale, mask)

