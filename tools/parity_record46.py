"""The 2025-11-29 "BatchSizeSchedule" record (#46, records/track_1_short/2025-11-29_BatchSizeSchedule/ in
modded-nanogpt) as a tools.parity reference: its CPU stand-ins and its adapter, `Record20251129`. Line
numbers are those of its log's source (lines 1-1515).

Stand-ins, beyond tools/parity_source.py's common substitutions (each counted in the output):

  - its Triton kernels for Polar Express, `XXT(A, out)` (out = A Aᵀ) and `ba_plus_cAA(A, alpha,
    beta, out)` (out = alpha A Aᵀ + beta A, A square), are `xxt` and `ba_plus_caa` below: the same
    math, products of the bf16 inputs summed in float32 and rounded once to out's dtype, the lower
    triangle mirrored as the kernels store it;
  - FlashAttention-3's `flash_attn_varlen_func` is `flash_attn_varlen_sdpa`: query i sees key j iff
    both lie in one segment of cu_seqlens and 0 <= i - j <= W, W = window_size[0] (W + 1 keys), by
    SDPA under that dense mask. The (T, T) mask is block-diagonal over the segments, so SDPA runs on
    each segment's diagonal block alone: the blocks off the diagonal are all masked, and a (49152)²
    mask would not fit a CPU's memory;
  - its `kernels.get_kernel` and `triton` imports are dropped (the kernels they served are replaced),
    its FP8 head is off by its own switch DISABLE_FP8=1, `device` (line 1261) is the CPU;
  - its `@torch.compile` on `DistAdam.step` (line 695) is kept, inductor on the CPU. Dynamo meets a
    graph break inside the step's loop (the reduce-scatter future's wait) and runs the step eagerly,
    as it does on the GPU: bf16 moments, each operation rounded to bf16 (docs/RECIPE.md).

World size 1 with grad_accum_steps = 8 // 1 = 8 micro-batches (line 1259) reproduces the 8 ranks'
split: its data generator gives rank 0 of 1 the whole step's tokens in 8 sequences of the per-rank
size, and the summed gradient over the 8 (each loss / 8) is what AVG over 8 ranks gives.
"""

import contextlib
import math
import os
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tools.parity_source import StandIns
from tools.parity_table import Entry, Reference, resolve_table

GRAD_ACCUM_STEPS = 8  # line 1268 at world size 1


def mirrored_lower(c: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is c's: tril(c) + tril(c, -1)ᵀ (over the last 2 dims)."""
    return c.tril() + c.tril(-1).mT


def accumulated(A: Tensor) -> Tensor:
    """A in the kernels' float32 accumulator's precision (float64 stays float64: the one-step check's
    reference)."""
    return A.to(torch.promote_types(A.dtype, torch.float32))


def xxt(A: Tensor, out: Tensor) -> Tensor:
    """out <- A Aᵀ, A (..., M, K): float32 sums of A's products, rounded once to out's dtype, exactly
    symmetric (the record's XXT kernel: a float32 accumulator over the blocks on and below the diagonal,
    each stored also transposed)."""
    a = accumulated(A)
    return out.copy_(mirrored_lower(a @ a.mT))


def ba_plus_caa(A: Tensor, alpha: float, beta: float, out: Tensor) -> Tensor:
    """out <- alpha A Aᵀ + beta A, A (..., M, M) symmetric, in float32, rounded once to out's dtype, the
    lower triangle mirrored (the record's ba_plus_cAA kernel; Polar Express calls it with alpha = c,
    beta = b: B = b A + c A²)."""
    a = accumulated(A)
    return out.copy_(mirrored_lower(alpha * (a @ a.mT) + beta * a))


def segment_mask(length: int, window: int) -> Tensor:
    """(L, L) bool: key j allowed for query i iff 0 <= i - j <= window."""
    gap = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    return (gap >= 0) & (gap <= window)


def flash_attn_varlen_sdpa(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, **options) -> Tensor:
    """flash_attn_varlen_func on CPU (module docstring): q, k, v (T, H, D) packed; segment s is tokens
    cu_seqlens[s] .. cu_seqlens[s + 1] - 1 (trailing repeats are empty segments); options causal=True,
    softmax_scale, window_size=(W, 0) (W = -1: unbounded), the record's call (line 873)."""
    scale, (left, right) = options.pop("softmax_scale"), options.pop("window_size", (-1, -1))
    if options.pop("causal", False) is not True or right != 0 or options:
        raise NotImplementedError(f"tools.parity: flash_attn_varlen_func with right window {right}, "
                                  f"options {sorted(options)} (non-causal) has no CPU stand-in")
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("tools.parity: flash_attn_varlen_func with cu_seqlens_q != cu_seqlens_k "
                                  "has no CPU stand-in")
    bounds = cu_seqlens_q.tolist()
    longest = max(b - a for a, b in pairwise(bounds))
    if longest > min(max_seqlen_q, max_seqlen_k):
        raise ValueError(f"tools.parity: a segment of {longest} tokens exceeds max_seqlen {max_seqlen_q}")
    outputs = []
    for start, end in pairwise(bounds):
        if end > start:
            window = end - start if left < 0 else left
            seg = [t[None, start:end].transpose(1, 2) for t in (q, k, v)]  # (1, H, L, D): 3-D takes only
            y = F.scaled_dot_product_attention(*seg, attn_mask=segment_mask(end - start, window),  # math
                                               scale=scale)
            outputs.append(y[0].transpose(0, 1))
    return torch.cat(outputs)


class FlashAttention3OnSdpa:
    """The record's `flash_attn_interface` (line 824) on CPU."""

    flash_attn_varlen_func = staticmethod(flash_attn_varlen_sdpa)


@contextlib.contextmanager
def fp8_disabled():
    """The record's own switch for a bf16 head: DISABLE_FP8 set while its GPT is built (line 945)."""
    before = os.environ.get("DISABLE_FP8")
    os.environ["DISABLE_FP8"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISABLE_FP8"]
        else:
            os.environ["DISABLE_FP8"] = before


class Record20251129(Reference):
    """Record #46's model, optimizers, schedule and data, built and stepped as its main body does."""

    name = "2025-11-29"
    defines = frozenset({"GPT", "NorMuon", "DistAdam", "Hyperparameters", "get_lr", "get_ws", "get_bs",
                         "get_muon_momentum", "step_optimizers", "distributed_data_generator",
                         "polar_express"})
    stand_ins = StandIns(
        "polar_express",  # its first line casts G to bf16 (line 382)
        compiled=frozenset({"DistAdam.step"}),  # @torch.compile (line 695): bf16 moments, float32 math
        gpu_modules=("triton", "kernels"),
        replaced={"XXT": (xxt, "PyTorch X Xᵀ (tools.parity_record46.xxt)"),
                  "ba_plus_cAA": (ba_plus_caa, "PyTorch b A + c A² (tools.parity_record46.ba_plus_caa)")},
        injected={"flash_attn_interface": (FlashAttention3OnSdpa, "FA3 flash_attn_varlen_func -> SDPA with "
                                           "the dense segment and window mask, per segment"),
                  "device": (torch.device("cpu"), 'device = "cpu" (line 1261)'),
                  "grad_accum_steps": (GRAD_ACCUM_STEPS, None)})
    # Record name -> ours, kind[, layout] (our names: model/gpt.py with the #46 options). qkvo_w and
    # scalars are sliced in `entries`.
    rules = [
        ("embed.weight", "embed.weight", "embed"),
        ("value_embeds.{i}.weight", "value_embeds.{i}.weight", "value_embed"),
        ("smear_gate.weight", "smear.gate.weight", "gate"),
        ("blocks.{i}.attn.attn_gate.weight", "blocks.{i}.attn.gate.weight", "gate"),
        ("blocks.{i}.mlp.c_fc", "blocks.{i}.mlp.fc.weight", "hidden", "T"),  # x @ c_fc (line 903)
        ("blocks.{i}.mlp.c_proj", "blocks.{i}.mlp.proj.weight", "hidden"),
        ("lm_head.weight", "lm_head.weight", "head"),
    ]

    def __init__(self, namespace: dict, dim: int, batch_divisor: int = 1, n_layer: int = 12):
        ns = self.ns = namespace
        self.args = ns["args"]
        self.n_layer = n_layer
        self.divide_batches(batch_divisor)
        # Model, lines 1295-1305, at width `dim`: heads of 128 (head_dim), as many as fill the width
        # (its attention needs heads x 128 = dim); embeddings and CastedLinears (head, gates) in bf16.
        with fp8_disabled():
            self.model = ns["GPT"](vocab_size=50257, num_layers=n_layer, num_heads=dim // 128, head_dim=128,
                                   model_dim=dim, max_seq_len=self.args.val_batch_size // GRAD_ACCUM_STEPS)
        for m in self.model.modules():
            if isinstance(m, nn.Embedding | nn.Linear):
                m.bfloat16()
        self.model.train()
        # Optimizers, lines 1310-1330.
        model = self.model
        hidden = [p for n, p in model.blocks.named_parameters()
                  if p.ndim >= 2 and "embed" not in n and "gate" not in n]
        embed = [p for n, p in model.named_parameters() if "embed" in n]
        scalar = [p for p in model.parameters() if p.ndim < 2]
        head = [model.lm_head.weight]
        gate = [p for n, p in model.named_parameters() if "gate" in n]
        self.adam = ns["DistAdam"](scalar + head + embed, lr=0.008, betas=(0.65, 0.95), eps=1e-8,
                                   weight_decay=0.0)
        self.muon = ns["NorMuon"](hidden + gate, lr=0.023, momentum=0.95, beta2=0.95, weight_decay=1.2)
        self.optimizers = [self.adam, self.muon]
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        self.loader, self.batch_size, self.yarn_windows = None, None, None

    def divide_batches(self, divisor: int) -> None:
        """The batch-size schedule (its Hyperparameters, line 1230) over `divisor`: a smaller step for
        the CPU, as a smaller width. Each micro-batch must stay a multiple of 16 tokens (line 856)."""
        sizes = (*self.args.train_bs_schedule, self.args.train_bs_extension)
        if divisor < 1 or any(s % (divisor * GRAD_ACCUM_STEPS * 16) for s in sizes):
            raise SystemExit(f"error: --batch-divisor {divisor}: the record's batch sizes {sizes} must "
                             f"divide into {GRAD_ACCUM_STEPS} micro-batches of a multiple of 16 tokens")
        self.args.train_bs_schedule = tuple(s // divisor for s in self.args.train_bs_schedule)
        self.args.train_bs_extension //= divisor

    # ---- the name table ------------------------------------------------------------------------------

    def table(self, ours: nn.Module) -> list[Entry]:
        return resolve_table(self.rules, self.entries(), self.model, ours)

    def entries(self) -> list[Entry]:
        """qkvo_w (hdim, 4 dim) read as (4, hdim, dim) (lines 862, 879): its first 3 hdim/4 rows are our
        stacked (3, hdim, dim) W_q, W_k, W_v, the last hdim/4 our W_o (dim, hdim); and the scalars."""
        entries = []
        for i, block in enumerate(self.model.blocks):
            if block.attn is not None:
                hdim, dim = block.attn.hdim, block.attn.dim
                name, cut = f"blocks.{i}.attn.qkvo_w", 3 * hdim // 4
                entries += [Entry(name, slice(0, cut), f"blocks.{i}.attn.qkv.weight", "hidden",
                                  (3, hdim, dim)),
                            Entry(name, slice(cut, hdim), f"blocks.{i}.attn.o.weight", "hidden", (hdim, dim))]
        return entries + self.scalar_entries()

    def scalar_entries(self) -> list[Entry]:
        """scalars (lines 949-966; read at 992-996): [0, L) skip weights, of which the forward reads
        [1] (gate of layer 4 into 7, line 1023); [L, 3L) block lambdas, a pair per block, block 0's
        unread (the loop starts at 1, line 1012); [3L, 5L) sa_lambdas, a pair per block, unread for the
        attention-free blocks 0 and 7; [5L] smear, [5L + 1] backout; then padding to a multiple of
        world_size (none at 1)."""
        L = self.n_layer
        entries = [Entry("scalars", slice(0, 1), None, "scalar"),
                   Entry("scalars", slice(1, 2), "skip_weights", "scalar"),
                   Entry("scalars", slice(2, L), None, "scalar")]
        for i, block in enumerate(self.model.blocks):
            entries.append(Entry("scalars", slice(L + 2 * i, L + 2 * i + 2),
                                 f"blocks.{i}.lambdas" if i else None, "scalar"))
            ours = f"blocks.{i}.attn.value_lambdas" if block.attn is not None else None
            entries.append(Entry("scalars", slice(3 * L + 2 * i, 3 * L + 2 * i + 2), ours, "scalar"))
        entries += [Entry("scalars", slice(5 * L, 5 * L + 1), "smear.lambdas", "scalar"),
                    Entry("scalars", slice(5 * L + 1, 5 * L + 2), "backout_lambda", "scalar")]
        total = self.model.scalars.numel()
        if total > 5 * L + 2:
            entries.append(Entry("scalars", slice(5 * L + 2, total), None, "scalar"))
        return entries

    # ---- a training step -------------------------------------------------------------------------------

    def open_data(self, pattern: str, step: int) -> None:
        """Its data generator on the shards matching `pattern` (line 1447), BOS-aligned, at step's batch."""
        self.batch_size = self.ns["get_bs"](step)
        self.loader = self.ns["distributed_data_generator"](
            pattern, self.batch_size, self.args.train_max_seq_len, grad_accum_steps=GRAD_ACCUM_STEPS)

    def batches(self, step: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Lines 1496-1504: step's 8 micro-batches (inputs int32, targets int64, cu_seqlens int32), a
        new batch size sent to the generator with each when get_bs(step) changes."""
        size = self.ns["get_bs"](step)
        send = (size, self.args.train_max_seq_len, GRAD_ACCUM_STEPS) if size != self.batch_size else None
        self.batch_size = size
        try:
            return [self.loader.send(send) for _ in range(GRAD_ACCUM_STEPS)]
        except TypeError as error:  # its preloader found no next shard: `tokens, finder = None`
            raise SystemExit(f"error: --data: the record's data generator ran out of shards at step {step} "
                             f"({error}); give it more tokens or pass a larger --batch-divisor") from None

    def follow_yarn(self, step: int) -> None:
        """Lines 1454-1460: YaRN applied at each change of the long window from get_ws(0)'s, in order, as
        the record has done by `step` (from a reset, line 1435, when the path differs)."""
        path = [self.ns["get_ws"](0)[1]]
        for s in range(1, step + 1):
            if self.ns["get_ws"](s)[1] != path[-1]:
                path.append(self.ns["get_ws"](s)[1])
        if path != self.yarn_windows:
            self.model.yarn.reset()
            for old, new in pairwise(path):
                self.model.yarn.apply(old, new)
            self.yarn_windows = path

    def forward_backward(self, micro_batches: list[tuple[Tensor, Tensor, Tensor]], step: int) -> float:
        """Lines 1499-1505: each micro-batch's summed loss / 8, backward; DistAdam's gradient sync on the
        last micro-batch of an odd step. Returns the step's summed loss."""
        ws_short, ws_long = self.ns["get_ws"](step)
        self.follow_yarn(step)
        total = 0.0
        for idx, (inputs, targets, cu_seqlens) in enumerate(micro_batches):
            if idx == len(micro_batches) - 1 and step % 2 == 1:
                self.adam.should_sync = True
            loss = self.model(inputs, targets, cu_seqlens, ws_short, ws_long)
            (loss / GRAD_ACCUM_STEPS).backward()
            total += loss.item()
        return total

    @torch.no_grad()
    def float_loss(self, micro_batches: list[tuple[Tensor, Tensor, Tensor]], step: int) -> float:
        """The same micro-batches' cross-entropy summed in float32: its forward in eval mode, where it
        takes float32 logits and a mean (lines 1037-1041); nothing else in its forward reads the mode
        but FA3's max_seqlen, a bound, and the FP8 head, off. Its training loss, a bf16 sum, resolves
        only 2^-8 of the loss."""
        ws_short, ws_long = self.ns["get_ws"](step)
        self.follow_yarn(step)
        self.model.eval()
        try:
            return sum(self.model(inputs, targets, cu_seqlens, ws_short, ws_long).item() * targets.numel()
                       for inputs, targets, cu_seqlens in micro_batches)
        finally:
            self.model.train()

    def step(self, step: int) -> None:
        """Line 1506: its step_optimizers (lr, momentum; NorMuon every step, DistAdam on odd steps)."""
        self.ns["step_optimizers"](step, self.optimizers, self.model)

    def fresh_state(self) -> None:
        """Optimizers as built (DistAdam's bf16 moments at 0, lines 661-665; NorMuon's buffers unmade),
        no gradients, no pending sync."""
        for state in self.adam.state.values():
            state.update(step=0, exp_avg=torch.zeros_like(state["exp_avg"]),
                         exp_avg_sq=torch.zeros_like(state["exp_avg_sq"]))
        self.adam.should_sync = False
        self.adam._reduce_scatter_futures.clear()
        for group in self.muon.param_groups:
            group.pop("momentum_buffer", None)
            group.pop("second_momentum_buffer", None)
        self.model.zero_grad(set_to_none=True)

    def set_ns_dtype(self, dtype: torch.dtype) -> None:
        self.ns["NS_DTYPE"] = dtype

    def store_float32(self) -> None:
        """A diagnostic, no longer the record: its CastedLinears (head, smear and attention gates, bf16
        from line 1305) and DistAdam's moments (bf16, line 663) in float32, as ours kept them before the
        preset took the record's bf16 storage; the embeddings stay bf16. The parameters stay the
        optimizers' (converted in place)."""
        for m in self.model.modules():
            if isinstance(m, nn.Linear):
                m.float()
        for state in self.adam.state.values():
            state.update(exp_avg=state["exp_avg"].float(), exp_avg_sq=state["exp_avg_sq"].float())


def per_token(total: float, micro_batches: list[tuple[Tensor, Tensor, Tensor]]) -> float:
    return total / sum(targets.numel() for _, targets, _ in micro_batches)


ZERO_HEAD_LOSS = math.log(50304)  # cross-entropy of uniform logits over the padded vocabulary
