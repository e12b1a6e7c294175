"""Mass and sensitivity bookkeeping of the modular norm: each layer's share of the step.

Large et al. 2024 ("Scalable Optimization in the Modular Norm"; docs/MATH.md) give every module a
mass μ (how much of the step its weights may take) and a sensitivity ν (how much its output can move
per unit change of its input). Atoms (Linear, Embed, ...) hold weights; bonds (ReLU, RMSNorm, ...)
hold none and have mass 0. Combining two modules:

    composition M₂∘M₁ (M₁ applied first):  μ = μ₁ + μ₂,  ν = ν₁·ν₂,
        ‖(w₁, w₂)‖ = max(ν₂·(μ/μ₁)·‖w₁‖₁, (μ/μ₂)·‖w₂‖₂);  M₁ takes (μ₁/μ)/ν₂ of the step, M₂ takes μ₂/μ;
    concatenation (M₁, M₂), both fed the same input:  μ = μ₁ + μ₂,  ν = ν₁ + ν₂,
        ‖(w₁, w₂)‖ = max_i (μ/μᵢ)·‖wᵢ‖ᵢ;  Mᵢ takes μᵢ/μ.

The residual combinators follow from these two and two bonds:

    sum M₁ + M₂ = (the sum bond, ν = 1) ∘ (M₁, M₂):  μ = μ₁ + μ₂,  ν = ν₁ + ν₂;  Mᵢ takes μᵢ/μ;
    scalar a·M = (multiply by a, a bond of ν = |a|) ∘ M:  μ, |a|·ν;  M takes 1/|a|;
    residual (1 − a)·x + a·M(x), 0 < a ≤ 1, with the identity a bond of ν = 1:  ν = 1 − a + a·ν_M,
        and M takes 1/a: a branch whose output is scaled down may move its weights further.

Multiplying the shares down the tree gives each atom its share s of the step; stepping every atom by
s·lr·dualize(its gradient) makes the whole update exactly lr in the modular norm. For a chain of L
Linear layers of mass 1 joined by ReLUs (ν = 1) every share is 1/L, so the step each layer takes
shrinks as the net deepens and the best lr no longer depends on depth. The optimizer side is plain:
`modular_groups` turns the shares into Muon param groups, one per atom, with lr·share as the group lr.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Module:
    """A node of the modular-norm tree: an atom (named, holds weights), a bond, or a combination."""

    mass: float
    sensitivity: float
    op: str = "atom"  # atom | bond | compose | concatenate | stack (sum, scalar, residual: from these)
    name: str | None = None
    children: tuple["Module", ...] = ()


def atom(name: str, mass: float = 1.0, sensitivity: float = 1.0) -> Module:
    """A layer with weights, e.g. a Linear (sensitivity 1: it is well-normed, ‖W x‖ ≤ ‖W‖·‖x‖)."""
    if not mass > 0:
        raise ValueError(f"atom {name!r}: mass must be > 0, got {mass}; a weightless layer is a bond")
    return Module(mass, sensitivity, name=name)


def bond(sensitivity: float = 1.0) -> Module:
    """A layer without weights, mass 0; e.g. ReLU is 1-Lipschitz in the RMS norm, so ν = 1."""
    return Module(0.0, sensitivity, op="bond")


def compose(*modules: Module) -> Module:
    """The modules applied one after another, listed in the order the data flows through them."""
    if not modules:
        raise ValueError("compose: needs at least one module")
    result = modules[0]
    for outer in modules[1:]:
        result = Module(result.mass + outer.mass, result.sensitivity * outer.sensitivity, "compose",
                        children=(result, outer))
    return result


def concatenate(*modules: Module) -> Module:
    """The modules side by side on the same input, their outputs kept as a tuple."""
    if not modules:
        raise ValueError("concatenate: needs at least one module")
    return Module(sum(m.mass for m in modules), sum(m.sensitivity for m in modules), "concatenate",
                  children=tuple(modules))


def stack(name: str, k: int, mass: float = 1.0, sensitivity: float = 1.0) -> Module:
    """k atoms of `mass` side by side on one input, held as one tensor (k, d_out, d_in) and each matrix
    dualized on its own (model.gpt.StackedLinear, e.g. merged q, k, v): their concatenation, μ = k·mass,
    ν = k·sensitivity, ‖w‖ = k·max_i ‖W_i‖. step_shares gives `name` one matrix's share (1/k of the
    stack's); modular_norm reads norms[name] as max_i ‖W_i‖."""
    if k < 1:
        raise ValueError(f"stack {name!r}: k must be >= 1, got {k}")
    matrices = (atom(name, mass, sensitivity),) * k
    return Module(k * mass, k * sensitivity, "stack", name=name, children=matrices)


def add(*modules: Module) -> Module:
    """The sum of the modules' outputs on the same input: their concatenation, then the sum (ν = 1)."""
    return compose(concatenate(*modules), bond(1.0))


def scale(module: Module, a: float) -> Module:
    """The module's output times a (a ≠ 0): composition with a weightless bond of sensitivity |a|."""
    if a == 0:
        raise ValueError("scale: a must be nonzero; a module scaled by 0 takes no part in the network")
    return compose(module, bond(abs(a)))


def residual(branch: Module, a: float) -> Module:
    """The residual block x ↦ (1 − a)·x + a·branch(x) of a well-normed network, 0 < a ≤ 1."""
    if not 0 < a <= 1:
        raise ValueError(f"residual: the branch weight a must be in (0, 1], got {a}")
    if a == 1:
        return branch
    return add(scale(bond(1.0), 1 - a), scale(branch, a))


def chain(names: Iterable[str], mass: float = 1.0, bond_sensitivity: float = 1.0) -> Module:
    """An MLP: atoms `names` (first layer first), each of `mass`, with a bond between neighbours."""
    layers = [atom(name, mass) for name in names]
    joined = [layers[0]]
    for layer in layers[1:]:
        joined += [bond(bond_sensitivity), layer]
    return compose(*joined)


def step_shares(module: Module) -> dict[str, float]:
    """Each atom's share of the step, the product of the shares on its path from the root."""
    if module.op == "atom":
        return {module.name: 1.0}
    if module.op == "stack":
        return {module.name: 1.0 / len(module.children)}
    shares: dict[str, float] = {}
    for child, factor in zip(module.children, _child_factors(module), strict=True):
        for name, share in step_shares(child).items():
            if name in shares:
                raise ValueError(f"step_shares: atom {name!r} appears twice; give each atom its own name")
            shares[name] = factor * share
    return shares


def modular_norm(module: Module, norms: dict[str, float]) -> float:
    """The modular norm of weights whose atoms have the norms `norms` (name → ‖w‖ of that atom)."""
    if module.op == "atom":
        return norms[module.name]
    if module.op == "stack":
        return len(module.children) * norms[module.name]
    if module.op == "bond":
        return 0.0
    terms = []
    for child, factor in zip(module.children, _child_factors(module), strict=True):
        if child.mass > 0:  # a weightless child adds nothing to the max
            terms.append(modular_norm(child, norms) / factor)
    return max(terms, default=0.0)


def _child_factors(module: Module) -> list[float]:
    """The share of the step each child gets; the norm weighs each child by the inverse."""
    if module.op == "bond" or module.mass == 0:
        return [0.0] * len(module.children)
    if module.op == "concatenate":
        return [child.mass / module.mass for child in module.children]
    inner, outer = module.children
    return [inner.mass / module.mass / outer.sensitivity, outer.mass / module.mass]


def modular_groups(
    params: dict[str, list[torch.Tensor]],
    module: Module,
    lr: float,
    kinds: dict[str, str] | None = None,
    **group: object,
) -> list[dict]:
    """Muon param groups, one per atom of `module`, each with lr·(the atom's share) as its lr.

    params maps every atom name to the tensors it holds; kinds maps an atom name to its Muon kind
    (e.g. "embed", "head_linear"), overriding a kind given in `group`; extra keyword arguments
    (kind, momentum, lr_scale, ...) are copied into every group. A training loop that schedules lr
    by scaling each group's own lr keeps the shares.
    """
    shares = step_shares(module)
    kinds = kinds or {}
    if set(params) != set(shares) or not set(kinds) <= set(shares):
        raise ValueError(
            f"modular_groups: params name atoms {sorted(params)} (kinds {sorted(kinds)}) "
            f"but the module has {sorted(shares)}"
        )
    return [{**group, "params": params[name], "lr": lr * shares[name]}
            | ({"kind": kinds[name]} if name in kinds else {}) for name in shares]
