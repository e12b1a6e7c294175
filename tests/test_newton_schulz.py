"""Newton–Schulz orthogonalization: the facts of docs/MATH.md as properties over random shapes."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter

import optim.newton_schulz
from optim import COEFFICIENTS, default_dtype, newton_schulz_flops, orthogonalize, polar_reference

F64 = torch.float64
PROPERTY = settings(max_examples=12, deadline=None)

# (leading batch dims, m, n): wide, square and tall matrices, alone or stacked.
shapes = st.tuples(st.sampled_from([(), (3,)]), st.integers(2, 40), st.integers(2, 40))
seeds = st.integers(0, 2**31 - 1)


def spectrum_with_floor(k: int, floor: float, gen: torch.Generator) -> torch.Tensor:
    """k singular values spread over ~3 decades with ‖σ‖₂ = 1 and σ_min = floor exactly (k·floor² ≤ 1).

    The others are floor + λ·y with y ≥ 0 random; λ solves Σ(floor + λy)² = 1 − floor².
    """
    y = 10 ** (3 * torch.rand(k - 1, generator=gen, dtype=F64))
    sy, syy = y.sum(), (y * y).sum()
    lam = (-floor * sy + torch.sqrt(floor**2 * sy**2 + syy * (1 - k * floor**2))) / syy
    return torch.cat([torch.tensor([floor], dtype=F64), floor + lam * y])


def random_orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=F64)).Q


def matrices_with_floor(shape, floor: float, seed: int) -> torch.Tensor:
    """float64 G of shape (batch..., m, n), every matrix with σ_min/‖G‖_F = floor, at a random scale."""
    batch, m, n = shape
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    mats = []
    for _ in range(math.prod(batch)):
        sigma = spectrum_with_floor(k, floor, gen)
        scale = 10 ** (4 * torch.rand((), generator=gen, dtype=F64) - 2)
        U, V = random_orthonormal(m, k, gen), random_orthonormal(n, k, gen)
        mats.append(scale * U @ torch.diag(sigma) @ V.T)
    return torch.stack(mats).reshape(*batch, m, n)


def low_rank(batch: tuple, m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(*batch, m, rank, generator=gen, dtype=F64)
    return left @ torch.randn(*batch, rank, n, generator=gen, dtype=F64)


def singular_values(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(X.double())


@pytest.mark.parametrize(
    "name, scale, eps",
    [
        ("cubic", 1.0, 1e-7),
        ("quintic", 1.0, 1e-7),
        ("muon", 1.0, 1e-7),
        ("polar_express", 1.01, 1e-7),
        ("polar_express_speedrun", 1.02, 1e-6),
    ],
)
def test_each_coefficient_set_normalizes_per_matrix_as_specified(name, scale, eps):
    # ‖G‖_F ~ 1e-6 makes eps visible; steps=0 returns X₀ itself.
    G = 1e-7 * torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = G / (scale * torch.linalg.norm(G, dim=(-2, -1), keepdim=True) + eps)
    torch.testing.assert_close(orthogonalize(G, 0, name, dtype=F64), expected, rtol=1e-14, atol=0)


def test_polar_express_schedule_has_the_safety_factor_then_the_limit_polynomial():
    triples = COEFFICIENTS["polar_express"].triples
    # Algorithm 1's first triple with x ↦ x/1.01 folded in: (a/1.01, b/1.01³, c/1.01⁵).
    first = (8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3, 17.300387312530933 / 1.01**5)
    assert triples[0] == pytest.approx(first, rel=1e-15)
    assert len(triples) == 8 and triples[7] == (1.875, -1.25, 0.375)  # repeats from step 8 on


@PROPERTY
@given(shapes, seeds)
def test_muon_quintic_lands_in_band(shape, seed):
    G = matrices_with_floor(shape, 1.5e-3, seed)
    sigma = singular_values(orthogonalize(G, 5, "muon", dtype=F64))
    # docs/MATH.md: for σ_min/‖G‖_F ≥ 1.5e-3 every output σ lies in [0.67, 1.21] (measured [0.680, 1.202]).
    assert sigma.min() >= 0.67 and sigma.max() <= 1.21


@PROPERTY
@given(shapes, seeds)
def test_muon_quintic_band_holds_in_bf16(shape, seed):
    # Rounding X₀ to bf16 alone moves singular values by up to 2⁻⁹·‖X₀‖_F ≈ 2e-3, more than a 1.5e-3
    # floor (there we measured σ_min down to 0.11 on 2×2 inputs), so the bf16 claim needs a higher
    # floor: from 3e-3 up every measured σ_min was ≥ 0.677; 5e-3 keeps a margin.
    G = matrices_with_floor(shape, 5e-3, seed)
    sigma = singular_values(orthogonalize(G, 5, "muon", dtype=torch.bfloat16))
    # bf16 round-off moves the float64 band's bounds by at most 0.015 (docs/MATH.md).
    assert sigma.min() >= 0.67 - 0.015 and sigma.max() <= 1.21 + 0.015


@pytest.mark.parametrize(
    "name, floor, steps",
    [("quintic", 0.1, 5), ("quintic", 0.01, 10), ("cubic", 0.1, 9), ("cubic", 0.01, 14)],
)
@PROPERTY
@given(shape=shapes, seed=seeds)
def test_convergent_iterations_reach_one(name, floor, steps, shape, seed):
    G = matrices_with_floor(shape, floor, seed)
    sigma = singular_values(orthogonalize(G, steps, name, dtype=F64))
    # docs/MATH.md step counts; the scalar iteration's worst case is 4.6e-4 (quintic, 0.1, 5 steps)
    # and 4.0e-4 (cubic, 0.01, 14 steps), so 1e-3 is the claim with its margin.
    assert (sigma - 1).abs().max() <= 1e-3


@PROPERTY
@given(shapes, seeds)
def test_polar_express_converges(shape, seed):
    G = matrices_with_floor(shape, 1e-3, seed)
    five = singular_values(orthogonalize(G, 5, "polar_express", dtype=F64))
    eight = singular_values(orthogonalize(G, 8, "polar_express", dtype=F64))
    # Designed for σ_min/σ_max ≥ 1e-3. Measured on the scalar iteration: 5 steps give σ in
    # [0.840, 1.124]; 8 steps are within 3e-15 of 1, so 1e-9 leaves room for float64 matmul round-off.
    assert five.min() >= 0.83 and five.max() <= 1.13
    assert (eight - 1).abs().max() <= 1e-9


@PROPERTY
@given(shapes, seeds)
def test_polar_express_speedrun_band(shape, seed):
    G = matrices_with_floor(shape, 1e-3, seed)
    sigma = singular_values(orthogonalize(G, 5, "polar_express_speedrun", dtype=F64))
    # Tuned not to converge but to land fast: measured scalar band [0.847, 1.141] for σ_min/‖G‖_F ≥ 1e-3.
    assert sigma.min() >= 0.84 and sigma.max() <= 1.15


@PROPERTY
@given(shapes, seeds)
def test_bf16_matches_float64(shape, seed):
    G = torch.randn(*shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(seed), dtype=F64)
    exact = orthogonalize(G, dtype=F64)
    bf16 = orthogonalize(G, dtype=torch.bfloat16)
    # docs/MATH.md measures a relative Frobenius difference of 1.4e-2 to 3.1e-2 for bf16.
    assert torch.linalg.norm(bf16 - exact) / torch.linalg.norm(exact) < 5e-2


@pytest.mark.parametrize("name", sorted(COEFFICIENTS))
def test_zero_gives_zero_and_neighbours_are_unaffected(name):
    G = torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(0))
    G[1] = 0
    X = orthogonalize(G, coefficients=name, dtype=torch.float32)
    assert torch.equal(X[1], torch.zeros(6, 9))  # not NaN: the normalization's eps keeps 0/0 away
    # Normalization is per matrix: a zero neighbour in the stack changes nothing.
    torch.testing.assert_close(X[0], orthogonalize(G[0], coefficients=name, dtype=torch.float32),
                               rtol=1e-5, atol=1e-6)


@PROPERTY
@given(shapes, seeds, st.integers(1, 5))
def test_rank_is_never_increased(shape, seed, rank):
    batch, m, n = shape
    rank = min(rank, m, n)
    G = low_rank(batch, m, n, rank, seed)
    sigma = singular_values(orthogonalize(G, dtype=F64))
    # p is odd, so X stays in G's row and column spaces; what leaks is round-off amplified by at most
    # 3.4445⁵ ≈ 500 over 5 steps: ≤ 1e-10 relative to σ_max.
    assert (sigma[..., rank:] <= 1e-10 * sigma[..., :1]).all()


def right_gram_newton_schulz(G: torch.Tensor, steps: int, a: float, b: float, c: float) -> torch.Tensor:
    """The same polynomial through the n×n Gram matrix: X ← a·X + X·(b·B + c·B²), B = XᵀX."""
    X = G / (torch.linalg.norm(G, dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        B = X.mT @ X
        X = a * X + X @ (b * B + c * B @ B)
    return X


@PROPERTY
@given(shapes, seeds)
def test_transpose_path_equals_newton_schulz_on_the_transpose(shape, seed):
    G = torch.randn(*shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(seed), dtype=F64)
    X = orthogonalize(G, dtype=F64)
    # Tall inputs take the transposed route, and it agrees with iterating on the other Gram matrix,
    # which it avoids; 1e-9 is float64 round-off amplified by the five steps.
    muon = COEFFICIENTS["muon"].triples[0]
    torch.testing.assert_close(X, orthogonalize(G.mT, dtype=F64).mT, rtol=0, atol=1e-9)
    torch.testing.assert_close(X, right_gram_newton_schulz(G, 5, *muon), rtol=0, atol=1e-9)


@pytest.mark.parametrize("n", [32, 64])
def test_orthogonal_init_needs_many_cubic_steps(n):
    G = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=F64)
    # This square G has σ_min/‖G‖_F ≈ 1e-3: cubic grows small σ by 1.5 per step, so 5 steps leave
    # it far from 1 (measured error 0.98) while 30 steps reach float64 round-off (measured 7e-16).
    assert (singular_values(orthogonalize(G, 5, "cubic", dtype=F64)) - 1).abs().max() > 0.5
    assert (singular_values(orthogonalize(G, 30, "cubic", dtype=F64)) - 1).abs().max() <= 1e-3


def test_each_step_applies_its_own_polynomial_to_the_singular_values():
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(7, 12, generator=gen, dtype=F64)
    triples = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    x = S / (S.norm() + 1e-7)
    for a, b, c in [*triples, triples[-1]]:  # three steps: the last triple repeats
        x = a * x + b * x**3 + c * x**5
    expected = U @ torch.diag(x) @ Vh
    torch.testing.assert_close(orthogonalize(G, 3, triples, dtype=F64), expected, rtol=0, atol=1e-12)


def test_a_single_triple_and_a_name_give_the_same_iteration():
    G = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(orthogonalize(G, 4, (2.0, -1.5, 0.5)), orthogonalize(G, 4, "quintic"))
    assert torch.equal(orthogonalize(G, 4, [(2.0, -1.5, 0.5)]), orthogonalize(G, 4, "quintic"))


@pytest.mark.parametrize("bad", ["quartic", [(1.0, 2.0)], []])
def test_bad_coefficients_are_rejected(bad):
    with pytest.raises(ValueError):
        orthogonalize(torch.ones(2, 3), coefficients=bad)


@pytest.mark.parametrize("bf16_dot_product, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_cpu_default_precision_follows_the_hardware(bf16_dot_product, expected):
    G = torch.randn(6, 10, generator=torch.Generator().manual_seed(3), dtype=F64)
    with mock.patch.object(optim.newton_schulz, "CPU_HAS_BF16_DOT_PRODUCT", bf16_dot_product):
        assert default_dtype(torch.device("cpu")) == expected
        X = orthogonalize(G)
    assert X.dtype == F64  # the input's dtype, whatever the iteration's
    assert torch.equal(X, orthogonalize(G, dtype=expected))
    assert default_dtype(torch.device("cuda")) == torch.bfloat16  # a device name; no GPU needed


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_fp16_inputs_too_small_or_too_large_for_an_fp16_norm_are_orthogonalized(scale):
    # ‖G‖_F of these is ~4e-3 (its squares, ~1e-8 each, underflow fp16) or ~4e5 (past fp16's 65504).
    G = (scale * torch.randn(2, 24, 40, generator=torch.Generator().manual_seed(5))).half()
    X = orthogonalize(G, dtype=torch.float32)
    assert X.dtype == torch.float16 and X.isfinite().all()
    # The float64 iteration on the same fp16 input, up to float32 matmuls and fp16's rounding of the
    # result (at most 2⁻¹² on entries below 1: 2.4e-4); measured 1.0e-4 at both scales.
    torch.testing.assert_close(X.double(), orthogonalize(G.double(), dtype=F64), rtol=0, atol=3e-4)


def test_compiles_in_one_graph_per_stack_shape_with_no_breaks():
    counter = CompileCounter()
    stacks = [torch.randn(shape, generator=torch.Generator().manual_seed(4))
              for shape in [(2, 16, 24), (3, 24, 16), (2, 16, 24), (3, 24, 16)]]
    torch._dynamo.reset()
    try:
        # fullgraph=True turns any graph break (Python control flow on tensor values) into an error;
        # the counting backend runs the traced graph as it is, without generating code.
        compiled = [orthogonalize(G, 5, "polar_express", compile=counter) for G in stacks]
        assert counter.frame_count == 2  # one graph per shape; repeated shapes reuse theirs
    finally:
        torch._dynamo.reset()
    for G, X in zip(stacks, compiled, strict=True):
        torch.testing.assert_close(X, orthogonalize(G, 5, "polar_express", compile=False), rtol=0, atol=0)


def test_a_compiled_caller_traces_through_it_in_one_graph():
    counter = CompileCounter()
    G = torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(6))
    caller = torch.compile(lambda G: 2 * orthogonalize(G, compile=True), backend=counter, fullgraph=True)
    torch._dynamo.reset()
    try:
        X = caller(G)
        assert counter.frame_count == 1  # no compile inside the trace: the caller's graph holds it
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(X, 2 * orthogonalize(G, compile=False), rtol=0, atol=0)


def test_compiles_on_cuda_only_by_default():
    G = torch.randn(4, 6)
    with mock.patch.object(optim.newton_schulz, "compiled") as compiled:
        orthogonalize(G)
        assert not compiled.called  # nothing compiles on the CPU unless asked
        orthogonalize(G, compile=True)
        compiled.assert_called_once_with(optim.newton_schulz._newton_schulz, "inductor")


def test_flops_count_the_smaller_gram_matrix():
    # Per step: X Xᵀ is 2m²n, A² is 2m³, B X is 2m²n, with m = 10 ≤ n = 30; two matrices, five steps.
    assert newton_schulz_flops((2, 30, 10), steps=5) == 2 * 5 * (4 * 10 * 10 * 30 + 2 * 10**3)
    assert newton_schulz_flops((10, 30), 1) == newton_schulz_flops((30, 10), 1) == 14_000


@PROPERTY
@given(shapes, seeds, st.integers(1, 5))
def test_polar_reference_is_the_polar_factor(shape, seed, rank):
    batch, m, n = shape
    rank = min(rank, m, n)
    G = low_rank(batch, m, n, rank, seed)
    Q = polar_reference(G)
    # G = Q·H with H = QᵀG symmetric positive semidefinite, and Q a partial isometry of G's rank:
    # exactly `rank` singular values equal 1, the rest (round-off directions) are dropped to 0.
    H = Q.mT @ G
    torch.testing.assert_close(Q @ H, G, rtol=0, atol=1e-10)
    torch.testing.assert_close(H, H.mT, rtol=0, atol=1e-10)
    assert (torch.linalg.eigvalsh(H) >= -1e-10).all()
    sigma = singular_values(Q)
    torch.testing.assert_close(sigma[..., :rank], torch.ones_like(sigma[..., :rank]), rtol=0, atol=1e-10)
    assert (sigma[..., rank:] <= 1e-10).all()
    assert torch.equal(polar_reference(torch.zeros(3, 4)), torch.zeros(3, 4, dtype=F64))
