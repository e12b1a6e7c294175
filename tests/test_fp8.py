"""model/fp8.py: the LM head's FP8 matmul against an emulated FP8 reference (float8 casts, float64
matmuls), the bound its formats and the record's scales imply, and GPTConfig.head_matmul's selection.

torch 2.13 (and 2.11) run torch._scaled_mm on CPU, so the op itself is tested here; a torch without
it skips those tests (why_no_fp8 says why)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_GPT2, random_gpt
from torch._dynamo.testing import CompileCounterWithBackend

import model.fp8 as fp8
from model import GPT, GPTConfig
from model.fp8 import fp8_head, why_no_fp8

CPU = torch.device("cpu")
# A small vocabulary: CPU's _scaled_mm is a slow reference kernel (6 s for a 64 x 16 x 50304 product).
TINY = dataclasses.replace(TINY_GPT2, vocab_size=256)
needs_cpu_fp8 = pytest.mark.skipif(why_no_fp8(CPU) is not None, reason=str(why_no_fp8(CPU)))
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
M, K, N = 96, 128, 160  # rows (tokens), dim, vocab
# The record's scales (its lm_head: x_s = sqrt(768)/448, w_s = 24/448, grad_s = 1/448 on a summed
# loss), written out here rather than read from model/fp8.py; ours divides grad_s by the M rows.
X_S, W_S, G_S = math.sqrt(K) / 448, 24 / 448, 1 / (448 * M)
BF16_ROUNDING = 2.0**-8  # bf16 keeps 8 significant bits: round-to-nearest is within 2^-8 relative


def emulate(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """t cast to dtype at scale and back, in float64: what the matmul multiplies."""
    return (t.float() / scale).to(dtype).double() * scale


def rounding(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The most the cast to dtype at scale can move each element of t (no value reaches the format's
    largest): half an ulp, eps/2 relative for a normal value (2^-4 for e4m3's 3 mantissa bits, 2^-3 for
    e5m2's 2), and half the subnormal spacing, smallest_normal * eps/2, below the normal range."""
    info = torch.finfo(dtype)
    return torch.maximum(t.double().abs() * info.eps / 2,
                         torch.full_like(t, info.smallest_normal * info.eps / 2, dtype=torch.float64) * scale)


def product_error(a: torch.Tensor, da: torch.Tensor, b: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """Bound on |â b̂ - a b| (matrix products) when |â - a| <= da and |b̂ - b| <= db elementwise:
    da |b| + |a| db + da db."""
    return da @ b.abs() + a.abs() @ db + da @ db


def accumulation(a_hat: torch.Tensor, b_hat: torch.Tensor, inner: int, rounding_out: float) -> torch.Tensor:
    """The float32 sum of `inner` exact products (relative error <= inner * 2^-24 of sum |terms|) and the
    output's final rounding, both bounded by |â| |b̂| times their relative size."""
    return (inner * 2.0**-24 + rounding_out) * (a_hat.abs() @ b_hat.abs())


@pytest.fixture
def operands():
    """x: RMS-normed rows in bf16 (as the head gets them on CUDA); W float32 with entries up to ~1;
    dy: the gradient of a mean over the M rows, softmax-sized."""
    torch.manual_seed(0)
    x = F.rms_norm(torch.randn(M, K), (K,)).bfloat16().requires_grad_()
    w = (0.3 * torch.randn(N, K)).requires_grad_()
    dy = torch.randn(M, N) * 0.03 / M
    return x, w, dy


def run_head(x, w, dy):
    """fp8_head's y, and its dx, dW for the upstream gradient dy."""
    y = fp8_head(x, w)
    y.backward(dy.to(y.dtype))
    return y, x.grad, w.grad


@needs_cpu_fp8
def test_output_and_gradients_match_the_emulated_fp8_reference(operands):
    x, w, dy = operands
    y, dx, dw = run_head(x, w, dy)
    x_hat, w_hat, g_hat = emulate(x, X_S, E4M3), emulate(w, W_S, E4M3), emulate(dy.bfloat16(), G_S, E5M2)
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    # Same float8 operands: what is left is the float32 sum and the output's rounding (bf16 for y and
    # dx, float32 for dW). The wrong format, scale or transpose anywhere moves values by far more.
    assert ((y.double() - x_hat @ w_hat.T).abs() <= accumulation(x_hat, w_hat.T, K, BF16_ROUNDING)).all()
    assert ((dx.double() - g_hat @ w_hat).abs() <= accumulation(g_hat, w_hat, N, BF16_ROUNDING)).all()
    assert ((dw.double() - g_hat.T @ x_hat).abs() <= accumulation(g_hat.T, x_hat, M, 2.0**-24)).all()


@needs_cpu_fp8
def test_error_against_the_exact_matmul_is_within_what_the_formats_and_scales_allow(operands):
    x, w, dy = operands
    y, dx, dw = run_head(x, w, dy)
    x64, w64, g64 = x.detach().double(), w.detach().double(), dy.bfloat16().double()
    dx8, dw8, dg8 = rounding(x64, X_S, E4M3), rounding(w64, W_S, E4M3), rounding(g64, G_S, E5M2)
    x_hat, w_hat, g_hat = x64.abs() + dx8, w64.abs() + dw8, g64.abs() + dg8  # bounds on |x̂|, |ŵ|, |ĝ|
    # Each element rounded once per cast (2^-4 e4m3, 2^-3 e5m2, or the subnormal floor at the scale),
    # errors adding up with |the other factor| over the inner dimension, then the float32 sum and the
    # output's rounding. A scale that let values reach e4m3's 448 (saturating) would break it at once.
    assert ((y.double() - x64 @ w64.T).abs()
            <= product_error(x64, dx8, w64.T, dw8.T) + accumulation(x_hat, w_hat.T, K, BF16_ROUNDING)).all()
    assert ((dx.double() - g64 @ w64).abs()
            <= product_error(g64, dg8, w64, dw8) + accumulation(g_hat, w_hat, N, BF16_ROUNDING)).all()
    assert ((dw.double() - g64.T @ x64).abs()
            <= product_error(g64.T, dg8.T, x64, dx8) + accumulation(g_hat.T, x_hat, M, 2.0**-24)).all()


def test_the_scales_are_the_records_and_keep_every_rms_normed_row_inside_e4m3():
    assert fp8.head_scales(768, 49152) == (math.sqrt(768) / 448, 24 / 448, 1 / (448 * 49152))
    x_s, _, _ = fp8.head_scales(K, M)
    spike = F.rms_norm(F.one_hot(torch.tensor([0]), K).float(), (K,))  # the largest |x_i|: sqrt(K)
    assert fp8.quantize(spike, x_s, E4M3).float().max() == torch.finfo(E4M3).max  # 448 exactly, not past


def test_the_mean_losss_gradient_takes_the_same_e5m2_values_as_the_records_summed_one():
    torch.manual_seed(1)
    summed = torch.randn(M, N) * 0.03  # the record's gradient, of a loss summed over the M rows
    _, _, g_s = fp8.head_scales(K, M)
    record = fp8.quantize(summed, 1 / 448, E5M2).float()
    assert torch.equal(fp8.quantize(summed / M, g_s, E5M2).float(), record)


def fp8_and_bf16_models(cfg: GPTConfig) -> tuple[GPT, GPT]:
    """The same random weights with head_matmul "fp8" and "bf16", in training mode."""
    with_fp8 = random_gpt(dataclasses.replace(cfg, head_matmul="fp8")).train()
    plain = GPT(dataclasses.replace(cfg, head_matmul="bf16"))
    plain.load_state_dict(with_fp8.state_dict())
    return with_fp8, plain.train()


def head_input(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """What the head multiplies: the RMS-normed output of the last block."""
    seen = []
    hook = model.blocks[-1].register_forward_hook(lambda module, args, out: seen.append(out))
    model(idx)
    hook.remove()
    return F.rms_norm(seen[0], (seen[0].size(-1),)).detach().double().flatten(0, 1)


def loss_bound(logit_bound: torch.Tensor) -> torch.Tensor:
    """How far the mean loss can move when each logit z_tn moves by at most logit_bound[t, n]: tanh's
    soft-cap has slope <= 1, and cross-entropy's gradient p - onehot has l1 norm <= 2, so token t's loss
    moves by at most 2 max_n logit_bound[t, n]; the mean by the mean of that."""
    return 2 * logit_bound.max(dim=1).values.mean()


@needs_cpu_fp8
def test_gpt_trains_with_the_fp8_head_the_emulated_reference_loss_near_the_bf16_heads():
    with_fp8, plain = fp8_and_bf16_models(TINY)
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    x, w = head_input(plain, idx), plain.lm_head.weight.detach().double()
    x_s, w_s, _ = fp8.head_scales(x.size(-1), x.size(0))
    x_hat, w_hat = emulate(x, x_s, E4M3), emulate(w, w_s, E4M3)
    emulated = F.cross_entropy(plain.soft_cap(x_hat @ w_hat.T), idx.flatten())
    dx8, dw8 = rounding(x, x_s, E4M3), rounding(w, w_s, E4M3)
    fp8_bound = product_error(x, dx8, w.T, dw8.T) + accumulation(x_hat, w_hat.T, x.size(-1), BF16_ROUNDING)
    loss_fp8, loss = with_fp8(idx, idx), plain(idx, idx)
    # The model's FP8 loss is the emulated one but for the float32 sum and the bf16 logits (measured
    # 2e-4 of a 0.08 bound here); the bf16 head's within the formats' worst case (measured 0.015 of 2.6).
    assert abs(loss_fp8 - emulated) <= loss_bound(accumulation(x_hat, w_hat.T, x.size(-1), BF16_ROUNDING))
    assert loss_fp8 != loss and abs(loss_fp8 - loss) <= loss_bound(fp8_bound)
    assert torch.equal(with_fp8.eval()(idx), plain.eval()(idx))  # evaluation: the bf16 head, as the record


@needs_cpu_fp8
def test_gpt_with_the_fp8_head_compiles_to_one_graph_holding_the_op_as_one_node():
    with_fp8, _ = fp8_and_bf16_models(TINY)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(with_fp8, backend=counter, fullgraph=True, dynamic=False)
    idx = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    loss = compiled(idx, idx)
    loss.backward()
    ops = [n.target for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert counter.frame_count == 1 and ops.count(torch.ops.speedrun.fp8_mm.default) == 1
    assert torch.equal(loss, with_fp8(idx, idx))


@needs_cpu_fp8
def test_the_fp8_matmul_runs_inside_the_heads_forward_where_fsdp_hooks_gather_its_weight():
    with_fp8, _ = fp8_and_bf16_models(TINY)
    weights = []  # fully_shard's pre-forward hook swaps the row shard for the gathered weight here
    with_fp8.lm_head.register_forward_pre_hook(lambda module, args: weights.append(module.weight))
    with_fp8(torch.zeros(1, 16, dtype=torch.long)).sum().backward()
    assert len(weights) == 1 and with_fp8.lm_head.weight.grad.abs().sum() > 0


def test_auto_takes_fp8_on_cuda_with_fp8_tensor_cores_and_bf16_elsewhere(monkeypatch):
    model = GPT(dataclasses.replace(TINY, head_matmul="auto"))
    assert model.lm_head.matmul(CPU) == "bf16"  # CPU's _scaled_mm emulates FP8: slower, and no FP8 units
    for capability, chosen in (((9, 0), "fp8"), ((8, 9), "fp8"), ((8, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert model.lm_head.matmul(torch.device("cuda")) == chosen
    idx = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with_auto, plain = random_gpt(model.config).train(), random_gpt(TINY).train()
    assert torch.equal(with_auto(idx, idx), plain(idx, idx))  # on CPU, auto is the bf16 head exactly


def test_fp8_asked_for_where_there_is_none_is_refused_saying_why(monkeypatch):
    model = GPT(dataclasses.replace(TINY, head_matmul="fp8"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    with pytest.raises(ValueError, match=r"head_matmul 'fp8': cuda has compute capability 8\.0, below 8\.9; "
                                         r"use 'auto' or 'bf16'"):
        model.lm_head.matmul(torch.device("cuda"))
    monkeypatch.setattr(fp8, "cpu_has_scaled_mm", lambda: False)
    with pytest.raises(ValueError, match="head_matmul 'fp8': torch .* has no _scaled_mm on CPU"):
        model.train()(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"GPTConfig.head_matmul must be one of \('auto', 'fp8', 'bf16'\)"):
        GPTConfig(head_matmul="fp16")
