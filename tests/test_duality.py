"""Duality maps: ‖dualize(G)‖ = 1 and ⟨G, dualize(G)⟩ = ‖G‖† in each layer's norm (docs/MATH.md).

The norms and dual norms below are written out from docs/MATH.md independently of optim/, so
the identities check the maps against the theory rather than against themselves. Newton–Schulz
runs in float32 (dtype=F32) wherever a result is compared with an exact one.
"""

import functools
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optim.duality
from optim import dualize_conv2d, dualize_embed, dualize_linear, dualize_sign, orthogonalize

F64, F32 = torch.float64, torch.float32
PROPERTY = settings(max_examples=15, deadline=None)
dims = st.integers(1, 24)
seeds = st.integers(0, 2**31 - 1)


def rms_to_rms(W):  # Linear: √(d_in/d_out)·σ_max(W)
    d_out, d_in = W.shape[-2:]
    return math.sqrt(d_in / d_out) * torch.linalg.matrix_norm(W, ord=2)


def rms_to_rms_dual(G):  # √(d_out/d_in)·‖G‖_nuclear
    d_out, d_in = G.shape[-2:]
    return math.sqrt(d_out / d_in) * torch.linalg.matrix_norm(G, ord="nuc")


def conv_norm(W):  # k²·max over offsets of the offset slice's RMS→RMS norm
    k2 = W.shape[-2] * W.shape[-1]
    return k2 * rms_to_rms(W.permute(2, 3, 0, 1)).max()


def conv_dual(G):  # Σ over offsets of (1/k²)·√(d_out/d_in)·‖G_ij‖_nuclear
    k2 = G.shape[-2] * G.shape[-1]
    return rms_to_rms_dual(G.permute(2, 3, 0, 1)).sum() / k2


def rms(v):
    return torch.linalg.vector_norm(v, dim=-1) / math.sqrt(v.shape[-1])


# name: (exact map, norm, dual norm, shape from (a, b, k))
MAPS = {
    "linear": (
        lambda G: dualize_linear(G, exact=True),
        rms_to_rms,
        rms_to_rms_dual,
        lambda a, b, k: (a, b),
    ),
    "embed": (  # (vocab, dim): ℓ1→RMS is the largest row RMS; its dual sums √dim·‖row‖₂
        dualize_embed,
        lambda W: rms(W).max(),
        lambda G: (math.sqrt(G.shape[-1]) * torch.linalg.vector_norm(G, dim=-1)).sum(),
        lambda a, b, k: (a, b),
    ),
    "conv2d": (
        lambda G: dualize_conv2d(G, exact=True),
        conv_norm,
        conv_dual,
        lambda a, b, k: (a, b, k, k),
    ),
    "sign": (  # d_in·max|W_ij|; its dual is ‖G‖₁/d_in
        dualize_sign,
        lambda W: W.shape[-1] * W.abs().max(),
        lambda G: G.abs().sum() / G.shape[-1],
        lambda a, b, k: (a, b),
    ),
}


@pytest.mark.parametrize("name", sorted(MAPS))
@PROPERTY
@given(a=dims, b=dims, k=st.integers(1, 3), seed=seeds)
def test_dualized_gradient_has_unit_norm_and_attains_the_dual_norm(name, a, b, k, seed):
    dualize, norm, dual_norm, shape = MAPS[name]
    G = torch.randn(shape(a, b, k), generator=torch.Generator().manual_seed(seed), dtype=F64)
    D = dualize(G)
    # Exact maps in float64: both identities hold to round-off.
    torch.testing.assert_close(norm(D), torch.tensor(1.0, dtype=F64), rtol=1e-10, atol=0)
    torch.testing.assert_close((G * D).sum(), dual_norm(G), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", sorted(MAPS))
@PROPERTY
@given(a=dims, b=dims, k=st.integers(1, 3), seed=seeds)
def test_no_unit_direction_beats_the_dualized_one(name, a, b, k, seed):
    dualize, norm, dual_norm, shape = MAPS[name]
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(shape(a, b, k), generator=gen, dtype=F64)
    best = (G * dualize(G)).sum()
    # dualize(G) is the argmax of ⟨G, T⟩ over the unit sphere: random unit T never do better.
    # This also checks the dual-norm formulas above are maxima, not just consistent with the maps.
    for _ in range(20):
        T = torch.randn(G.shape, generator=gen, dtype=F64)
        assert (G * (T / norm(T))).sum() <= best * (1 + 1e-10)


@PROPERTY
@given(a=st.integers(2, 12), extra=st.integers(8, 20), seed=seeds)
def test_newton_schulz_linear_dual_is_close_to_the_exact_one(a, extra, seed):
    G = torch.randn(a, a + extra, generator=torch.Generator().manual_seed(seed), dtype=F64)
    # Muon's quintic leaves each σ of U Vᵀ in [0.67, 1.21] (docs/MATH.md), so ⟨G, D⟩, a σ-weighted
    # average of them times ‖G‖†, lies in the same band; float32 arithmetic is far inside it.
    ratio = (G * dualize_linear(G, dtype=F32)).sum() / rms_to_rms_dual(G)
    assert 0.67 <= ratio <= 1.21
    # The paper's convergent quintic, 10 steps, on these well-conditioned wide G (σ_min/‖G‖_F ≫ 0.01,
    # where 10 steps reach 1e-3): the map matches the exact one to float32 round-off.
    exact = dualize_linear(G, exact=True)
    converged = dualize_linear(G, steps=10, coefficients="quintic", dtype=F32)
    torch.testing.assert_close(converged, exact, rtol=0, atol=1e-5)
    # The map works on the transpose (tall) too and keeps its √(d_out/d_in) scale.
    torch.testing.assert_close(dualize_linear(G.T, exact=True), exact.T * (a + extra) / a, rtol=0, atol=1e-12)


def test_embed_rows_of_absent_tokens_stay_exactly_zero():
    G = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    G[[1, 4]] = 0
    for dtype in (torch.float32, torch.bfloat16):
        D = dualize_embed(G.to(dtype))
        assert not D.isnan().any()
        assert torch.equal(D[[1, 4]], torch.zeros(2, 8, dtype=dtype))
    # Every present token moves by unit RMS, whatever its gradient's size (its frequency).
    G[0] *= 1e-6
    G[2] *= 1e3
    present = dualize_embed(G)[[0, 2, 3, 5]]
    torch.testing.assert_close(rms(present), torch.ones(4), rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_embed_of_fp16_rows_too_small_or_too_large_for_an_fp16_norm(scale):
    # Row norms ~8e-6 (√dim/‖g‖ then overflows fp16) and ~8e4 (past fp16's 65504, with every entry
    # representable): the norm is taken in float32.
    G = (scale * torch.randn(5, 64, generator=torch.Generator().manual_seed(3))).half()
    D = dualize_embed(G)
    assert D.dtype == torch.float16 and D.isfinite().all()
    # The exact map of the same fp16 input, up to fp16's rounding of the result (2⁻¹¹ relative, on
    # unit-RMS entries below 4): ≤ 2e-3.
    torch.testing.assert_close(D.double(), dualize_embed(G.double()), rtol=0, atol=2e-3)


def test_sign_maps_zero_entries_to_zero():
    G = torch.tensor([[0.0, -2.0, 3.0]])
    assert torch.equal(dualize_sign(G), torch.tensor([[0.0, -1.0, 1.0]]) / 3)


def test_conv2d_uses_one_batched_orthogonalize_for_all_offsets():
    G = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    with mock.patch.object(optim.duality, "orthogonalize", wraps=orthogonalize) as spy:
        D = dualize_conv2d(G, dtype=F32)
    assert spy.call_count == 1
    assert spy.call_args.args[0].shape == (3, 3, 4, 6)  # the k² offsets as leading batch dims
    # Same as mapping each offset on its own, scaled by 1/k²; batched and single matmuls may round
    # differently in float32, hence 1e-5.
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(D[:, :, i, j], dualize_linear(G[:, :, i, j], dtype=F32) / 9,
                                       rtol=0, atol=1e-5)


def test_maps_act_on_each_weight_of_a_stack():
    gen = torch.Generator().manual_seed(2)
    stacks = {
        functools.partial(dualize_linear, dtype=F32): torch.randn(3, 5, 7, generator=gen),
        dualize_embed: torch.randn(3, 5, 7, generator=gen),
        functools.partial(dualize_conv2d, dtype=F32): torch.randn(3, 4, 5, 3, 3, generator=gen),
        dualize_sign: torch.randn(3, 5, 7, generator=gen),
    }
    for dualize, G in stacks.items():
        D = dualize(G)
        for b in range(3):
            # float32: stacked and single matmuls may round differently.
            torch.testing.assert_close(D[b], dualize(G[b]), rtol=0, atol=1e-5)
