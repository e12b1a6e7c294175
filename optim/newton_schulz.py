"""Newton–Schulz orthogonalization: G = U Σ Vᵀ  ↦  ≈ U Vᵀ without an SVD.

Each step applies an odd polynomial p(x) = a·x + b·x³ + c·x⁵ to every singular value at once:
with A = X Xᵀ, X ← a·X + (b·A + c·A²)·X. Starting from X₀ = G/(s·‖G‖_F + ε), whose singular values
lie in [0, 1] because the Frobenius norm bounds the spectral norm, a well-chosen sequence of
polynomials pushes every nonzero singular value towards 1 while U and V stay put. Only matmuls
are needed, so it runs in bf16 on a GPU (docs/MATH.md).
"""

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Coefficients:
    """A Newton–Schulz schedule: one (a, b, c) per step, the last repeating; X₀ = G/(scale·‖G‖_F + eps)."""

    triples: tuple[Triple, ...]
    scale: float = 1.0
    eps: float = 1e-7


def _with_safety(a: float, b: float, c: float, factor: float = 1.01) -> Triple:
    # Polar Express divides x by the factor inside p, p(x/f), so round-off that nudges a singular
    # value slightly above the interval the polynomial was optimized for cannot blow up.
    return (a / factor, b / factor**3, c / factor**5)


_POLAR_EXPRESS_STEPS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)

COEFFICIENTS: dict[str, Coefficients] = {
    # Converges for σ ∈ (0, √3) but slowly: the slope at 0 is only 1.5.
    "cubic": Coefficients(((1.5, -0.5, 0.0),)),
    # The paper's convergent quintic: p(1) = 1, p'(1) = 0, p'(0) = 2.
    "quintic": Coefficients(((2.0, -1.5, 0.5),)),
    # The speedrun's quintic: slope 3.4 at 0 buys speed at the price of no fixed point at 1;
    # after 5 steps the singular values land in about [0.68, 1.20], which trains just as well.
    "muon": Coefficients(((3.4445, -4.7750, 2.0315),)),
    # Amsel et al. 2025, Algorithm 1 (d = 5, σ_min/σ_max ≥ 1e-3): optimal per step, then the
    # limit polynomial, which converges quadratically once every σ is near 1.
    "polar_express": Coefficients(
        tuple(_with_safety(*t) for t in _POLAR_EXPRESS_STEPS) + ((1.875, -1.25, 0.375),),
        scale=1.01,
    ),
    # The speedrun's 5-step retune of Polar Express, safety factor already folded in.
    "polar_express_speedrun": Coefficients(
        (
            (8.156554524902461, -22.48329292557795, 15.878769915207462),
            (4.042929935166739, -2.808917465908714, 0.5000178451051316),
            (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
            (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
            (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
        ),
        scale=1.02,
        eps=1e-6,
    ),
}


# Where orthogonalize rounds to its dtype: once after a float32 normalization, then once per fused
# matmul-add ("precise"); after every operation, the 2025-07-12 record's arithmetic ("stepwise"); or
# normalized as "stepwise", then once per fused matmul-add, record #46's Polar Express kernels ("fused").
ROUNDINGS = ("precise", "stepwise", "fused")


def resolve_coefficients(coefficients: "str | Coefficients | Sequence") -> Coefficients:
    """A name from COEFFICIENTS, a Coefficients, one (a, b, c) triple, or a list of triples."""
    if isinstance(coefficients, Coefficients):
        return coefficients
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENTS:
            raise ValueError(
                f"unknown Newton–Schulz coefficients {coefficients!r}; choose one of {sorted(COEFFICIENTS)} "
                "or pass a list of (a, b, c) triples"
            )
        return COEFFICIENTS[coefficients]
    single = len(coefficients) > 0 and isinstance(coefficients[0], (int, float))
    triples = [coefficients] if single else list(coefficients)
    if not triples or any(len(t) != 3 for t in triples):
        raise ValueError(f"Newton–Schulz coefficients must be (a, b, c) triples, got {coefficients!r}")
    return Coefficients(tuple(tuple(float(x) for x in t) for t in triples))


def default_dtype(device: torch.device) -> torch.dtype:
    """Newton–Schulz precision when none is given: bf16 where matmuls are fast in bf16, else float32.

    bf16 on CUDA, and on a CPU with bf16 dot-product instructions (AVX512-BF16, which every CPU with
    AMX-BF16 also has), detected once: there a bf16 matmul runs ~2-3x faster than float32 (measured
    in docs/BENCHMARKS.md). float32 on every other CPU, where bf16 matmuls are emulated and ~100x
    slower, and on other devices.
    """
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and CPU_HAS_BF16_DOT_PRODUCT:
        return torch.bfloat16
    return torch.float32


# Detected once, at import: a constant that code under torch.compile can read (the probe cannot be traced).
CPU_HAS_BF16_DOT_PRODUCT = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def orthogonalize(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: "str | Coefficients | Sequence" = "muon",
    dtype: torch.dtype | None = None,
    compile: "bool | str | Callable | None" = None,
    rounding: str = "precise",
) -> torch.Tensor:
    """≈ U Vᵀ for each matrix of G (..., m, n) = U Σ Vᵀ, by `steps` Newton–Schulz iterations.

    Works on the smaller Gram matrix (m×m with m ≤ n; tall inputs are transposed), so one step
    costs 4m²n + 2m³ FLOPs. `dtype` is the iteration's precision (default:
    `default_dtype(G.device)`); the result has G's dtype. G = 0 gives 0.

    Normalization X₀ = G/(scale·‖G‖_F + eps) is per matrix over the last two dims. `rounding`
    (ROUNDINGS) says where `dtype` rounds:
    - "precise" (the default, the more accurate): the norm and the division in at least float32,
      X₀ rounded once to `dtype` (an fp16 norm would overflow past 65504 and underflow below
      ~2.4e-4); each step two fused matmul-adds, B = b·A + c·A·A and X = a·X + B·X, one rounding each.
    - "stepwise": the speedrun records' arithmetic. G is rounded to `dtype` first and normalized in
      `dtype`, norm included; then every product, scaling and sum is rounded apart, in the order
      B = b·A + (c·A)·A, X = a·X + B·X. In bf16 its result differs from "precise" by ~2.5% (as the
      records' own result moves under a 1e-6 change of its input); an fp16 norm can overflow.
    - "fused": record #46's Polar Express (its Triton kernels, record #38). G rounded to `dtype` and
      normalized in `dtype` as "stepwise"; then each of A = X Xᵀ, B = b·A + c·A², X = a·X + B·X
      summed in float32 and rounded once, as "precise".

    `compile`: None compiles on CUDA only, True compiles anywhere, False never, a torch.compile
    backend (name or callable) compiles with it. Compiled means torch.compile(fullgraph=True,
    dynamic=False), built lazily at the first call: one graph per stack shape, dtype and schedule,
    none of them broken (no Python branch depends on tensor values); torch's recompile limit (8 by
    default) bounds how many a process compiles. Called from code torch.compile is tracing, it adds
    its iteration to that graph instead.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"orthogonalize: rounding={rounding!r}; use one of {ROUNDINGS}")
    schedule = resolve_coefficients(coefficients)
    triples = tuple(schedule.triples[min(step, len(schedule.triples) - 1)] for step in range(steps))
    iterate = _newton_schulz
    backend = compile_backend(G.device, compile)
    if backend and not torch.compiler.is_compiling():  # inside a traced caller the caller's graph has it
        iterate = compiled(_newton_schulz, backend)
    return iterate(G, triples, schedule.scale, schedule.eps, dtype or default_dtype(G.device), rounding)


def compile_backend(device: torch.device, compile: "bool | str | Callable | None") -> "str | Callable | None":
    """The torch.compile backend `compile` asks for on `device`, or None to run eagerly: None means
    "inductor" on CUDA and eager elsewhere, True "inductor", False eager, anything else is the backend."""
    if compile is None:
        return "inductor" if device.type == "cuda" else None
    return "inductor" if compile is True else compile or None


@functools.cache
def compiled(fn: Callable, backend: "str | Callable") -> Callable:
    """fn under torch.compile(fullgraph=True, dynamic=False) with `backend`, built once per pair: one
    graph per input signature (shapes, dtypes, Python constants), none of them broken."""
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)


def _newton_schulz(G: torch.Tensor, triples: tuple[Triple, ...], scale: float, eps: float,
                   dtype: torch.dtype, rounding: str) -> torch.Tensor:
    """X₀ = G/(scale·‖G‖_F + eps) per matrix, then X ← a·X + (b·A + c·A²)·X with A = X Xᵀ per triple,
    rounded to dtype as orthogonalize's `rounding` says."""
    m, n = G.shape[-2:]
    X = G.reshape(-1, m, n)
    if m > n:
        X = X.mT
    X = _normalized(X, scale, eps, dtype, rounding)
    for a, b, c in triples:
        A = X @ X.mT
        if rounding == "stepwise":
            X = a * X + (b * A + (c * A) @ A) @ X
        else:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
            X = torch.baddbmm(X, B, X, beta=a)  # a·X + B·X
    if m > n:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


def _normalized(X: torch.Tensor, scale: float, eps: float, dtype: torch.dtype,
                rounding: str) -> torch.Tensor:
    """X/(scale·‖X‖_F + eps) per matrix (B, m, n), in `dtype`, rounded as orthogonalize's `rounding` says."""
    if rounding in ("stepwise", "fused"):
        X = X.to(dtype)
        return X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) * scale + eps)
    # The norm sums m·n squares: in float32 at least, so fp16 neither overflows nor underflows
    # and bf16 loses no more than the matmuls do.
    precise = torch.promote_types(X.dtype, torch.float32)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=precise)
    return (X.to(precise) / (norm * scale + eps)).to(dtype)


def polar_reference(G: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Exact U Vᵀ of G (..., m, n) by float64 SVD, for tests; returns float64.

    Singular values below rtol·σ_max are dropped: their directions are round-off, and U Vᵀ
    would otherwise inflate them to 1. G = 0 gives 0.
    """
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    keep = S > rtol * S.amax(dim=-1, keepdim=True)
    return (U * keep.unsqueeze(-2)) @ Vh


def newton_schulz_flops(shape: Sequence[int], steps: int = 5) -> int:
    """FLOPs of `steps` iterations on a (..., m, n) stack: per matrix and step 4m²n + 2m³, m ≤ n."""
    m, n = sorted(shape[-2:])
    return math.prod(shape[:-2]) * steps * (4 * m * m * n + 2 * m**3)
