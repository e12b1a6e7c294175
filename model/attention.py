"""Rotary embeddings and causal attention with two back ends.

Attention inputs are (B, H, T, D). The mask is always causal; two optional restrictions narrow it:
  - a sliding window: query i sees keys j with i - window < j <= i;
  - document masking: query i sees key j only if both lie in the same document, where a document
    starts at each BOS token (GPT-2's <|endoftext|>, which precedes every document in our shards).

Back ends: FlexAttention (block-sparse, used on CUDA where it compiles to a fused kernel) and
PyTorch's scaled_dot_product_attention with a dense boolean mask (CPU, and any device without
Flex). Both compute exactly the same function; tests check that on CPU.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


class Rotary(torch.nn.Module):
    """Rotary position embedding on the last dim (size head_dim), for positions < max_seq_len.

    Pairs (x1_i, x2_i), i < head_dim/2, are rotated by angle t * theta_i with
    theta_i = base^(-i / rotated). Only the first `rotated` pairs rotate; the remaining pairs get
    theta = 0 (stay put), which keeps some dimensions purely content-based.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 1024.0, rotated_fraction: float = 0.5):
        super().__init__()
        half = head_dim // 2
        rotated = max(1, int(half * rotated_fraction))
        theta = base ** (-torch.arange(rotated, dtype=torch.float32) / rotated)
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


def dense_mask(seq_len: int, window: int | None, docs: Tensor | None, device) -> Tensor:
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


def flex_block_mask(seq_len: int, window: int | None, docs: Tensor | None, batch: int, device):
    """FlexAttention BlockMask for causal (+ sliding window) (+ same document) attention."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = q_idx >= kv_idx
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        if docs is not None:
            allowed = allowed & (docs[b, q_idx] == docs[b, kv_idx])
        return allowed

    return create_block_mask(mask_mod, B=batch if docs is not None else None, H=None,
                             Q_LEN=seq_len, KV_LEN=seq_len, device=device)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, block_mask) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return _flex(q, k, v, block_mask=block_mask, scale=scale)


def build_mask(backend: str, seq_len: int, window: int | None, docs: Tensor | None, device):
    """The mask object `attend` expects: a BlockMask for "flex", a dense bool tensor or None for "sdpa"."""
    if backend == "flex":
        batch = docs.size(0) if docs is not None else 1
        return flex_block_mask(seq_len, window, docs, batch, device)
    if window is None and docs is None:
        return None
    return dense_mask(seq_len, window, docs, device)


def attend(backend: str, q: Tensor, k: Tensor, v: Tensor, scale: float, mask) -> Tensor:
    """Causal attention (B, H, T, D) -> (B, H, T, D) through the chosen back end."""
    if backend == "flex":
        return flex_attention(q, k, v, scale, mask)
    return sdpa_attention(q, k, v, scale, mask)
