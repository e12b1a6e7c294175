"""The speedrun GPT.

A decoder-only transformer in the shape of the mid-2025 NanoGPT speedrun:
  - token embedding and LM head untied; every residual-stream read goes through a weightless RMSNorm;
  - attention with QK-norm, rotary position embedding, scale 0.12, causal with optional sliding
    window and document masking (see model/attention.py);
  - value embeddings: extra embedding tables mixed into the attention values of the first and last
    few layers, v <- l0 * v + l1 * ve, with learned (l0, l1);
  - every block mixes back the embedding: x <- k0 * x + k1 * x0, with learned (k0, k1);
  - U-net skips: the first half of the blocks push their outputs, the second half pop them and add
    them back with learned weights;
  - ReLU^2 MLP (4x width); zero-initialized output projections (attention out, MLP out, LM head);
  - logits soft-capped: z <- c * tanh(z / c).
Weights y = W x are stored PyTorch-style as W of shape (d_out, d_in).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import Rotary, attend, build_mask, document_ids

GPT2_EOT = 50256  # <|endoftext|>: precedes every document, so it doubles as BOS
GPT2_VOCAB = 50257  # real GPT-2 vocabulary; the model pads its tables to a multiple of 128


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 128
    n_layer: int = 12
    n_head: int = 6
    head_dim: int = 128
    dim: int = 768
    mlp_ratio: int = 4
    max_seq_len: int = 1024  # rotary table length; sequences may not be longer
    value_embeds: int = 3  # tables; each feeds one early and one late block
    logit_softcap: float = 30.0
    attn_scale: float = 0.12
    rope_base: float = 1024.0
    bos_token: int = GPT2_EOT
    document_masking: bool = True  # attention never crosses a BOS boundary
    attention: str = "auto"  # "flex", "sdpa", or "auto" (flex on CUDA, sdpa elsewhere)


PRESETS: dict[str, GPTConfig] = {
    # A few minutes on 2 CPU cores; the 50304-wide head dominates its cost.
    "demo": GPTConfig(n_layer=4, n_head=2, head_dim=64, dim=128, max_seq_len=256, value_embeds=1),
    # GPT-2 small shape, the speedrun model (REFERENCE §4).
    "124m": GPTConfig(max_seq_len=65536),
    "350m": GPTConfig(n_layer=24, n_head=8, head_dim=128, dim=1024, max_seq_len=65536),
    "1.5b": GPTConfig(n_layer=48, n_head=25, head_dim=64, dim=1600, max_seq_len=65536),
}


def rms_norm(x: Tensor) -> Tensor:
    """Weightless RMSNorm over the last dim: x / RMS(x)."""
    return F.rms_norm(x, (x.size(-1),))


def linear(d_in: int, d_out: int, zero: bool = False) -> nn.Linear:
    """Bias-free Linear with W ~ U(-a, a), a = sqrt(3) * 0.5 / sqrt(d_in) (std 0.5/sqrt(d_in)), or W = 0."""
    layer = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        if zero:
            layer.weight.zero_()
        else:
            bound = math.sqrt(3) * 0.5 / math.sqrt(d_in)
            layer.weight.uniform_(-bound, bound)
    return layer


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.scale = cfg.n_head, cfg.head_dim, cfg.attn_scale
        inner = cfg.n_head * cfg.head_dim
        self.q, self.k, self.v = (linear(cfg.dim, inner) for _ in range(3))
        self.o = linear(inner, cfg.dim, zero=True)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x: Tensor, ve: Tensor | None, backend: str, mask) -> Tensor:
        B, T, _ = x.shape
        heads = (B, T, self.n_head, self.head_dim)
        q, k, v = self.q(x).view(heads), self.k(x).view(heads), self.v(x).view(heads)
        q, k = rms_norm(q), rms_norm(k)  # QK-norm: bounded logits whatever the weights' scale
        if ve is not None:
            v = self.value_lambdas[0] * v + self.value_lambdas[1] * ve.view(heads)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = attend(backend, self.rotary(q), self.rotary(k), v, self.scale, mask)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.dim
        self.fc = linear(cfg.dim, hidden)
        self.proj = linear(hidden, cfg.dim, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, backend: str, mask) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(rms_norm(x), ve, backend, mask)
        return x + self.mlp(rms_norm(x))


def is_long_window_layer(i: int, n_layer: int) -> bool:
    """Every fourth layer and the last attend over the long window; the rest over half of it."""
    return i % 4 == 0 or i == n_layer - 1


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_layer < 2:
            raise ValueError(f"n_layer must be >= 2 for the U-net skips, got {cfg.n_layer}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        n_ve = min(cfg.value_embeds, cfg.n_layer // 2)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.dim) for _ in range(n_ve))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        self.lm_head = linear(cfg.dim, cfg.vocab_size, zero=True)

    def value_embedding_layers(self) -> list[int | None]:
        """For each block, the value-embedding table it uses: table j feeds block j and block L-n+j."""
        L, n = self.config.n_layer, len(self.value_embeds)
        return [i if i < n else (i - (L - n) if i >= L - n else None) for i in range(L)]

    def attention_backend(self, device: torch.device) -> str:
        if self.config.attention != "auto":
            return self.config.attention
        return "flex" if device.type == "cuda" else "sdpa"

    def forward(self, idx: Tensor, targets: Tensor | None = None, window: int | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab), or the mean cross-entropy if targets (B, T) given.

        window: the long attention window in tokens (None: full causal); short-window layers use half.
        """
        cfg = self.config
        T = idx.size(1)
        backend = self.attention_backend(idx.device)
        docs = document_ids(idx, cfg.bos_token) if cfg.document_masking else None
        long_mask = build_mask(backend, T, window, docs, idx.device)
        short_mask = long_mask if window is None else build_mask(backend, T, max(1, window // 2), docs,
                                                                 idx.device)
        ves = [table(idx) for table in self.value_embeds]

        x = x0 = rms_norm(self.embed(idx))
        skips: list[Tensor] = []
        n_encoder = cfg.n_layer // 2
        for i, (block, ve_index) in enumerate(zip(self.blocks, self.value_embedding_layers(), strict=True)):
            if i >= cfg.n_layer - n_encoder:
                x = x + self.skip_weights[i - (cfg.n_layer - n_encoder)] * skips.pop()
            ve = None if ve_index is None else ves[ve_index]
            mask = long_mask if is_long_window_layer(i, cfg.n_layer) else short_mask
            x = block(x, x0, ve, backend, mask)
            if i < n_encoder:
                skips.append(x)

        logits = self.lm_head(rms_norm(x)).float()
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self, seq_len: int, window: int | None = None) -> float:
        """Training FLOPs per token: 6 * (matmul parameters) + sum over layers of 6 * 2 * H*D * context.

        Matmul parameters are every Linear weight (blocks and LM head); embeddings are lookups.
        context is the mean number of keys a query sees, (1/T) * sum_t min(t + 1, w), with w the
        layer's window (long, or half of it on short-window layers; T when attention is full causal).
        """
        cfg = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

        def mean_context(w: int) -> float:
            w = min(w, seq_len)
            return w - w * (w - 1) / (2 * seq_len)

        contexts = [mean_context(seq_len if window is None else
                                 (window if is_long_window_layer(i, cfg.n_layer) else max(1, window // 2)))
                    for i in range(cfg.n_layer)]
        return 6 * matmul_params + 6 * 2 * cfg.n_head * cfg.head_dim * sum(contexts)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 vocab_limit: int = GPT2_VOCAB, generator: torch.Generator | None = None) -> Tensor:
        """Sample max_new_tokens tokens after idx (B, T); returns (B, T + max_new_tokens).

        Only ids < vocab_limit are sampled (the table is padded past the tokenizer's vocabulary).
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.max_seq_len:]
            logits = self(context)[:, -1, :vocab_limit] / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx

