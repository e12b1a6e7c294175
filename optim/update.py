"""One update of a list of tensors by their kind: momentum and duality map, or Adam.

The same code steps whole parameters in one process and each rank's share of them across ranks
(optim/distributed.py), where a tensor may be a slice of a parameter. `flags` is None when every
tensor has a gradient, or a bool vector on the device, one per tensor: False where no rank had a
gradient, which makes that tensor's step an exact no-op, computed without reading the flags on the
host. Optimizer state is kept in at least float32, whatever the parameter's dtype, and the whole
update is computed in it from the stored value; a bf16 parameter is then rounded once, as it is stored.

Adam's update (the speedrun's embeddings, head and scalars) is one function, adam_math, compiled on
CUDA with torch.compile(fullgraph=True, dynamic=False), as Newton–Schulz is
(optim/newton_schulz.py compiled): its ~15 foreach passes over memory fuse into a few kernels. So
that a scheduled lr does not recompile it, the compiled call gets lr as a 0-dim tensor on the
device, refilled in place each call; β₁, β₂, ε and the weight decay are constants of its graph (a
change recompiles, as does a new list of shapes: one graph per param group or shard).
"""

import functools
from collections.abc import Callable

import torch

from .kinds import LR_SCALES, MATRIX, Kind
from .newton_schulz import compile_backend, compiled

# (kind, group, updates) -> the mapped updates, in order: dualize_all or a distributed stand-in.
Dualize = Callable[[Kind, dict, list[torch.Tensor]], list[torch.Tensor]]


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 parameters, float64 for float64."""
    return torch.promote_types(p.dtype, torch.float32)


def where_flagged(flags: torch.Tensor | None, on: float, off: float = 0.0) -> "float | list[torch.Tensor]":
    """`on` without flags; else one 0-dim tensor per tensor, `on` where flagged and `off` elsewhere."""
    if flags is None:
        return on
    return list(torch.where(flags, on, off).unbind())


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm/(total_norm + 1e-6)), on the device."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


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
    precise = [t if t.dtype == state_dtype(t) else t.to(state_dtype(t)) for t in tensors]
    grads = [g.to(state_dtype(t)) for g, t in zip(grads, tensors, strict=True)]
    _momentum_update(kind, group, states, precise, grads, flags, dualize or dualize_all)
    for t, p in zip(tensors, precise, strict=True):
        if p is not t:
            t.copy_(p)  # a low-precision parameter, rounded once


def _momentum_update(kind, group, states, tensors, grads, flags, dualize) -> None:
    """u = map(m(g)), or m(map(g)) for kinds that dualize before momentum; p ← p·(1 − lr·wd) − lr·u."""
    if kind.before_momentum:
        grads = [kind.dualize(g, group) for g in grads]
    bufs = []
    for state, t in zip(states, tensors, strict=True):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(t, dtype=state_dtype(t))
        bufs.append(state["momentum_buffer"])
    mu = group["momentum"]
    torch._foreach_lerp_(bufs, grads, where_flagged(flags, 1 - mu))  # buf ← lerp(buf, g, 1−μ)
    updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs  # Nesterov: lerp(g, buf, μ)
    if not kind.before_momentum:
        updates = dualize(kind, group, updates)
    _apply(group, tensors, updates, flags)


def dualize_all(kind: Kind, group: dict, updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """The kind's map of each update; a MATRIX kind's same-shape updates in one stacked call."""
    if kind.shard != MATRIX:
        return [kind.dualize(u, group) for u in updates]
    dual = kind.dualize(torch.stack(updates), group)  # one batched Newton–Schulz call
    if kind.lr_scale:
        dual.mul_(LR_SCALES[group["lr_scale"]](*dual.shape[-2:]))
    return list(dual.unbind(0))


def _apply(group: dict, tensors: list[torch.Tensor], updates: list[torch.Tensor], flags) -> None:
    """p ← p·(1 − lr·wd) − lr·u, decoupled weight decay at the group lr; cautious: only where u·p ≥ 0."""
    lr, wd = group["lr"], group["weight_decay"]
    if flags is not None:
        updates = torch._foreach_mul(updates, where_flagged(flags, 1.0))  # not in place: may be the buffers
    if wd and group["cautious_wd"]:
        decay = [t * (u * t >= 0) for t, u in zip(tensors, updates, strict=True)]
        if flags is not None:  # an unflagged u is 0, which passes u·p ≥ 0: no decay there either
            decay = torch._foreach_mul(decay, where_flagged(flags, 1.0))
        torch._foreach_sub_(tensors, decay, alpha=lr * wd)
    elif wd:
        torch._foreach_mul_(tensors, where_flagged(flags, 1 - lr * wd, 1.0))
    torch._foreach_add_(tensors, updates, alpha=-lr)


def adam_update(group: dict, states: list[dict], tensors: list[torch.Tensor], grads: list[torch.Tensor],
                flags: torch.Tensor | None, compile: "bool | str | Callable | None" = None) -> None:
    """Adam's step of `tensors` given their gradients: state made at the first call, then adam_math.

    `compile` as orthogonalize's: None compiles on CUDA only, True or a backend anywhere, False never.
    """
    for state, t in zip(states, tensors, strict=True):
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=t.device)
            state["exp_avg"] = torch.zeros_like(t, dtype=state_dtype(t))
            state["exp_avg_sq"] = torch.zeros_like(t, dtype=state_dtype(t))
    moments = ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states])
    beta1, beta2 = group["betas"]
    constants = dict(weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2, eps=group["eps"])
    backend = compile_backend(tensors[0].device, compile)
    if backend is None:
        adam_math(tensors, grads, *moments, flags, group["lr"], **constants)
    else:
        lr = _scalar_tensor(tensors[0].device).fill_(group["lr"])
        compiled(adam_math, backend)(tensors, grads, *moments, flags, lr, **constants)


def adam_math(tensors: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
              exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], flags: torch.Tensor | None,
              lr: "float | torch.Tensor", weight_decay: float, beta1: float, beta2: float,
              eps: float) -> None:
    """torch.optim.AdamW's math in state_dtype, with its step count on the device (no host reads).

    m ← lerp(m, g, 1−β₁);  v ← β₂·v + (1−β₂)·g²;  p ← p·(1 − lr·wd) − lr/(1−β₁ᵗ)·m/(√v/√(1−β₂ᵗ) + ε)

    tensors (any float dtype) are read into state_dtype and written back rounded once; grads are
    read into it. lr: a float, or a 0-dim tensor on the device (the compiled call's). Every tensor's
    storage is updated in place; nothing else is written.
    """
    precise = [t if t.dtype == state_dtype(t) else t.to(state_dtype(t)) for t in tensors]
    grads = [g if g.dtype == state_dtype(t) else g.to(state_dtype(t))
             for g, t in zip(grads, tensors, strict=True)]
    torch._foreach_add_(steps, where_flagged(flags, 1.0))
    if weight_decay:
        torch._foreach_mul_(precise, where_flagged(flags, 1 - lr * weight_decay, 1.0))
    torch._foreach_lerp_(exp_avgs, grads, where_flagged(flags, 1 - beta1))
    torch._foreach_mul_(exp_avg_sqs, where_flagged(flags, beta2, 1.0))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)  # g = 0 where no rank had one
    step = torch.stack(steps)
    step_size, bias2_sqrt = lr / (1 - beta1**step), (1 - beta2**step).sqrt()
    if flags is not None:  # a tensor never stepped has t = 0: keep its 1/0 out of the arithmetic
        step_size, bias2_sqrt = torch.where(flags, step_size, 0.0), torch.where(flags, bias2_sqrt, 1.0)
    denom = torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), list(bias2_sqrt.unbind()))
    torch._foreach_add_(denom, eps)
    steps_taken = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(steps_taken, list(step_size.unbind()))
    torch._foreach_sub_(precise, steps_taken)
    for t, p in zip(tensors, precise, strict=True):
        if t.dtype != p.dtype:
            t.copy_(p)  # a low-precision parameter, rounded once


@functools.cache
def _scalar_tensor(device: torch.device) -> torch.Tensor:
    """One 0-dim float32 tensor per device, refilled before each compiled call (stream-ordered)."""
    return torch.zeros((), dtype=torch.float32, device=device)
