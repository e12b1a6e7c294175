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
  - in training on H100, the LM head's matmul in FP8 with the record's fixed scales (model/fp8.py).
Options from the later records (GPTConfig, all off by default): blocks without an MLP or without both
sublayers, smear, a sigmoid gate per attention head, backout, chosen sigmoid-gated skips, lambdas from
1.1, YaRN (frequencies and attention scale rescaled as the window grows).
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
    YarnRotary,
    attend,
    build_mask,
    document_ids,
    short_window,
    window_blocks,
)
from model.fp8 import WEIGHT_SCALES, fp8_head, why_no_fp8

SOFTCAPS = ("tanh", "sigmoid", "sigmoid_unscaled")
SKIP_GATES = {"linear": 1.0, "sigmoid": -1.5}  # the gate g(w) and w's initial value
CUDA_DTYPES = ("float32", "bfloat16")
ATTENTION_BACKENDS = ("auto", "flex", "sdpa")
HEAD_MATMULS = ("auto", "fp8", "bf16")
TRAIN_LOSSES = ("mean_fp32", "sum_bf16")
SOFTCAP_DTYPES = ("float32", "head")


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
        the record's form (with c = 30, s = 7.5 its slope at 0 is 1/27.7 of tanh's at dim 768);
        "sigmoid_unscaled": z <- c * sigmoid(z / s), the form of records #28 on (#46 included).
    sigmoid_softcap_scale: s above (only used by the sigmoid forms).
    attn_scale: the attention logits' scale, q.k * attn_scale (QK-normed q, k).
    rope_base: rotary base; frequencies span 1 .. 1/rope_base over half of each head.
    bos_token: the token that starts every document.
    document_masking: attention never crosses a BOS boundary.
    attention: "flex", "sdpa", or "auto" (flex on CUDA, sdpa elsewhere).
    window_rule: what a window of w tokens allows (model/attention.py): "token": keys i - w < j <= i;
        "block": keys of the query's 128-token block up to it and of the ceil(w/128) - 1 blocks
        before, short windows half as many blocks (the record's rule, on the GPU presets); "varlen":
        keys i - w <= j <= i (w + 1 keys), short windows 128 * ((w // 128) // 2), record #46's FA3
        varlen window. The demo keeps "token" (it trains with full causal attention, so every rule
        gives the same model).
    long_window_layers: blocks that attend over the long window; the others over half of it. None:
        every fourth block counted from the first in the first half and from the last in the second
        half (12 layers: 0, 4, 7, 11). An attention-free block listed here has no effect.
    attention_free_layers: blocks with no attention (MLP only): no q/k/v/o, no value lambdas, no value
        embedding (a table listed for such a block feeds only its other block; the record's block 0).
    mlp_free_layers: blocks with no MLP (attention only): no fc/proj (record #30 drops block 0's). A
        block in both lists is the identity: no parameters at all, not even its lambdas (#35, block 0).
    value_lambda_all_layers: True: attention without a value embedding still scales its values,
        v <- l0 * v (the record); False: those blocks use v unchanged. Blocks with a value embedding
        always mix v <- l0 * v + l1 * ve. (l0, l1) start at (0.5, 0.5).
    cuda_dtype: dtype of the embedding tables, hence of the residual stream and every matmul, when
        `to_device` puts the model on CUDA. "bfloat16": the record's (run it without autocast);
        "float32": fp32 tables (run under bf16 autocast). Off CUDA the model stays float32.
    head_gate_dtype: dtype the LM head's and the smear and attention gates' weights are stored in when
        `to_device` puts the model on CUDA (GPT.cast_storage); the other matrices and the scalars stay
        float32. "bfloat16": record #46's (it casts every nn.Linear, which are these, to bf16): the
        weights, their gradients and, with optim.Muon's state_dtype "param", their NorMuon state are
        bf16, each update rounded to bf16; "float32": each cast to bf16 for its matmul only. Off CUDA
        they stay float32. Either way the forward's matmuls take the same bf16 operands.
    head_matmul: the LM head's matmul in training (evaluation always takes "bf16"). "fp8": the
        record's FP8 matmul with its fixed scales (model/fp8.py), on a device that has one, else an
        error; "bf16": CastedLinear, in the input's dtype (bf16 on the GPU presets, float32 on CPU);
        "auto": fp8 on CUDA GPUs with FP8 tensor cores (compute capability 8.9+, e.g. H100), else bf16.
    fp8_weight_scale: s_w, the FP8 head's weight scale (model/fp8.py WEIGHT_SCALES): the 2025-07-12
        record's 24/448 (|W| up to 24), or record #46's 2^-9 (|W| up to 0.875, 27x finer below).
    train_loss: the loss forward returns in training mode. "mean_fp32": the mean cross-entropy of
        float32 logits (soft-capped in float32). "sum_bf16" (record #37 on): logits rounded to bf16,
        soft-capped and cross-entropy taken in bf16, summed over the B*T tokens: a bf16 scalar, B*T
        times the mean, whose gradients are B*T times the mean's (docs/MATH.md §4.8: Adam's and
        Newton-Schulz's eps then act as the records'; the FP8 head's s_g is the records' 1/448).
        Evaluation (model.eval()) always returns the float32 mean.
    softcap_dtype: where the float32 logits (evaluation, the "mean_fp32" loss, no targets) are
        soft-capped. "float32": the head's output cast to float32, then soft-capped (the 2025-07-12
        record). "head": soft-capped in the head's output dtype (bf16 when the residual stream is bf16),
        then cast to float32 (record #46, which soft-caps in bf16 in training and evaluation alike):
        each logit then carries the bf16 rounding of the cap, ~2^-9 of it.
    gate_dims: g, how many leading residual dims feed the smear and attention gates (the record's 12).
    smear: token embeddings mixed one position forward (record #34), before the first norm:
        e_t <- e_t + lambda * sigmoid(w . e_t[:g]) * e_{t-1} for t >= 1, e_0 unchanged; w (1, g) and
        lambda start at 0. Along the whole row, as the record's packed stream: a BOS token picks up the
        previous document's last token.
    attn_gate: each head's attention output times sigmoid(W_g x[:g]) before the output projection,
        x the attention's (normed) input, W_g (n_head, g) from 0 (record #28's sparse attention gate).
    backout_layer: b: before the final norm, x <- x - lambda_b * x_b, x_b the residual after block b,
        lambda_b from 0.5 (record #40 "backout", b = 8). None: no backout.
    skips: (source, target) block pairs, one per target: block source's output, times the pair's
        gate, is added to the residual before block target. None: the U-net, pair k = (n - 1 - k,
        L - n + k) for k < n = L // 2 (the first half pushed, the second half popping them).
    skip_gate: the pair's gate from its weight w: "linear" w, from 1; "sigmoid" sigmoid(w), from
        w = -1.5 (sigmoid 0.18), record #32's gating.
    block_lambda_init: k0's start in x <- k0 * x + k1 * x0: 1, or 1.1 (record #45's exponential-decay
        init: the output of block i reaches the head scaled by 1.1 per block after it).
    yarn: YaRN (record #31): `GPT.extend_yarn(old, new)` at each long-window change rescales the
        rotary frequencies and the attention scale (model/attention.py YarnRotary), which then starts
        at attn_scale; `GPT.reset_yarn()` restores both. False: fixed frequencies and scale.
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
    head_gate_dtype: str = "float32"
    head_matmul: str = "bf16"
    fp8_weight_scale: float = WEIGHT_SCALES["2025-07-12"]
    train_loss: str = "mean_fp32"
    softcap_dtype: str = "float32"
    mlp_free_layers: tuple[int, ...] = ()
    gate_dims: int = 12
    smear: bool = False
    attn_gate: bool = False
    backout_layer: int | None = None
    skips: tuple[tuple[int, int], ...] | None = None
    skip_gate: str = "linear"
    block_lambda_init: float = 1.0
    yarn: bool = False

    def __post_init__(self):
        for name, allowed in (("head_softcap", SOFTCAPS), ("cuda_dtype", CUDA_DTYPES),
                              ("head_gate_dtype", CUDA_DTYPES),
                              ("attention", ATTENTION_BACKENDS), ("head_matmul", HEAD_MATMULS),
                              ("train_loss", TRAIN_LOSSES), ("softcap_dtype", SOFTCAP_DTYPES),
                              ("window_rule", WINDOW_RULES), ("skip_gate", tuple(SKIP_GATES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("long_window_layers", "attention_free_layers", "mlp_free_layers"):
            layers = getattr(self, name) or ()
            if any(not 0 <= i < self.n_layer for i in layers):
                raise ValueError(f"GPTConfig.{name} must index blocks 0..{self.n_layer - 1}, got {layers}")
        if self.backout_layer is not None and not 0 <= self.backout_layer < self.n_layer:
            raise ValueError(f"GPTConfig.backout_layer must index a block 0..{self.n_layer - 1}, "
                             f"got {self.backout_layer}")
        pairs = skip_pairs(self)
        targets = [t for _, t in pairs]
        if any(not 0 <= s < t < self.n_layer for s, t in pairs) or len(set(targets)) < len(targets):
            raise ValueError(f"GPTConfig.skips must be (source, target) pairs, 0 <= source < target < "
                             f"{self.n_layer}, one per target, got {self.skips}")
        unfed = set(range(value_embed_tables(self))) - set(value_embedding_layers(self))
        if unfed:
            raise ValueError(f"GPTConfig.attention_free_layers {self.attention_free_layers}: value "
                             f"embedding tables {sorted(unfed)} would feed no block")

    def table_dtype(self, device: torch.device | str) -> torch.dtype:
        """The embedding tables' dtype on device, as GPT.to_device stores them: cuda_dtype on CUDA,
        float32 elsewhere."""
        return getattr(torch, self.cuda_dtype) if torch.device(device).type == "cuda" else torch.float32

    def head_gate_storage(self, device: torch.device | str) -> torch.dtype:
        """The LM head's and the gates' weight dtype on device, as GPT.cast_storage stores them:
        head_gate_dtype on CUDA, float32 elsewhere."""
        return getattr(torch, self.head_gate_dtype) if torch.device(device).type == "cuda" else torch.float32


def value_embed_tables(cfg: GPTConfig) -> int:
    """n, the number of value-embedding tables: value_embeds, at most half the blocks."""
    return min(cfg.value_embeds, cfg.n_layer // 2)


def value_embedding_layers(cfg: GPTConfig) -> list[int | None]:
    """For each block, the value-embedding table it uses: table j feeds block j and block L-n+j,
    unless that block is attention-free."""
    L, n = cfg.n_layer, value_embed_tables(cfg)
    tables = [i if i < n else (i - (L - n) if i >= L - n else None) for i in range(L)]
    return [None if i in cfg.attention_free_layers else table for i, table in enumerate(tables)]


def skip_pairs(cfg: GPTConfig) -> tuple[tuple[int, int], ...]:
    """The (source, target) skip connections (GPTConfig.skips); the U-net's when skips is None."""
    if cfg.skips is not None:
        return tuple(tuple(pair) for pair in cfg.skips)
    L, n = cfg.n_layer, cfg.n_layer // 2
    return tuple((n - 1 - k, L - n + k) for k in range(n))


def long_window_layers(cfg: GPTConfig) -> frozenset[int]:
    """The blocks on the long window (see GPTConfig.long_window_layers)."""
    if cfg.long_window_layers is not None:
        return frozenset(cfg.long_window_layers)
    half = cfg.n_layer // 2
    return frozenset(i for i in range(cfg.n_layer) if (i if i < half else cfg.n_layer - 1 - i) % 4 == 0)


# The record's architecture on the GPU presets (2025-07-12 "BosAlign", docs/RECIPE.md): sigmoid head,
# values scaled in every attention block, bf16 tables and residual stream on CUDA, FP8 head on H100,
# block-granular windows.
RECORD = dict(head_softcap="sigmoid", value_lambda_all_layers=True, cuda_dtype="bfloat16", head_matmul="auto",
              window_rule="block")

PRESETS: dict[str, GPTConfig] = {
    # A few minutes on 2 CPU cores; the 50304-wide head dominates its cost. Kept on the generic
    # architecture (tanh head, fp32): its recipe (lrs, steps) and README's measured result are for it.
    "demo": GPTConfig(n_layer=4, n_head=2, head_dim=64, dim=128, max_seq_len=256, value_embeds=1),
    # GPT-2 small shape, the speedrun model: the record's architecture, layer 7 attention-free.
    "124m": GPTConfig(max_seq_len=65536, long_window_layers=(0, 4, 7, 11), attention_free_layers=(7,),
                      **RECORD),
    # GPT-2 small shape as record #46 (2025-11-29, docs/RECIPE.md): block 0 empty, block 7 MLP only, long
    # windows on blocks 4 and 11, smear and attention gates on the first 12 dims, one gated skip 4 -> 7,
    # backout of block 8, lambdas from 1.1, YaRN from attention scale 0.1, head 30 sigmoid(z / 7.5),
    # FA3 varlen's token-exact windows of W + 1 keys, the FP8 head's weight scale 2^-9, the bf16
    # training loss summed over each GPU's tokens (docs/MATH.md 4.8), head and gate weights stored in bf16.
    "124m-46": GPTConfig(max_seq_len=262144, long_window_layers=(4, 11), attention_free_layers=(0, 7),
                         mlp_free_layers=(0,), smear=True, attn_gate=True, backout_layer=8, skips=((4, 7),),
                         skip_gate="sigmoid", block_lambda_init=1.1, yarn=True, attn_scale=0.1,
                         fp8_weight_scale=WEIGHT_SCALES["2025-11-29"], train_loss="sum_bf16",
                         softcap_dtype="head", head_gate_dtype="bfloat16",
                         **RECORD | dict(head_softcap="sigmoid_unscaled", window_rule="varlen")),
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
    """Bias-free y = x W^T in x's dtype: W (d_out, d_in), float32 (the optimizer's copy; bf16 for the head
    and gates under GPTConfig.head_gate_dtype on CUDA), is cast to x's dtype for the matmul, so a bf16
    residual stream gets bf16 matmuls without autocast."""

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


class LMHead(CastedLinear):
    """The LM head, zero-initialized: CastedLinear, or in training the record's FP8 matmul (model/fp8.py,
    bf16 logits) where GPTConfig.head_matmul takes fp8. The choice lives in this module's forward, so
    hooks on it (FSDP's all-gather of the weight) run either way."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.zeros_(self.weight)
        self.choice = cfg.head_matmul
        self.fp8_scaling = dict(w_s=cfg.fp8_weight_scale, summed=cfg.train_loss == "sum_bf16")

    def matmul(self, device: torch.device) -> str:
        """The matmul in training on device, "fp8" or "bf16" (GPTConfig.head_matmul). "auto" takes fp8
        only on CUDA: a CPU's _scaled_mm has no FP8 units, it is there to test the numerics."""
        if self.choice == "auto":
            return "fp8" if device.type == "cuda" and why_no_fp8(device) is None else "bf16"
        if self.choice == "fp8" and (why_not := why_no_fp8(device)):
            raise ValueError(f"GPTConfig.head_matmul 'fp8': {why_not}; use 'auto' or 'bf16'")
        return self.choice

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.matmul(x.device) == "fp8":
            return fp8_head(x, self.weight, **self.fp8_scaling)
        return super().forward(x)


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
        self.rotary = (YarnRotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, cfg.attn_scale) if cfg.yarn
                       else Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base))
        self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))
        self.gate = linear(cfg.gate_dims, cfg.n_head, zero=True) if cfg.attn_gate else None

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
        if isinstance(self.rotary, YarnRotary):  # the scale is a buffer: q.k * s, s folded into q
            y = attend(backend, self.rotary(q, self.rotary.attn_scale), self.rotary(k), v, 1.0, mask)
        else:
            y = attend(backend, self.rotary(q), self.rotary(k), v, self.scale, mask)
        y = y.transpose(1, 2)  # (B, T, H, D)
        if self.gate is not None:  # head h times sigmoid(W_g x[:g])_h
            y = y * torch.sigmoid(self.gate(x[..., :self.gate.in_features]))[..., None]
        return self.o(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.dim
        self.fc = linear(cfg.dim, hidden)
        self.proj = linear(hidden, cfg.dim, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    """x <- k0 * x + k1 * x0; x <- x + attn(norm(x)) (unless attention-free); x <- x + mlp(norm(x))
    (unless MLP-free). With neither sublayer: the identity, without parameters ((k0, k1) included)."""

    def __init__(self, cfg: GPTConfig, attention: bool, mlp: bool = True):
        super().__init__()
        self.attn = CausalSelfAttention(cfg) if attention else None
        self.mlp = MLP(cfg) if mlp else None
        self.lambdas = nn.Parameter(torch.tensor([cfg.block_lambda_init, 0.0])) if attention or mlp else None

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, backend: str, mask) -> Tensor:
        if self.lambdas is None:
            return x
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), ve, backend, mask)
        if self.mlp is not None:
            x = x + self.mlp(rms_norm(x))
        return x


class Smear(nn.Module):
    """e_t <- e_t + lambda * sigmoid(w . e_t[:g]) * e_{t-1} along T for t >= 1; e_0 unchanged.

    e (B, T, dim); w (1, g) a zero-initialized CastedLinear (a Muon matrix), lambda a (1,) scalar
    from 0, so the map starts as the identity. The gate reads the current token, the term adds the
    previous one, whatever document it belongs to (GPTConfig.smear)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = linear(cfg.gate_dims, 1, zero=True)
        self.lambdas = nn.Parameter(torch.zeros(1))

    def forward(self, e: Tensor) -> Tensor:
        gate = self.lambdas[0] * torch.sigmoid(self.gate(e[:, 1:, :self.gate.in_features]))
        return torch.cat([e[:, :1], e[:, 1:] + gate * e[:, :-1]], dim=1)


def mean_context(seq_len: int, window: int, rule: str = "token") -> float:
    """Mean number of keys a query sees, causal with a window of w tokens over T tokens, one document.

    "token": (1/T) sum_t min(t + 1, w); "varlen" the same with w + 1. "block": (1/T) sum_t
    (t - s_t + 1), s_t = 128 max(0, m - W + 1) the first key of the window of query t in block
    m = floor(t/128), W = max(1, ceil(w/128)); summed per block: n (a - s + 1) + n (n - 1) / 2 over
    the block's n queries from position a.
    """
    if rule != "block":
        w = min(window + (rule == "varlen"), seq_len)  # "varlen" sees w + 1 keys
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
        self.smear = Smear(cfg) if cfg.smear else None
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.dim)
                                          for _ in range(value_embed_tables(cfg)))
        self.blocks = nn.ModuleList(Block(cfg, attention=i not in cfg.attention_free_layers,
                                          mlp=i not in cfg.mlp_free_layers) for i in range(cfg.n_layer))
        pairs = skip_pairs(cfg)
        self.skip_weights = nn.Parameter(torch.full((len(pairs),), SKIP_GATES[cfg.skip_gate]))
        self.skip_into = {target: (k, source) for k, (source, target) in enumerate(pairs)}
        self.skip_sources = frozenset(source for source, _ in pairs)
        self.backout_lambda = nn.Parameter(torch.tensor([0.5])) if cfg.backout_layer is not None else None
        self.lm_head = LMHead(cfg)
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

    def head_and_gates(self) -> list[nn.Module]:
        """The LM head and the smear and attention gates: the CastedLinears head_gate_dtype stores."""
        gates = [m.gate for m in self.modules()
                 if isinstance(m, Smear | CausalSelfAttention) and m.gate is not None]
        return [self.lm_head, *gates]

    def cast_storage(self, device: torch.device | str) -> "GPT":
        """Store the weights in their dtypes on `device` (on this device or not): the embedding tables in
        config.table_dtype(device), the head and gates in config.head_gate_storage(device), the rest
        float32. Returns self."""
        for module in self.head_and_gates():
            module.to(self.config.head_gate_storage(device))
        return self.cast_embeddings(self.config.table_dtype(device))

    def to_device(self, device: torch.device | str) -> "GPT":
        """Move to device, the weights in their dtypes there (cast_storage: on CUDA the tables in
        cuda_dtype, the head and gates in head_gate_dtype; float32 elsewhere). Returns self.

        With cuda_dtype "bfloat16" the forward runs in bf16 with no autocast (the record's dtypes);
        check `self.embed.weight.dtype` to decide whether to enable autocast (only for float32).
        """
        return self.to(device).cast_storage(device)

    def soft_cap(self, z: Tensor) -> Tensor:
        """The head's soft-cap (GPTConfig.head_softcap), in z's dtype (float32 logits, or bf16 for the
        "sum_bf16" training loss)."""
        cfg = self.config
        if cfg.head_softcap == "sigmoid":
            return cfg.logit_softcap * torch.sigmoid(z / (cfg.sigmoid_softcap_scale * math.sqrt(cfg.dim)))
        if cfg.head_softcap == "sigmoid_unscaled":
            return cfg.logit_softcap * torch.sigmoid(z / cfg.sigmoid_softcap_scale)
        return cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)

    def yarn_rotaries(self) -> list[YarnRotary]:
        """The attention layers' YaRN rotaries (GPTConfig.yarn); an error without them."""
        rotaries = [m for m in self.modules() if isinstance(m, YarnRotary)]
        if not rotaries:
            raise ValueError("GPT.extend_yarn/reset_yarn need GPTConfig.yarn=True and a block with attention")
        return rotaries

    def extend_yarn(self, old_window: int, new_window: int) -> None:
        """YaRN for a long window grown from old_window to new_window tokens, in every attention layer
        (model/attention.py YarnRotary.extend: frequencies and attention scale, in place)."""
        for rotary in self.yarn_rotaries():
            rotary.extend(old_window, new_window)

    def reset_yarn(self) -> None:
        """Every attention layer back to its base rotary frequencies and attention scale."""
        for rotary in self.yarn_rotaries():
            rotary.reset()

    def skip_gate(self, k: int) -> Tensor:
        """Skip pair k's gate from its weight w: w ("linear") or sigmoid(w) ("sigmoid")."""
        w = self.skip_weights[k]
        return torch.sigmoid(w) if self.config.skip_gate == "sigmoid" else w

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                window: Tensor | int | None = None, short: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab) float32, or if targets (B, T) the cross-entropy:
        in training its mean or bf16 sum over the B*T tokens (GPTConfig.train_loss), else its mean.

        window: the long attention window in tokens, applied by config.window_rule (model/attention.py;
        "token": query i sees key j iff 0 <= i - j < window, same document); short-window layers use
        attention.short_window of it, or `short` (a 0-dim tensor, tokens) where given (record #46's
        final validation: short 768, long 2560). None: full causal attention.
        Pass a 0-dim integer tensor on idx's device (same dtype every call, e.g. int32): under
        torch.compile(dynamic=False) every window value then runs through one graph, since nothing
        reads its value on the host. A Python int works too (eager convenience), but a compiled
        model specializes on it: one graph per distinct int.
        """
        z = self.lm_head(rms_norm(self.residual(idx, window, short)))
        if targets is not None and self.training and self.config.train_loss == "sum_bf16":
            logits = self.soft_cap(z.bfloat16())
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        float32 = self.config.softcap_dtype == "float32"
        logits = self.soft_cap(z.float()) if float32 else self.soft_cap(z).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def residual(self, idx: Tensor, window: Tensor | int | None = None,
                 short: Tensor | None = None) -> Tensor:
        """idx (B, T) -> the residual stream (B, T, dim) the head reads (before its norm): embedding
        (smeared, normed), the blocks with their skips, the backout. window, short as in forward."""
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
        if window is not None and short is None:
            short = short_window(window, rule)
        short_mask = long_mask if window is None else build_mask(backend, T, short, docs, idx.device, rule)
        ves = [table(idx) for table in self.value_embeds]

        x = self.embed(idx)
        if self.smear is not None:
            x = self.smear(x)
        x = x0 = rms_norm(x)
        saved: dict[int, Tensor] = {}
        for i, (block, ve_index) in enumerate(zip(self.blocks, self.value_embedding_layers(), strict=True)):
            if i in self.skip_into:
                k, source = self.skip_into[i]
                x = x + self.skip_gate(k) * saved[source]
            ve = None if ve_index is None else ves[ve_index]
            x = block(x, x0, ve, backend, long_mask if i in self.long_window else short_mask)
            if i in self.skip_sources:
                saved[i] = x
            if i == cfg.backout_layer:
                backout = x
        if self.backout_lambda is not None:
            x = x - self.backout_lambda[0] * backout
        return x

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

