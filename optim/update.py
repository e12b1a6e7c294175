"""One update of a list of tensors by their kind: momentum and duality map, or Adam.

The same code steps whole parameters in one process and each rank's share of them across ranks
(optim/distributed.py), where a tensor may be a slice of a parameter. `flags` is None when every
tensor has a gradient, or a bool vector on the device, one per tensor: False where no rank had a
gradient, which makes that tensor's step an exact no-op, computed without reading the flags on the
host. Optimizer state is kept in the dtype of the group's state_dtype rule (STATE_DTYPES): by default
at least float32, whatever the parameter's dtype, and the whole update is computed in it from the stored
value; a bf16 parameter is then rounded once, as it is stored.

Adam's update (the speedrun's embeddings, head and scalars) is one function, adam_math, compiled on
CUDA with torch.compile(fullgraph=True, dynamic=False), as Newton–Schulz is
(optim/newton_schulz.py compiled): its ~15 foreach passes over memory fuse into a few kernels. So
that a scheduled lr does not recompile it, the compiled call gets lr as a 0-dim tensor on the
device, refilled in place each call; β₁, β₂, ε, ε's place and the weight decay are constants of its graph (a
change recompiles, as does a new list of shapes: one graph per param group or shard).
"""

import functools
import math
from collections.abc import Callable
from functools import partial

import torch

from .kinds import LR_SCALES, MATRIX, Kind
from .newton_schulz import compile_backend, compiled, default_dtype

# (kind, group, updates) -> the mapped updates, in order: dualize_all or a distributed stand-in.
Dualize = Callable[[Kind, dict, list[torch.Tensor]], list[torch.Tensor]]


# A group's state_dtype: the dtype of its state tensors (Adam's step counter aside) for a parameter p.
STATE_DTYPES = {
    "float32": lambda p: torch.promote_types(p.dtype, torch.float32),  # at least float32: Muon's rule
    "param": lambda p: p.dtype,  # p's own: a bf16 gate's NorMuon buffers in bf16 (record #46)
    "bfloat16": lambda p: torch.bfloat16,  # record #46's DistAdam moments, for every parameter
}


# A group's step_rounding: where its step's arithmetic rounds. "precise": in the state dtype (at least
# float32 by default) throughout, each tensor rounded once as stored (adam_math, _momentum_update);
# "stepwise": after every operation, as eager PyTorch in record #46's order and dtypes (adam_math_stepwise,
# its DistAdam on bf16 moments; matrix_update_stepwise, its NorMuon on Polar Express's bf16 result).
STEP_ROUNDINGS = ("precise", "stepwise")


def state_dtype(p: torch.Tensor, rule: str = "float32") -> torch.dtype:
    """The dtype of p's optimizer state under a group's state_dtype `rule` (STATE_DTYPES): "float32"
    float32 for bf16/fp16/fp32 parameters and float64 for float64; "param" p's dtype; "bfloat16" bf16."""
    return STATE_DTYPES[rule](p)


def where_flagged(flags: torch.Tensor | None, on: float, off: float = 0.0) -> "float | list[torch.Tensor]":
    """`on` without flags; else one 0-dim tensor per tensor, `on` where flagged and `off` elsewhere."""
    if flags is None:
        return on
    return list(torch.where(flags, on, off).unbind())


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm/(total_norm + 1e-6)), on the device."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def resting(group: dict) -> bool:
    """True when the coming step() leaves the group's tensors alone (step_every > 1): its gradients keep
    accumulating, and it steps at every step_every-th call on their sum."""
    return group["pending_steps"] + 1 < group["step_every"]


def matrix_dims(group: dict, shape: tuple) -> tuple[int, int]:
    """(m, n) of the matrices a MATRIX kind maps in a tensor of `shape`: its last two dims, or the
    group's matrix_shape, a view of the tensor's memory as a stack of (m, n) matrices."""
    return tuple(group["matrix_shape"]) if group["matrix_shape"] else tuple(shape[-2:])


def lr_scale(kind: Kind, group: dict, shape: tuple) -> float:
    """The factor s the kind's map is multiplied by: the group's LR_SCALES rule on the matrix dims, or 1."""
    return LR_SCALES[group["lr_scale"]](*matrix_dims(group, shape)) if kind.lr_scale else 1.0


def kind_update(kind: Kind, group: dict, states: list[dict], tensors: list[torch.Tensor],
                grads: list[torch.Tensor], flags: torch.Tensor | None,
                dualize: Dualize | None = None) -> None:
    """Step `tensors` in place by their kind's rule, given their gradients (averaged over ranks, if any).

    For MATRIX kinds the tensors share one shape: their maps run as one stacked call, `dualize_all`,
    unless `dualize` replaces it (same arguments and result): optim/fsdp.py passes one that assembles
    whole matrices from row shards, maps them on one rank and returns the shards of the result.
    """
    if kind.dualize is None:
        adam_update(group, states, tensors, grads, flags)
        return
    dtypes = [state_dtype(t, group["state_dtype"]) for t in tensors]  # the update is computed in it
    precise = [t if t.dtype == d else t.to(d) for t, d in zip(tensors, dtypes, strict=True)]
    grads = [g.to(d) for g, d in zip(grads, dtypes, strict=True)]
    if group["step_rounding"] == "stepwise":  # Muon refuses it where `dualize` stands in (fully_shard)
        matrix_update_stepwise(kind, group, states, precise, grads, flags)
    else:
        _momentum_update(kind, group, states, precise, grads, flags, dualize or dualize_all)
    for t, p in zip(tensors, precise, strict=True):
        if p is not t:
            t.copy_(p)  # a low-precision parameter, rounded once


def _momentum_update(kind, group, states, tensors, grads, flags, dualize) -> None:
    """u = map(m(g)), or m(map(g)) for kinds that dualize before momentum; p ← p·(1 − lr·wd) − lr·u."""
    if kind.before_momentum:
        grads = [kind.dualize(g, group) for g in grads]
    updates = _momentum(group, states, tensors, grads, flags)
    if not kind.before_momentum:
        if group["normuon"] is None:
            updates = dualize(kind, group, updates)
        else:  # Muon refuses normuon where another map stands in (fully_shard): it needs whole matrices
            updates = dualize_all(kind, group, updates, partial(normuon, group, states, flags))
    _apply(kind, group, tensors, updates, flags)


def _momentum(group: dict, states: list[dict], tensors: list[torch.Tensor], grads: list[torch.Tensor],
              flags: torch.Tensor | None) -> list[torch.Tensor]:
    """buf ← lerp(buf, g, 1−μ) (state "momentum_buffer", made at the first call in t's dtype, its state
    dtype: kind_update); returns the update u = lerp(g, buf, μ) with Nesterov, else the buffers."""
    bufs = []
    for state, t in zip(states, tensors, strict=True):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(t)
        bufs.append(state["momentum_buffer"])
    mu = group["momentum"]
    torch._foreach_lerp_(bufs, grads, where_flagged(flags, 1 - mu))
    return torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs


def dualize_all(kind: Kind, group: dict, updates: list[torch.Tensor],
                normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The kind's map of each update; a MATRIX kind's same-shape updates in one stacked call.

    A MATRIX kind maps the stack (K, *shape) as (K, …, m, n) matrices (matrix_dims: the group's
    matrix_shape views each tensor's memory as a stack of (m, n) matrices), then `normalize`
    (NorMuon) on those mapped matrices, then multiplies by lr_scale.
    """
    if kind.shard != MATRIX:
        return [kind.dualize(u, group) for u in updates]
    stack, matrices = _stacked_matrices(group, updates)
    dual = kind.dualize(matrices, group)  # one batched Newton–Schulz call
    if normalize is not None:
        dual = normalize(dual)
    dual = dual.view(stack.shape)
    if kind.lr_scale:
        dual.mul_(lr_scale(kind, group, stack.shape))
    return list(dual.unbind(0))


def _stacked_matrices(group: dict, updates: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the stack (K, *shape) of same-shape updates, its (K, …, m, n) matrices: the group's matrix_shape
    view of each tensor's memory, or the stack itself)."""
    stack = torch.stack(updates)
    return stack, stack.view(len(updates), -1, *group["matrix_shape"]) if group["matrix_shape"] else stack


def normuon_axis(group: dict, m: int, n: int) -> int:
    """The dim NorMuon averages over in an (m, n) matrix: -1 (one second moment per row) for "row", -2 (one
    per column) for "column"; "auto" takes rows when m ≥ n, else columns: the larger side's."""
    axis = group["normuon"]
    return -1 if axis == "row" or (axis == "auto" and m >= n) else -2


def normuon_shape(group: dict, shape: tuple) -> tuple:
    """Shape of NorMuon's second moment for a tensor of `shape`: its matrices' stack, the averaged dim 1."""
    m, n = matrix_dims(group, shape)
    stack = (math.prod(shape) // (m * n),) if group["matrix_shape"] else tuple(shape[:-2])
    return (*stack, m, 1) if normuon_axis(group, m, n) == -1 else (*stack, 1, n)


def _second_moments(group: dict, states: list[dict], V: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """(the normuon axis of V's (K, …, m, n) matrices, each of the K states' "second_moment"), made at the
    first call: zeros of V[k]'s shape with the axis 1, in the state's momentum dtype."""
    dim = normuon_axis(group, *V.shape[-2:])
    shape = list(V.shape[1:])
    shape[dim] = 1
    for state in states:
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros(shape, dtype=state["momentum_buffer"].dtype, device=V.device)
    return dim, [state["second_moment"] for state in states]


def normuon(group: dict, states: list[dict], flags: torch.Tensor | None, V: torch.Tensor) -> torch.Tensor:
    """NorMuon (Li et al. 2025) on the mapped matrices V (K, …, m, n), one entry of `states` per k.

    Per matrix: r = ‖V‖_F; q = mean of V² over the normuon axis (per row or per column);
    s ← lerp(s, q, 1 − β₂) with β₂ the group's beta2 (state "second_moment");
    V ← V/√max(s, 1e-10), broadcast along the axis;  V ← V·r/max(‖V‖_F, 1e-10).
    An unflagged tensor's s is left as it is.
    """
    dim, buffers = _second_moments(group, states, V)
    norm = torch.linalg.vector_norm(V, dim=(-2, -1), keepdim=True)
    mean = V.square().mean(dim=dim, keepdim=True)
    torch._foreach_lerp_(buffers, list(mean.unbind(0)), where_flagged(flags, 1 - group["beta2"]))
    V = V * torch.stack(buffers).clamp_min(1e-10).rsqrt()
    return V * (norm / torch.linalg.vector_norm(V, dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def matrix_update_stepwise(kind: Kind, group: dict, states: list[dict], tensors: list[torch.Tensor],
                           grads: list[torch.Tensor], flags: torch.Tensor | None) -> None:
    """_momentum_update of a matrix kind as record #46's NorMuon computes it (step_rounding "stepwise"):
    eager ops in its order, in place, each result rounded ⌊·⌉ to the dtype it writes. Momentum and p in
    their state dtype; the map's result V in ns_dtype (the record's Polar Express returns bf16 whatever
    it is given), and every later op on V in V's dtype:

        b ← ⌊lerp(b, g, 1−μ)⌉;  u = ⌊lerp(g, b, μ)⌉ (Nesterov; else u = b);  V = ⌊map(u)⌉ in ns_dtype
        NorMuon (normuon set): r = ⌊‖V‖_F⌉, q = ⌊mean of V² over its axis⌉, s ← ⌊lerp(s, q, 1−β₂)⌉,
            V ← ⌊V·⌊1/√max(s, 1e-10)⌉⌉,  V ← ⌊V·⌊r/max(⌊‖V‖_F⌉, 1e-10)⌉⌉
        in_update decay:  V ← ⌊V + ⌊lr·wd⌉·[V·p ≥ 0]·p⌉   (the mask only with cautious_wd)
        p ← ⌊p − e·V⌉,  e = ⌊lr·⌊a·⌊lr_mul⌉⌉⌉,  a the kind's lr_scale

    the coefficients rounded to p's dtype, as the record's tensors hold them. "decoupled" decay is
    p ← ⌊p·(1 − lr·wd)⌉ (cautious: ⌊p − lr·wd·[V·p ≥ 0]·p⌉) before the step instead. With float32 p
    and float32 Newton–Schulz this is _momentum_update up to float32 rounding; with bf16 Newton–Schulz
    NorMuon runs on bf16 V, which _momentum_update reads into p's dtype first. An unflagged tensor's V
    is multiplied by 0: it and its second moment stay as they are.
    """
    stack, matrices = _stacked_matrices(group, _momentum(group, states, tensors, grads, flags))
    work = group["ns_dtype"] or default_dtype(stack.device)
    V = kind.dualize(matrices.to(torch.promote_types(stack.dtype, work)), group).to(work)
    if group["normuon"] is not None:
        _normuon_stepwise(group, states, flags, V)
    V = V.view(stack.shape)
    P = torch.stack(tensors)  # the record's param_chunk: stepped as one tensor, then copied back
    flag = True if flags is None else flags.view(-1, *[1] * (V.dim() - 1))
    if flags is not None:
        V.mul_(flag)
    lr, wd, cautious = group["lr"], group["weight_decay"], group["cautious_wd"]
    if wd:
        mask = (V * P >= 0) if cautious else True
        if group["wd_form"] == "in_update":
            V.addcmul_(P, lr * wd * _record_coefficient(P, 1.0, 1.0) * mask * flag)
        elif cautious:
            P.sub_(P * mask * (lr * wd) * flag)
        else:
            _scale_(P, 1 - lr * wd if flags is None else torch.where(flag, 1 - lr * wd, 1.0))
    scale = lr_scale(kind, group, tuple(stack.shape[1:]))
    P.addcmul_(V, -(lr * _record_coefficient(P, scale, group["lr_mul"])))
    torch._foreach_copy_(tensors, list(P.unbind(0)))


def _normuon_stepwise(group: dict, states: list[dict], flags: torch.Tensor | None, V: torch.Tensor) -> None:
    """normuon's map in place on V (K, …, m, n), as record #46 computes it: r, q and V's products in V's
    dtype, the second moment ("second_moment", in the momentum's dtype) and its 1/√ in its own."""
    dim, buffers = _second_moments(group, states, V)
    norm = V.norm(dim=(-2, -1), keepdim=True)
    mean = V.square().mean(dim=dim, keepdim=True)
    means = [q.to(b.dtype) for q, b in zip(mean.unbind(0), buffers, strict=True)]
    torch._foreach_lerp_(buffers, means, where_flagged(flags, 1 - group["beta2"]))
    V.mul_(torch.stack(buffers).clamp_min(1e-10).rsqrt_())
    V.mul_(norm / V.norm(dim=(-2, -1), keepdim=True).clamp_min_(1e-10))


def _record_coefficient(like: torch.Tensor, scale: float, factor: float) -> torch.Tensor:
    """⌊scale·⌊factor⌉⌉ as a 0-dim tensor of like's dtype on its device: record #46's per-parameter
    coefficients (its param_lr, param_wd), which it holds as tensors of the parameter's dtype."""
    return scale * torch.full((), factor, dtype=like.dtype, device=like.device)


def _apply(kind: Kind, group: dict, tensors: list[torch.Tensor], updates: list[torch.Tensor], flags) -> None:
    """p ← p − lr·lr_mul·u − ρ·[u·p ≥ 0]·p; the mask only with cautious_wd. The decay rate ρ:

        wd_form "decoupled"  ρ = lr·wd                      (AdamW's, at the group lr)
        wd_form "in_update"  ρ = lr·lr_mul·s·(lr·wd)        (record #43: p ← p − lr·lr_mul·s·(v + lr·wd·p),
                                                            u = s·v, s the kind's lr_scale)

    so that in_update's decay follows the lr schedule twice.
    """
    lr, wd, step = group["lr"], group["weight_decay"], group["lr"] * group["lr_mul"]
    if flags is not None:
        updates = torch._foreach_mul(updates, where_flagged(flags, 1.0))  # not in place: may be the buffers
    rate = lr * wd
    if group["wd_form"] == "in_update":
        rate *= step * lr_scale(kind, group, tensors[0].shape)  # one shape per call for MATRIX kinds
    if wd and group["cautious_wd"]:
        decay = [t * (u * t >= 0) for t, u in zip(tensors, updates, strict=True)]
        if flags is not None:  # an unflagged u is 0, which passes u·p ≥ 0: no decay there either
            decay = torch._foreach_mul(decay, where_flagged(flags, 1.0))
        torch._foreach_sub_(tensors, decay, alpha=rate)
    elif wd:
        torch._foreach_mul_(tensors, where_flagged(flags, 1 - rate, 1.0))
    torch._foreach_add_(tensors, updates, alpha=-step)


def adam_update(group: dict, states: list[dict], tensors: list[torch.Tensor], grads: list[torch.Tensor],
                flags: torch.Tensor | None, compile: "bool | str | Callable | None" = None) -> None:
    """Adam's step of `tensors` given their gradients: state made at the first call, then adam_math
    with β₁ the group's momentum (so schedulers that cycle momentum drive it), β₂ its beta2, the step
    size lr·lr_mul, ε where its eps_form puts it ("raw": raw_eps), and the weight decay of its wd_form
    (as _apply's, with s = 1): "decoupled" ρ = lr·lr_mul·wd, torch's AdamW and the record's DistAdam;
    "in_update" ρ = (lr·lr_mul)·lr·wd. The group's step_rounding (STEP_ROUNDINGS) picks the arithmetic:
    "precise" adam_math, "stepwise" adam_math_stepwise (eager, whatever `compile` says).

    `compile` as orthogonalize's: None compiles on CUDA only, True or a backend anywhere, False never.
    """
    for state, t in zip(states, tensors, strict=True):
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=t.device)
            state["exp_avg"] = torch.zeros_like(t, dtype=state_dtype(t, group["state_dtype"]))
            state["exp_avg_sq"] = torch.zeros_like(t, dtype=state_dtype(t, group["state_dtype"]))
    moments = ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states])
    beta1, beta2, lr_mul = group["momentum"], group["beta2"], group["lr_mul"]
    step = group["lr"] * lr_mul
    # ρ = step·weight_decay, or step²·weight_decay for in_update (lr·wd = step·wd/lr_mul): lr stays a
    # tensor of the compiled graph and never one of its constants.
    squared = group["wd_form"] == "in_update"
    weight_decay = group["weight_decay"] / lr_mul if squared else group["weight_decay"]
    constants = dict(weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=group["eps"],
                     cautious=group["cautious_wd"], squared=squared, raw_eps=group["eps_form"] == "raw")
    if group["step_rounding"] == "stepwise":
        adam_math_stepwise(tensors, grads, *moments, flags, step, **constants)
        return
    backend = compile_backend(tensors[0].device, compile)
    if backend is None:
        adam_math(tensors, grads, *moments, flags, step, **constants)
    else:
        lr = _scalar_tensor(tensors[0].device).fill_(step)
        compiled(adam_math, backend)(tensors, grads, *moments, flags, lr, **constants)


def adam_math(tensors: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
              exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], flags: torch.Tensor | None,
              lr: "float | torch.Tensor", weight_decay: float, beta1: float, beta2: float,
              eps: float, cautious: bool = False, squared: bool = False, raw_eps: bool = False) -> None:
    """torch.optim.AdamW's math in at least float32, with its step count on the device (no host reads).

    m ← lerp(m, g, 1−β₁);  v ← β₂·v + (1−β₂)·g²;  d = lr/(1−β₁ᵗ)·m/(√v/√(1−β₂ᵗ) + ε);
    p ← p·(1 − ρ) − d, with ρ = lr·wd (lr²·wd if squared). cautious: p ← p − ρ·[d·p ≥ 0]·p − d instead,
    decaying only where the step already pulls p towards 0.

    raw_eps: ε is added to √v before the bias correction, d = lr·(√(1−β₂ᵗ)/(1−β₁ᵗ))·m/(√v + ε), the
    Adam paper's efficient form (Kingma & Ba 2015, §2) and the speedrun records' DistAdam. It is torch's
    form with ε/√(1−β₂ᵗ) in place of ε: 1/√(1−β₂) times larger at t = 1 (4.5× at β₂ = 0.95), the same
    once β₂ᵗ ≪ 1.

    tensors (any float dtype) are read into at least float32 (state_dtype's "float32" rule) and
    written back rounded once; grads are read into it. Moments stored in a lower precision (a group's
    state_dtype "bfloat16", record #46's DistAdam) are read into it too, updated, rounded once as
    stored, and d is computed from the stored, rounded m and v (eagerly; compiled, inductor's fused
    kernel keeps their float32 values, as it does for the record's compiled DistAdam). lr: a float, or
    a 0-dim tensor on the device (the compiled call's). Every tensor's storage is updated in place;
    nothing else is written.
    """
    precise = [t if t.dtype == state_dtype(t) else t.to(state_dtype(t)) for t in tensors]
    stored = (exp_avgs, exp_avg_sqs)
    grads, exp_avgs, exp_avg_sqs = (_read_as(xs, precise) for xs in (grads, *stored))
    rate = lr * lr * weight_decay if squared else lr * weight_decay
    torch._foreach_add_(steps, where_flagged(flags, 1.0))
    if weight_decay and not cautious:
        torch._foreach_mul_(precise, where_flagged(flags, 1 - rate, 1.0))
    torch._foreach_lerp_(exp_avgs, grads, where_flagged(flags, 1 - beta1))
    torch._foreach_mul_(exp_avg_sqs, where_flagged(flags, beta2, 1.0))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)  # g = 0 where no rank had one
    _round_to_stored(stored, (exp_avgs, exp_avg_sqs))
    step_size, bias2_sqrt = _step_sizes(steps, flags, lr, beta1, beta2, raw_eps)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if not raw_eps:  # the correction on √v, before ε; raw_eps has it in step_size
        torch._foreach_div_(denom, list(bias2_sqrt.unbind()))
    torch._foreach_add_(denom, eps)
    steps_taken = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(steps_taken, list(step_size.unbind()))
    if weight_decay and cautious:  # an unflagged step is 0, and so is its decay: its rate is 0 there
        decay = [p * (d * p >= 0) for p, d in zip(precise, steps_taken, strict=True)]
        torch._foreach_mul_(decay, where_flagged(flags, rate))
        torch._foreach_sub_(precise, decay)
    torch._foreach_sub_(precise, steps_taken)
    for t, p in zip(tensors, precise, strict=True):
        if t.dtype != p.dtype:
            t.copy_(p)  # a low-precision parameter, rounded once


def adam_math_stepwise(tensors: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                       exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], flags: torch.Tensor | None,
                       lr: float, weight_decay: float, beta1: float, beta2: float, eps: float,
                       cautious: bool = False, squared: bool = False, raw_eps: bool = False) -> None:
    """adam_math's step as record #46's DistAdam computes it (step_rounding "stepwise"): PyTorch's
    eager ops in place on the stored tensors, in the record's order, each rounding its result ⌊·⌉ to
    the dtype of the tensor it writes (the moments' for m, v and the step u; p's for p):

        p ← ⌊p·(1 − ρ)⌉;  m ← ⌊⌊m·β₁⌉ + (1 − β₁)·g⌉;  v ← ⌊⌊v·β₂⌉ + (1 − β₂)·g²⌉;
        raw_eps:  u = ⌊⌊m / ⌊⌊√v⌉ + ε⌉⌉ · s⌉,  s = lr·√(1−β₂ᵗ)/(1−β₁ᵗ);
        else:     u = ⌊⌊m / ⌊⌊⌊√v⌉/√(1−β₂ᵗ)⌉ + ε⌉⌉ · s⌉,  s = lr/(1−β₁ᵗ);
        p ← ⌊p − u⌉

    with s computed in float64, as the record's Python floats (cautious: p ← ⌊p − ρ·[u·p ≥ 0]·p⌉ in
    place of the first decay). The additions are the record's own ops, so they round as its code does
    on each device (on CPU, bf16's add_ takes its alpha in bf16); the products by a scalar are
    _scale_, eager's mul_ by a Python float. With float32 moments this is adam_math up to float32
    rounding (m's mul-add in place of its lerp); with bf16 moments (state_dtype "bfloat16") every line
    rounds to bf16, where adam_math rounds once, at the store. Eager, as the record's step runs (its
    torch.compile breaks at its first collective): a fused kernel would keep float32 intermediates.
    Arguments as adam_math's, lr a float.
    """
    torch._foreach_add_(steps, where_flagged(flags, 1.0))
    step_size, bias2_sqrt = _step_sizes([t.double() for t in steps], flags, lr, beta1, beta2, raw_eps)
    rate = lr * lr * weight_decay if squared else lr * weight_decay
    count = len(tensors)
    keep_m, keep_v, decay = (_per_tensor(where_flagged(flags, *on_off), count)
                             for on_off in ((beta1, 1.0), (beta2, 1.0), (rate, 0.0)))
    for i, (p, g, m, v) in enumerate(zip(tensors, grads, exp_avgs, exp_avg_sqs, strict=True)):
        # g is 0 where no rank had one: with the keeps at 1 there, m and v stay as they are
        if weight_decay and not cautious:
            _scale_(p, 1 - decay[i])
        _scale_(m, keep_m[i]).add_(g, alpha=1 - beta1)
        _scale_(v, keep_v[i]).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt()
        if not raw_eps:  # ⌊√v/√(1−β₂ᵗ)⌉, as _scale_ multiplies
            denom.copy_(denom.to(state_dtype(denom)) / bias2_sqrt[i])
        update = _scale_(m.div(denom.add_(eps)), step_size[i])
        if weight_decay and cautious:
            p.sub_(p * (update * p >= 0) * decay[i])
        p.add_(update, alpha=-1.0)


def _scale_(t: torch.Tensor, factor: "float | torch.Tensor") -> torch.Tensor:
    """t ← ⌊t·factor⌉, the product in at least float32 (state_dtype's rule): eager PyTorch's
    t.mul_(a Python float) on CPU and CUDA alike, also for a factor held as a tensor on the device
    (which t.mul_ would round to a bf16 t's dtype first on CUDA)."""
    return t.copy_(t.to(state_dtype(t)) * factor)


def _step_sizes(steps: list[torch.Tensor], flags: torch.Tensor | None, lr: "float | torch.Tensor",
                beta1: float, beta2: float, raw_eps: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, √(1−β₂ᵗ)) per tensor at its step count t, vectors on the device in the steps' dtype:
    s = lr·√(1−β₂ᵗ)/(1−β₁ᵗ) with raw_eps, else lr/(1−β₁ᵗ); an unflagged tensor gets s = 0 and 1."""
    step = torch.stack(steps)
    bias1, bias2_sqrt = 1 - beta1**step, (1 - beta2**step).sqrt()
    step_size = lr * (bias2_sqrt / bias1) if raw_eps else lr / bias1
    if flags is not None:  # a tensor never stepped has t = 0: keep its 1/0 out of the arithmetic
        step_size, bias2_sqrt = torch.where(flags, step_size, 0.0), torch.where(flags, bias2_sqrt, 1.0)
    return step_size, bias2_sqrt


def _per_tensor(values: "float | list[torch.Tensor]", count: int) -> list:
    """where_flagged's answer as one entry per tensor."""
    return values if isinstance(values, list) else [values] * count


def _read_as(tensors: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor in its partner's dtype in `like`: itself where it already is, else a copy."""
    return [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(tensors, like, strict=True)]


def _round_to_stored(stored: tuple[list, list], working: tuple[list, list]) -> None:
    """Each working moment (at least float32) written into its stored tensor where that is of a lower
    precision, and read back from it: the stored value is rounded once, the step reads what is stored
    (eagerly: inductor elides the read-back's rounding inside a fused kernel)."""
    for stored_list, working_list in zip(stored, working, strict=True):
        for s, w in zip(stored_list, working_list, strict=True):
            if s is not w:
                s.copy_(w)
                w.copy_(s)


@functools.cache
def _scalar_tensor(device: torch.device) -> torch.Tensor:
    """One 0-dim float32 tensor per device, refilled before each compiled call (stream-ordered)."""
    return torch.zeros((), dtype=torch.float32, device=device)
