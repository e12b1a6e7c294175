"""model/fp8.py's scale options: record #46's weight scale w_s = 2^-9 (GPTConfig.fp8_weight_scale) and
the records' gradient scale 1/448 for a summed loss (GPTConfig.train_loss "sum_bf16"), checked
against the emulated FP8 reference of tests/test_fp8.py (float8 casts, float64 matmuls)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_fp8 import BF16_ROUNDING, E4M3, E5M2, TINY, accumulation, emulate, needs_cpu_fp8

import model.fp8 as fp8
from model import GPT
from model.fp8 import WEIGHT_SCALES, fp8_head

M, K, N = 96, 128, 160  # rows (tokens), dim, vocab
# Record #46's lm_head, written out: x_s = sqrt(768)/448, w_s = 2^-9, grad_s = 1/448 (its loss is a sum).
W_S_46 = 2.0**-9


def test_record_46s_scales_are_its_lm_heads():
    assert WEIGHT_SCALES == {"2025-07-12": 24 / 448, "2025-11-29": W_S_46}
    assert fp8.head_scales(768, 49152, W_S_46, summed=True) == (math.sqrt(768) / 448, W_S_46, 1 / 448)


@needs_cpu_fp8
def test_at_record_46s_scales_output_and_gradients_match_the_emulated_fp8_reference():
    torch.manual_seed(0)
    x = F.rms_norm(torch.randn(M, K), (K,)).bfloat16().requires_grad_()
    w = (0.05 * torch.randn(N, K)).requires_grad_()  # inside 448 * 2^-9 = 0.875: nothing saturates
    dy = torch.randn(M, N) * 0.03  # the gradient of a loss summed over the rows: softmax-sized
    y = fp8_head(x, w, W_S_46, summed=True)
    y.backward(dy.bfloat16())
    x_s, g_s = math.sqrt(K) / 448, 1 / 448
    x_hat, w_hat, g_hat = emulate(x, x_s, E4M3), emulate(w, W_S_46, E4M3), emulate(dy.bfloat16(), g_s, E5M2)
    # Same float8 operands, so only the float32 sum and the output's rounding are left; the 2025-07-12
    # w_s (24/448) or the mean loss's g_s (1/(448 M)) would change the operands by far more.
    assert ((y.double() - x_hat @ w_hat.T).abs() <= accumulation(x_hat, w_hat.T, K, BF16_ROUNDING)).all()
    assert ((x.grad.double() - g_hat @ w_hat).abs() <= accumulation(g_hat, w_hat, N, BF16_ROUNDING)).all()
    assert ((w.grad.double() - g_hat.T @ x_hat).abs() <= accumulation(g_hat.T, x_hat, M, 2.0**-24)).all()
    assert not torch.equal(emulate(w, WEIGHT_SCALES["2025-07-12"], E4M3), w_hat)


def test_record_46s_weight_scale_keeps_small_weights_normal_and_holds_weights_up_to_0_875():
    w = torch.logspace(-4.5, -0.1, 200)  # 3.2e-5 .. 0.79: head weights that are small in magnitude
    relative = {name: ((emulate(w, s, E4M3) - w).abs() / w).max().item() for name, s in WEIGHT_SCALES.items()}
    # e4m3's normals keep 3 mantissa bits, half-ulp 2^-4 relative, down to 2^-6 * w_s: 3.1e-5 at 2^-9
    # (every weight here), 8.4e-4 at 24/448 (below that the weights go subnormal and lose bits).
    assert relative["2025-11-29"] <= 2.0**-4 < relative["2025-07-12"]
    # 448 * 2^-9 = 0.875 is the largest weight e4m3 holds at this scale; above it the cast saturates
    # (torch 2.13 on CPU) or gives NaN (torch 2.11), as the record's own cast does: not representable.
    assert emulate(torch.tensor([0.875, 0.8125]), W_S_46, E4M3).tolist() == [0.875, 0.8125]
    assert emulate(torch.tensor([1.0]), W_S_46, E4M3).item() != 1.0


def scales_the_head_passes(cfg, monkeypatch) -> list[tuple[float, float, float]]:
    """The (x_s, w_s, grad_s) the model's head gives fp8_mm in one training forward."""
    seen, original = [], fp8.fp8_mm
    monkeypatch.setattr(fp8, "fp8_mm", lambda x, w, *scales: seen.append(scales) or original(x, w, *scales))
    GPT(cfg).train()(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    return seen


@needs_cpu_fp8
@pytest.mark.parametrize("options, want_w_s, want_g_s", [
    (dict(), 24 / 448, 1 / (448 * 16)),  # the 2025-07-12 defaults, the mean over 2 x 8 rows
    (dict(fp8_weight_scale=W_S_46, train_loss="sum_bf16"), W_S_46, 1 / 448),  # record #46's
])
def test_the_models_fp8_head_takes_the_configured_weight_scale_and_the_losss_gradient_scale(
        options, want_w_s, want_g_s, monkeypatch):
    cfg = dataclasses.replace(TINY, head_matmul="fp8", **options)
    assert scales_the_head_passes(cfg, monkeypatch) == [(math.sqrt(cfg.dim) / 448, want_w_s, want_g_s)]
