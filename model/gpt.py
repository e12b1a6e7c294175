"""The speedrun GPT.

A decoder-only transformer in the shape of the mid-2025 NanoGPT speedrun:
  - token embedding and LM head untied; every residual-stream read goes through a weightless RMSNorm;
  - attention with QK-norm, rotary position embedding, scale 0.12, causal with sliding windows (long
    on some blocks, half as long on the others; token-exact, or in whole 128-token blocks as the
    record) and document masking (see model/attention.py); q, k, v from one stacked weight;
    optionally some blocks have no attention at all (MLP only);
  - value embeddings: extra embedding tables mixed into the attention values of the first and last
    few layers, v <- l0 * v + l1 * ve, with learned (l0, l1); optionally v <- l0 * v elsewhere;
  - every block mixes back the embedding: x <- k0 * x + k1 * x0, with learned (k0, k1) from (1, 0);
  - U-net skips: the first half of the blocks push their outputs, the second half pop them and add
    them back with learned weights (from 1);
  - ReLU^2 MLP (4x width); zero-initialized output projections (attention out, MLP out, LM head);
  - logits soft-capped: z <- c * tanh(z / c), or the record's c * sigmoid(z / (7.5 sqrt(dim))).
Weights y = W x are stored PyTorch-style as W of shape (d_out, d_in), float32. The activations take
the embedding tables' dtype: float32 by default, bf16 after `to_device` on CUDA for the GPU presets.

Calling it (the speedrun loop):
    model = GPT(PRESETS["124m"]).to_device(device)        # bf16 tables on CUDA: no autocast
    compiled = torch.compile(model, dynamic=False)
    window = torch.tensor(1792, dtype=torch.int32, device=device)  # long window, in tokens
    loss = compiled(idx, targets, window=window)           # one graph for every window value
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.tokenizer import EOT, VOCAB_SIZE
from model.attention import (
    BLOCK,
    WINDOW_RULES,
    Rotary,
    attend,
    build_mask,
    document_ids,
    short_window,
    window_blocks,
)

SOFTCAPS = ("tanh", "sigmoid")
CUDA_DTYPES = ("float32", "bfloat16")
ATTENTION_BACKENDS = ("auto", "flex", "sdpa")


@dataclass(frozen=True)
class GPTConfig:
    """The architecture. Defaults are the generic model; PRESETS["124m"] pins the speedrun record's choices.

    vocab_size: embedding and head rows (GPT-2's 50257 padded to a multiple of 128).
    n_layer, n_head, head_dim, dim, mlp_ratio: depth, heads x head width, residual width, MLP width / dim.
    max_seq_len: rotary table length; sequences may not be longer.
    value_embeds: value-embedding tables; table j feeds block j and block n_layer - n + j.
    logit_softcap: c, the bound of the head's soft-cap.
    head_softcap: "tanh": z <- c * tanh(z / c) (range (-c, c), slope 1 at 0);
        "sigmoid": z <- c * sigmoid(z / (s * sqrt(dim))) (range (0, c), slope c / (4 s sqrt(dim)) at 0),
        the record's form (with c = 30, s = 7.5 its slope at 0 is 1/27.7 of tanh's at dim 768).
    sigmoid_softcap_scale: s above (only used by "sigmoid").
    attn_scale: the attention logits' scale, q.k * attn_scale (QK-normed q, k).
    rope_base: rotary base; frequencies span 1 .. 1/rope_base over half of each head.
    bos_token: the token that starts every document.
    document_masking: attention never crosses a BOS boundary.
    attention: "flex", "sdpa", or "auto" (flex on CUDA, sdpa elsewhere).
    window_rule: what a window of w tokens allows (model/attention.py): "token": keys i - w < j <= i;
        "block": keys of the query's 128-token block up to it and of the ceil(w/128) - 1 blocks
        before, short windows half as many blocks (the record's rule, on the GPU presets). The demo
        keeps "token" (it trains with full causal attention, so either rule gives the same model).
    long_window_layers: blocks that attend over the long window; the others over half of it. None:
        every fourth block counted from the first in the first half and from the last in the second
        half (12 layers: 0, 4, 7, 11). An attention-free block listed here has no effect.
    attention_free_layers: blocks with no attention (MLP only): no q/k/v/o, no value lambdas.
    value_lambda_all_layers: True: attention without a value embedding still scales its values,
        v <- l0 * v (the record); False: those blocks use v unchanged. Blocks with a value embedding
        always mix v <- l0 * v + l1 * ve. (l0, l1) start at (0.5, 0.5).
    cuda_dtype: dtype of the embedding tables, hence of the residual stream and every matmul, when
        `to_device` puts the model on CUDA. "bfloat16": the record's (run it without autocast);
        "float32": fp32 tables (run under bf16 autocast). Off CUDA the model stays float32.
    """

    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    head_dim: int = 128
    dim: int = 768
    mlp_ratio: int = 4
    max_seq_len: int = 1024
    value_embeds: int = 3
    logit_softcap: float = 30.0
    head_softcap: str = "tanh"
    sigmoid_softcap_scale: float = 7.5
    attn_scale: float = 0.12
    rope_base: float = 1024.0
    bos_token: int = EOT
    document_masking: bool = True
    attention: str = "auto"
    window_rule: str = "token"
    long_window_layers: tuple[int, ...] | None = None
    attention_free_layers: tuple[int, ...] = ()
    value_lambda_all_layers: bool = False
    cuda_dtype: str = "float32"

    def __post_init__(self):
        for name, allowed in (("head_softcap", SOFTCAPS), ("cuda_dtype", CUDA_DTYPES),
                              ("attention", ATTENTION_BACKENDS), ("window_rule", WINDOW_RULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("long_window_layers", "attention_free_layers"):
            layers = getattr(self, name) or ()
            if any(not 0 <= i < self.n_layer for i in layers):
                raise ValueError(f"GPTConfig.{name} must index blocks 0..{self.n_layer - 1}, got {layers}")
        fed = {i for i, table in enumerate(value_embedding_layers(self)) if table is not None}
        if fed & set(self.attention_free_layers):
            raise ValueError(f"GPTConfig.attention_free_layers {self.attention_free_layers}: blocks "
                             f"{sorted(fed)} take a value embedding, which needs attention")

    def table_dtype(self, device: torch.device | str) -> torch.dtype:
        """The embedding tables' dtype on device, as GPT.to_device stores them: cuda_dtype on CUDA,
        float32 elsewhere."""
        return getattr(torch, self.cuda_dtype) if torch.device(device).type == "cuda" else torch.float32


def value_embedding_layers(cfg: GPTConfig) -> list[int | None]:
    """For each block, the value-embedding table it uses: table j feeds block j and block L-n+j."""
    L, n = cfg.n_layer, min(cfg.value_embeds, cfg.n_layer // 2)
    return [i if i < n else (i - (L - n) if i >= L - n else None) for i in range(L)]


def long_window_layers(cfg: GPTConfig) -> frozenset[int]:
    """The blocks on the long window (see GPTConfig.long_window_layers)."""
    if cfg.long_window_layers is not None:
        return frozenset(cfg.long_window_layers)
    half = cfg.n_layer // 2
    return frozenset(i for i in range(cfg.n_layer) if (i if i < half else cfg.n_layer - 1 - i) % 4 == 0)


# The record's architecture on the GPU presets (2025-07-12 "BosAlign", docs/RECIPE.md): sigmoid head,
# values scaled in every attention block, bf16 tables and residual stream on CUDA, block-granular windows.
RECORD = dict(head_softcap="sigmoid", value_lambda_all_layers=True, cuda_dtype="bfloat16",
              window_rule="block")

PRESETS: dict[str, GPTConfig] = {
    # A few minutes on 2 CPU cores; the 50304-wide head dominates its cost. Kept on the generic
    # architecture (tanh head, fp32): its recipe (lrs, steps) and README's measured result are for it.
    "demo": GPTConfig(n_layer=4, n_head=2, head_dim=64, dim=128, max_seq_len=256, value_embeds=1),
    # GPT-2 small shape, the speedrun model: the record's architecture, layer 7 attention-free.
    "124m": GPTConfig(max_seq_len=65536, long_window_layers=(0, 4, 7, 11), attention_free_layers=(7,),
                      **RECORD),
    # Deeper shapes take the record's head, value scaling and dtypes, which do not depend on depth.
    # They keep attention in every block: the record drops layer 7's at 12 layers, and no measurement
    # says which blocks could go at 24 or 48. Long windows follow the default mirrored rule.
    "350m": GPTConfig(n_layer=24, n_head=8, head_dim=128, dim=1024, max_seq_len=65536, **RECORD),
    "1.5b": GPTConfig(n_layer=48, n_head=25, head_dim=64, dim=1600, max_seq_len=65536, **RECORD),
}


def rms_norm(x: Tensor) -> Tensor:
    """Weightless RMSNorm over the last dim: x / RMS(x)."""
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free y = x W^T in x's dtype: W (d_out, d_in) stays float32 (the optimizer's copy) and is
    cast to x's dtype for the matmul, so a bf16 residual stream gets bf16 matmuls without autocast."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x))


def init_uniform_(weight: Tensor) -> Tensor:
    """W ~ U(-a, a), a = sqrt(3) * 0.5 / sqrt(d_in) (std 0.5/sqrt(d_in)), d_in = W's last dim; in place."""
    bound = math.sqrt(3) * 0.5 / math.sqrt(weight.size(-1))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def linear(d_in: int, d_out: int, zero: bool = False) -> CastedLinear:
    """CastedLinear with W initialized by init_uniform_, or W = 0."""
    layer = CastedLinear(d_in, d_out, bias=False)
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        init_uniform_(layer.weight)
    return layer


class StackedLinear(nn.Module):
    """k Linear maps of one input in one matmul: y = x [W_1; ...; W_k]^T, (..., d_in) -> (..., k * d_out).

    weight (k, d_out, d_in) float32, each W_i initialized by init_uniform_ (std 0.5/sqrt(d_in)), cast
    to x's dtype as one (k * d_out, d_in) matrix: one cast, one GEMM. Output features i * d_out ..
    (i + 1) * d_out - 1 are W_i's. The optimizer sees k matrices (d_out, d_in): optim.param_groups
    gives the weight the role "hidden" (`linear_stack`), and the hidden kind orthogonalizes each
    W_i on its own, scaled by its own (d_out, d_in).
    """

    linear_stack = True  # optim.grouping: the weight is a stack of Linear weights

    def __init__(self, d_in: int, d_out: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(init_uniform_(torch.empty(k, d_out, d_in)))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.flatten(end_dim=1).type_as(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.scale = cfg.n_head, cfg.head_dim, cfg.attn_scale
        self.scale_values = cfg.value_lambda_all_layers
        inner = cfg.n_head * cfg.head_dim
        self.qkv = StackedLinear(cfg.dim, inner, 3)  # W_q, W_k, W_v: one GEMM
        self.o = linear(inner, cfg.dim, zero=True)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x: Tensor, ve: Tensor | None, backend: str, mask) -> Tensor:
        B, T, _ = x.shape
        heads = (B, T, self.n_head, self.head_dim)
        q, k, v = self.qkv(x).view(B, T, 3 * self.n_head, self.head_dim).chunk(3, dim=-2)
        q, k = rms_norm(q), rms_norm(k)  # QK-norm: bounded logits whatever the weights' scale
        if ve is not None:
            v = self.value_lambdas[0] * v + self.value_lambdas[1] * ve.view(heads)
        elif self.scale_values:
            v = self.value_lambdas[0] * v
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
    """x <- k0 * x + k1 * x0; x <- x + attn(norm(x)) (unless attention-free); x <- x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig, attention: bool):
        super().__init__()
        self.attn = CausalSelfAttention(cfg) if attention else None
        self.mlp = MLP(cfg)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, backend: str, mask) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), ve, backend, mask)
        return x + self.mlp(rms_norm(x))


def mean_context(seq_len: int, window: int, rule: str = "token") -> float:
    """Mean number of keys a query sees, causal with a window of w tokens over T tokens, one document.

    "token": (1/T) sum_t min(t + 1, w). "block": (1/T) sum_t (t - s_t + 1), s_t = 128 max(0, m - W + 1)
    the first key of the window of query t in block m = floor(t/128), W = max(1, ceil(w/128)); summed
    per block: n (a - s + 1) + n (n - 1) / 2 over the block's n queries from position a.
    """
    if rule == "token":
        w = min(window, seq_len)
        return w - w * (w - 1) / (2 * seq_len)
    W = int(window_blocks(torch.tensor(window)))
    total = 0
    for m, a in enumerate(range(0, seq_len, BLOCK)):
        n, s = min(BLOCK, seq_len - a), BLOCK * max(0, m - W + 1)
        total += n * (a - s + 1) + n * (n - 1) // 2
    return total / seq_len


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_layer < 2:
            raise ValueError(f"n_layer must be >= 2 for the U-net skips, got {cfg.n_layer}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        n_ve = min(cfg.value_embeds, cfg.n_layer // 2)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.dim) for _ in range(n_ve))
        self.blocks = nn.ModuleList(Block(cfg, attention=i not in cfg.attention_free_layers)
                                    for i in range(cfg.n_layer))
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        self.lm_head = linear(cfg.dim, cfg.vocab_size, zero=True)
        self.long_window = long_window_layers(cfg)

    def value_embedding_layers(self) -> list[int | None]:
        """For each block, the value-embedding table it uses: table j feeds block j and block L-n+j."""
        return value_embedding_layers(self.config)

    def attention_backend(self, device: torch.device) -> str:
        if self.config.attention != "auto":
            return self.config.attention
        return "flex" if device.type == "cuda" else "sdpa"

    def cast_embeddings(self, dtype: torch.dtype) -> "GPT":
        """Store the token and value embedding tables in dtype; returns self.

        The residual stream starts as an embedding lookup, so it, the attention values and every
        matmul (CastedLinear casts its float32 weight to its input's dtype) then run in dtype; the
        scalars (lambdas, skip weights) and Linear weights stay float32; logits and loss are float32.
        """
        for table in (self.embed, *self.value_embeds):
            table.to(dtype)
        return self

    def to_device(self, device: torch.device | str) -> "GPT":
        """Move to device, the embedding tables in config.table_dtype(device) (cuda_dtype on CUDA,
        float32 elsewhere). Returns self.

        With cuda_dtype "bfloat16" the forward runs in bf16 with no autocast (the record's dtypes);
        check `self.embed.weight.dtype` to decide whether to enable autocast (only for float32).
        """
        return self.to(device).cast_embeddings(self.config.table_dtype(device))

    def soft_cap(self, z: Tensor) -> Tensor:
        """The head's soft-cap (GPTConfig.head_softcap), in z's dtype (float32 logits)."""
        cfg = self.config
        if cfg.head_softcap == "sigmoid":
            return cfg.logit_softcap * torch.sigmoid(z / (cfg.sigmoid_softcap_scale * math.sqrt(cfg.dim)))
        return cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                window: Tensor | int | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab) float32, or the mean cross-entropy if targets (B, T).

        window: the long attention window in tokens, applied by config.window_rule (model/attention.py;
        "token": query i sees key j iff 0 <= i - j < window, same document); short-window layers use
        attention.short_window of it. None: full causal attention.
        Pass a 0-dim integer tensor on idx's device (same dtype every call, e.g. int32): under
        torch.compile(dynamic=False) every window value then runs through one graph, since nothing
        reads its value on the host. A Python int works too (eager convenience), but a compiled
        model specializes on it: one graph per distinct int.
        """
        cfg = self.config
        T = idx.size(1)
        backend = self.attention_backend(idx.device)
        docs = document_ids(idx, cfg.bos_token) if cfg.document_masking else None
        if isinstance(window, int):
            if window < 1:
                raise ValueError(f"window must be >= 1 token, got {window}")
            window = torch.tensor(window, device=idx.device)
        rule = cfg.window_rule
        long_mask = build_mask(backend, T, window, docs, idx.device, rule)
        short_mask = long_mask if window is None else build_mask(backend, T, short_window(window, rule), docs,
                                                                 idx.device, rule)
        ves = [table(idx) for table in self.value_embeds]

        x = x0 = rms_norm(self.embed(idx))
        skips: list[Tensor] = []
        n_encoder = cfg.n_layer // 2
        for i, (block, ve_index) in enumerate(zip(self.blocks, self.value_embedding_layers(), strict=True)):
            if i >= cfg.n_layer - n_encoder:
                x = x + self.skip_weights[i - (cfg.n_layer - n_encoder)] * skips.pop()
            ve = None if ve_index is None else ves[ve_index]
            x = block(x, x0, ve, backend, long_mask if i in self.long_window else short_mask)
            if i < n_encoder:
                skips.append(x)

        logits = self.soft_cap(self.lm_head(rms_norm(x)).float())
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self, seq_len: int, window: int | None = None) -> float:
        """Training FLOPs per token: 6 * (matmul params) + sum over attention layers of 6 * 2 * H*D * context.

        Matmul parameters are every Linear and StackedLinear weight (blocks and LM head; none in
        attention-free blocks); embeddings are lookups. context is mean_context(T, w, window_rule), w
        the layer's window (long, or short_window(window) on short-window layers), counted within one
        document (document masking only removes keys); T (full causal) when window is None.
        """
        cfg = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules()
                            if isinstance(m, nn.Linear | StackedLinear))

        rule = cfg.window_rule if window is not None else "token"

        def layer_window(i: int) -> int:
            if window is None:
                return seq_len
            return window if i in self.long_window else int(short_window(torch.tensor(window), rule))

        contexts = [mean_context(seq_len, layer_window(i), rule) for i, block in enumerate(self.blocks)
                    if block.attn is not None]
        return 6 * matmul_params + 6 * 2 * cfg.n_head * cfg.head_dim * sum(contexts)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 vocab_limit: int = VOCAB_SIZE, generator: torch.Generator | None = None) -> Tensor:
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

