"""The speedrun records' numerics as options of optim.Muon, each against a reference written from its formula:
Newton–Schulz's ε (ns_eps), its bf16 rounding (ns_rounding "stepwise": every operation rounded apart; "fused":
record #46's Polar Express, each matmul-add rounded once), and
where Adam adds ε (eps_form "raw"). The library defaults stay the more accurate rounding and torch's Adam
(tests/test_muon.py holds Adam to torch.optim.AdamW); docs/RECIPE.md has why the preset takes these."""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from optim import COEFFICIENTS, Coefficients, Muon, orthogonalize
from optim.update import adam_update

F64, BF16 = torch.float64, torch.bfloat16


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def step_with(opt: Muon, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


# ---- Newton–Schulz: where it rounds to bf16, and its ε ---------------------------------------------------


def records_newton_schulz(G: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """The records' arithmetic, from its formula: X = G in bf16, X ← X/(‖X‖_F + ε) in bf16, then per step
    A = X Xᵀ, B = b·A + (c·A)·A, X = a·X + B·X, each operation rounded to bf16 (wide matrices; muon's
    (a, b, c))."""
    a, b, c = COEFFICIENTS["muon"].triples[0]
    X = G.bfloat16()
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + (c * A) @ A
        X = a * X + B @ X
    return X


@pytest.mark.parametrize("steps", [0, 5])
def test_stepwise_rounding_is_the_records_bf16_arithmetic_bit_for_bit(steps):
    G = torch.randn(3, 16, 24, generator=seeded(0))
    ours = orthogonalize(G, steps, dtype=BF16, rounding="stepwise")  # steps=0: X₀ itself, in G's dtype
    assert torch.equal(ours, records_newton_schulz(G, steps).float())
    assert torch.equal(orthogonalize(G.mT, steps, dtype=BF16, rounding="stepwise"), ours.mT)  # tall
    # The default rounds X₀ once after a float32 normalization: another result, and the more accurate.
    precise = orthogonalize(G, steps, dtype=BF16)
    assert not torch.equal(precise, ours)
    if steps == 0:
        exact = G.double() / (torch.linalg.vector_norm(G.double(), dim=(-2, -1), keepdim=True) + 1e-7)
        assert torch.equal(precise, exact.float().bfloat16().float())
        assert (precise.double() - exact).abs().sum() < (ours.double() - exact).abs().sum()


def records_polar_express(G: torch.Tensor) -> torch.Tensor:
    """Record #46's Polar Express, from its formula: X = G in bf16 (tall: transposed), X ← X/(1.02‖X‖_F
    + 1e-6) in bf16, then per step A = X Xᵀ, B = b·A + c·A², X = a·X + B·X, each summed in float32 and
    rounded once to bf16 (its kernels' float32 accumulators)."""
    X = G.bfloat16()
    X = X.mT if G.size(-2) > G.size(-1) else X
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in COEFFICIENTS["polar_express_speedrun"].triples:
        x = X.float()
        A = (x @ x.mT).bfloat16().float()
        B = (b * A + c * (A @ A)).bfloat16().float()
        X = (a * x + B @ x).bfloat16()
    return X.mT if G.size(-2) > G.size(-1) else X


@pytest.mark.parametrize("shape", [(3, 6, 12), (2, 12, 1), (1, 16, 32)])
def test_fused_rounding_is_record_46s_polar_express_bit_for_bit(shape):
    G = torch.randn(shape, generator=seeded(2))
    ours = orthogonalize(G, 5, "polar_express_speedrun", dtype=BF16, rounding="fused")
    assert torch.equal(ours, records_polar_express(G).float())
    for other in ("stepwise", "precise"):
        assert not torch.equal(orthogonalize(G, 5, "polar_express_speedrun", dtype=BF16, rounding=other),
                               ours)


def test_fused_rounding_is_record_46s_to_summation_order_at_the_records_shapes():
    # A CPU bf16 matmul sums its float32 products in another order than a float32 matmul: at larger
    # sizes a few sums round the other way, and the iteration spreads them (measured 3.9e-3 here, the
    # other roundings 2.6e-2 and 5.7e-2: the records' own sensitivity to a rounding-level change).
    G = torch.randn(4, 128, 512, generator=seeded(0))
    want = records_polar_express(G).float()

    def distance(rounding: str) -> float:
        got = orthogonalize(G, 5, "polar_express_speedrun", dtype=BF16, rounding=rounding)
        return ((got - want).norm() / want.norm()).item()

    assert distance("fused") < 1e-2 and min(distance("stepwise"), distance("precise")) > 2e-2


def test_the_two_roundings_agree_to_float32_round_off_in_float32():
    G = torch.randn(2, 8, 12, generator=seeded(1))
    assert torch.equal(orthogonalize(G, 0, dtype=torch.float32, rounding="stepwise"),
                       orthogonalize(G, 0, dtype=torch.float32))
    # Five steps: the fused and the separate matmul-adds round differently (measured 1.1e-6 at most).
    stepwise = orthogonalize(G, dtype=torch.float32, rounding="stepwise")
    torch.testing.assert_close(stepwise, orthogonalize(G, dtype=torch.float32), rtol=0, atol=1e-5)


def hidden_step(G: torch.Tensor, kind: str = "hidden", **group) -> torch.Tensor:
    """u for one step of a (m, n) parameter at 0 with gradient G: momentum 0, lr 1, spectral scale,
    Newton–Schulz in float32 unless the group says otherwise."""
    p = torch.zeros_like(G)
    opt = Muon([{"params": [p], "kind": kind, "ns_dtype": torch.float32, **group}], lr=1.0, momentum=0.0,
               nesterov=False, lr_scale="spectral")
    step_with(opt, [p], [G])
    return -p


def test_ns_eps_replaces_the_coefficient_sets_eps():
    # ‖G‖_F ≈ 1e-7, so ε = 1e-7 (muon's own) halves X₀ and ε = 1e-12 leaves it at unit norm. (1, 0, 0) is
    # X ← X: one step returns X₀; float32 round-off only (measured ≤ 1 ulp).
    G = 1.25e-8 * torch.randn(8, 8, generator=seeded(2))
    norm = torch.linalg.vector_norm(G.double())
    for ns_eps, eps in ((None, 1e-7), (1e-12, 1e-12)):
        got = hidden_step(G, ns_eps=ns_eps, ns_coefficients=(1.0, 0.0, 0.0), ns_steps=1)
        torch.testing.assert_close(got.double(), G.double() / (norm + eps), rtol=1e-6, atol=0)
    assert not torch.allclose(hidden_step(G), hidden_step(G, ns_eps=1e-12), rtol=0.1)


@pytest.mark.parametrize("kind", ["hidden", "head_linear"])
def test_a_group_steps_with_its_rounding_and_eps(kind):
    # ε = 0.5 against ‖G‖_F ≈ 10; the step is orthogonalize's with that ε and rounding, × √(d_out/d_in).
    G = torch.randn(8, 12, generator=seeded(3))
    muon = COEFFICIENTS["muon"]
    got = hidden_step(G, kind, ns_rounding="stepwise", ns_eps=0.5, ns_dtype=BF16)
    want = orthogonalize(G, 5, Coefficients(muon.triples, eps=0.5), dtype=BF16, rounding="stepwise")
    assert torch.equal(got, want * math.sqrt(8 / 12))
    assert not torch.equal(got, hidden_step(G, kind, ns_dtype=BF16))  # the defaults: another step


# ---- Adam: ε before or after the bias correction ------------------------------------------------------


def adam_reference(p: torch.Tensor, grads: list[torch.Tensor], *, lr: float, b1: float, b2: float,
                   eps: float, raw: bool) -> torch.Tensor:
    """float64 Adam: d = lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε) (raw) or lr/(1−β₁ᵗ)·m/(√v/√(1−β₂ᵗ) + ε)."""
    p, m, v = p.double(), torch.zeros_like(p, dtype=F64), torch.zeros_like(p, dtype=F64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        if raw:
            p = p - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
        else:
            p = p - lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
    return p


def test_raw_eps_is_the_records_adam():
    # Gradients of ε's size, where its place shows: at t = 1 the raw form's ε acts as ε/√(1 − β₂) = 4.5ε.
    eps, lr = 1e-3, 0.01
    p0 = torch.randn(64, generator=seeded(4))
    grads = [eps * torch.randn(64, generator=seeded(5 + t)) for t in range(4)]
    results = {}
    for form in ("raw", "corrected"):
        p = p0.clone()
        opt = Muon([{"params": [p], "kind": "adam", "eps_form": form}], lr=lr, adam_betas=(0.8, 0.95),
                   adam_eps=eps)
        for g in grads:
            step_with(opt, [p], [g])
        results[form] = p.double()
    for form, raw in (("raw", True), ("corrected", False)):
        want = adam_reference(p0, grads, lr=lr, b1=0.8, b2=0.95, eps=eps, raw=raw)
        # float32 state and parameters, |p| ≤ 3: a few ulps of 2.4e-7 over 4 steps (measured ≤ 2.4e-7).
        torch.testing.assert_close(results[form], want, rtol=0, atol=5e-7)
    other = adam_reference(p0, grads, lr=lr, b1=0.8, b2=0.95, eps=eps, raw=False)
    assert (results["raw"] - other).abs().max() > 1e-3  # the forms differ by far more than the tolerance


def test_raw_eps_compiles_in_one_graph_and_equals_eager():
    # The form is a constant of adam_math's graph (compiled with fullgraph on CUDA); aot_eager traces it.
    group = dict(lr=0.01, momentum=0.8, beta2=0.95, eps=1e-3, weight_decay=0.0, lr_mul=1.0,
                 wd_form="decoupled", cautious_wd=False, eps_form="raw", state_dtype="float32",
                 step_rounding="precise")
    counter = CompileCounterWithBackend("aot_eager")
    results = []
    for compile in (False, counter):
        tensors, states = [torch.ones(5), torch.ones(2, 3).bfloat16()], [{}, {}]
        for step in range(3):
            grads = [1e-3 * torch.randn(t.shape, generator=seeded(step)).to(t.dtype) for t in tensors]
            adam_update(group, states, tensors, grads, torch.tensor([True, step > 0]), compile=compile)
        results.append(tensors)
    assert counter.frame_count == 1
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---- checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("ns_eps", 0.0, r"ns_eps=0.0; expected None \(the coefficient set's own\) or a number > 0"),
    ("ns_eps", float("nan"), r"ns_eps=nan"),
    ("ns_eps", "1e-7", r"ns_eps='1e-7'"),
    ("ns_rounding", "bf16", r"ns_rounding='bf16'; use one of \('precise', 'stepwise', 'fused'\)"),
    ("eps_form", "torch", r"eps_form='torch'; use one of \('corrected', 'raw'\)"),
])
def test_a_bad_value_is_refused_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [torch.zeros(4, 4)], "kind": "hidden", key: value}])
    with pytest.raises(ValueError, match="rounding='bf16'"):
        orthogonalize(torch.ones(2, 2), rounding="bf16")
