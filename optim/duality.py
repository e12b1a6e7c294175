"""Duality maps: a gradient G is a dual vector; dualize(G) = argmax_{‖T‖=1} ⟨G, T⟩ is the unit
update it asks for under the layer's norm (Bernstein & Newhouse 2025; docs/MATH.md).

Each map satisfies ‖dualize(G)‖ = 1 and ⟨G, dualize(G)⟩ = ‖G‖†. Shapes are PyTorch layouts:
a Linear weight is (d_out, d_in), an Embedding (vocab, dim), a Conv2d (d_out, d_in, k, k).
Every map also accepts extra leading dims and maps each trailing weight on its own, which is
how the optimizer dualizes a stack of same-shape weights in one call.
"""

import math

import torch

from .newton_schulz import orthogonalize, polar_reference


def dualize_linear(
    G: torch.Tensor,
    steps: int = 5,
    coefficients="muon",
    dtype: torch.dtype | None = None,
    exact: bool = False,
    rounding: str = "precise",
) -> torch.Tensor:
    """Linear, RMS→RMS operator norm ‖W‖ = √(d_in/d_out)·σ_max(W).

    G (..., d_out, d_in) = U Σ Vᵀ  ↦  √(d_out/d_in)·U Vᵀ;  dual norm √(d_out/d_in)·‖G‖_nuclear.
    U Vᵀ comes from `orthogonalize(G, steps, coefficients, dtype, rounding=rounding)`, or
    from the float64 SVD (`polar_reference`) when exact=True.
    """
    d_out, d_in = G.shape[-2:]
    polar = (polar_reference(G).to(G.dtype) if exact
             else orthogonalize(G, steps, coefficients, dtype, rounding=rounding))
    return polar * math.sqrt(d_out / d_in)


def dualize_embed(G: torch.Tensor) -> torch.Tensor:
    """Embed, ℓ1→RMS operator norm ‖W‖ = max over tokens of the token row's RMS.

    G (..., vocab, dim): each row g ↦ √dim·g/‖g‖₂ (unit RMS);  dual norm Σ_rows √dim·‖g‖₂.
    Rows of tokens absent from the batch are zero and stay exactly zero. Computed in at least
    float32 (an fp16 row norm below ~2.4e-4 underflows), returned in G's dtype.
    """
    precise = torch.promote_types(G.dtype, torch.float32)
    norm = torch.linalg.vector_norm(G, dim=-1, keepdim=True, dtype=precise)
    # where() rather than dividing by a clamped norm: a zero row must give 0, never 0/0.
    return (G * torch.where(norm > 0, math.sqrt(G.shape[-1]) / norm, 0.0)).to(G.dtype)


def dualize_conv2d(
    G: torch.Tensor,
    steps: int = 5,
    coefficients="muon",
    dtype: torch.dtype | None = None,
    exact: bool = False,
    rounding: str = "precise",
) -> torch.Tensor:
    """Conv2D, norm k²·max over kernel offsets (i, j) of ‖W[:, :, i, j]‖_{RMS→RMS}.

    G (..., d_out, d_in, k, k): each offset slice G_ij = U_ij Σ_ij V_ijᵀ ↦ (1/k²)·√(d_out/d_in)·U_ij V_ijᵀ;
    dual norm Σ_ij (1/k²)·√(d_out/d_in)·‖G_ij‖_nuclear. All k² slices go through one batched
    `orthogonalize` call (or the float64 SVD when exact=True); arguments as for dualize_linear.
    """
    k_h, k_w = G.shape[-2:]
    slices = G.movedim((-2, -1), (-4, -3))  # (..., k, k, d_out, d_in)
    dual = dualize_linear(slices, steps, coefficients, dtype, exact, rounding)
    return dual.movedim((-4, -3), (-2, -1)) / (k_h * k_w)


def dualize_sign(G: torch.Tensor) -> torch.Tensor:
    """Sign head (Scion's LM-head map), norm ‖W‖ = d_in·max_ij |W_ij| (d_in times the ℓ1→ℓ∞ norm).

    G (..., d_out, d_in) ↦ sign(G)/d_in;  dual norm ‖G‖₁/d_in (sum of |G_ij|). Exact; zero entries
    give 0 (the argmax is then not unique and 0 is the smallest choice).
    """
    return torch.sign(G) / G.shape[-1]
