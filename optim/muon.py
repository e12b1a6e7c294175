"""Muon: momentum, then the duality map of each parameter's layer kind (REFERENCE §1, §3)."""

import contextlib
import math

import torch
from torch.optim.adamw import adamw

from .distributed import Sharding
from .duality import dualize_conv2d, dualize_embed, dualize_linear, dualize_sign
from .newton_schulz import orthogonalize, resolve_coefficients

KINDS = ("hidden", "conv", "embed", "head_linear", "head_sign", "adam")

# Scale of a hidden (d_out, d_in) matrix's U Vᵀ. The rules are not interchangeable: each has its
# own good learning rate.
LR_SCALES = {
    "spectral": lambda d_out, d_in: math.sqrt(d_out / d_in),  # the paper: RMS→RMS duality map
    "muon": lambda d_out, d_in: math.sqrt(max(1.0, d_out / d_in)),  # Muon, speedrun, torch "original"
    "rms": lambda d_out, d_in: 0.2 * math.sqrt(max(d_out, d_in)),  # Moonlight: AdamW's update RMS
}

# Dimensions each kind's map needs; hidden also takes stacks of matrices (..., d_out, d_in).
_NDIM = {"conv": 4, "embed": 2, "head_linear": 2, "head_sign": 2}


class Muon(torch.optim.Optimizer):
    """Steepest descent under each layer's own norm: momentum, then the duality map of its kind.

    Each param group has a `kind`; with g the gradient and m(·) the momentum below, the update u
    (applied as p ← p·(1 − lr·wd) − lr·u) is:

        hidden       orthogonalize(m(g)) · lr_scale(d_out, d_in)
        conv         dualize_conv2d(m(g))
        embed        m(dualize_embed(g))
        head_linear  dualize_linear(m(g))
        head_sign    dualize_sign(m(g))
        adam         torch's AdamW step (betas, eps, decoupled weight decay)

    `params` takes tensors or param-group dicts. A group without a kind is split by
    torch.optim.Muon's rule: 2-D tensors are "hidden", everything else "adam";
    `optim.param_groups(model)` routes by layer kind instead. Every constructor argument is also a
    group key that a group may override: lr, momentum, nesterov, weight_decay, cautious_wd,
    ns_steps, ns_coefficients, ns_dtype, lr_scale, and Adam's betas and eps (adam_betas, adam_eps
    here). lr and momentum are read at every step, so a training loop schedules them (e.g. momentum
    warm-up 0.85 → 0.95) by writing group["lr"] and group["momentum"].

    - Momentum m(g), EMA form: buf ← lerp(buf, g, 1−μ); Nesterov u = lerp(g, buf, μ), else u = buf.
    - lr_scale (hidden only): "spectral" √(d_out/d_in), the paper's map, making hidden exactly
      dualize_linear; "muon" √max(1, d_out/d_in), torch.optim.Muon's "original"; "rms"
      0.2·√max(d_out, d_in), Moonlight's match of AdamW's update RMS.
    - Embed dualizes before momentum. A token absent from the batch has a zero gradient row, which
      the map keeps at exactly 0, so that row's momentum decays by μ per step. Dualizing after
      momentum would re-inflate the decaying row to unit RMS, moving every absent token as far as a
      present one on every step.
    - Weight decay is decoupled and uses the group lr, not lr·lr_scale (as torch.optim.Muon);
      cautious_wd=True decays only coordinates where u·p ≥ 0, i.e. where the step already pulls p
      towards 0.
    - Newton–Schulz runs in ns_dtype (None: bf16 on CUDA, float32 on CPU). Within a group, matrices
      of one shape are stacked into one batched call: that stack is the unit a distributed step
      shards across ranks.

    - Adam groups run torch's fused kernel when all their parameters are on CUDA as the group is
      added (torch.optim.Adam's convention, kept in group["fused"]), its foreach kernel otherwise.

    State per parameter: "momentum_buffer", or for adam torch.optim.Adam's "step", "exp_avg",
    "exp_avg_sq"; state_dict()/load_state_dict() are torch's.

    Distributed: when torch.distributed's default process group has more than one rank as the
    optimizer is built, the optimizer owns gradient synchronization (no DDP wrapper; see
    optim/distributed.py). Hidden and conv matrices are sharded: each rank receives the averaged
    gradients of its share of every stack by reduce-scatter, runs momentum and Newton–Schulz on that
    share only (so holds momentum buffers only for it), and all-gathers the updated matrices; the other
    kinds are all-reduced and stepped on every rank. Each step equals the one-process step on the
    gradient averaged over ranks. p.grad keeps this rank's own gradient. Wrap the last micro-step's
    backward in `sync_gradients()` so communication overlaps it; with one process that is a no-op.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        cautious_wd: bool = False,
        ns_steps: int = 5,
        ns_coefficients="muon",
        ns_dtype: torch.dtype | None = None,
        lr_scale: str = "spectral",
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
    ):
        # Before the groups are added: add_param_group gives each group its buckets and hooks.
        self._sharding = Sharding.for_default_group()
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            cautious_wd=cautious_wd,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            ns_dtype=ns_dtype,
            lr_scale=lr_scale,
            betas=adam_betas,
            eps=adam_eps,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "kind" not in param_group:
            for kind, params in _default_kinds(param_group["params"]).items():
                self.add_param_group({**param_group, "params": params, "kind": kind})
            return
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        if group["kind"] == "adam":
            # torch.optim.Adam's convention: fused keeps state["step"] on the device, and
            # load_state_dict reads this flag to put it back there.
            group.setdefault("fused", all(p.is_cuda for p in group["params"]))
        if self._sharding is not None:
            params = group["params"]
            stacks = [[params[i] for i in same] for same in _by_shape(params)]
            self._sharding.add_group(len(self.param_groups) - 1, group, stacks)

    def sync_gradients(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """Context for the backward of the last micro-step before step(), when `enabled`.

        Inside it, distributed, each bucket of gradients is sent to the other ranks as soon as its
        gradients are accumulated, overlapping the rest of backward; outside it (earlier micro-steps)
        gradients only accumulate. Misuse fails loudly: a backward that adds to gradients already sent
        raises RuntimeError. Without it, step() sends everything itself (correct, just not overlapped).
        With one process it does nothing.

            for micro_step in range(grad_accum):
                with optimizer.sync_gradients(enabled=micro_step == grad_accum - 1):
                    loss.backward()
            optimizer.step()
        """
        if self._sharding is None or not enabled:
            return contextlib.nullcontext()
        return self._sharding.sync_backward()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._sharding is not None:
            self._sharding.step(self.param_groups, self._update)
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self._update(group, params, [p.grad for p in params])
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Step `params` by their group's kind, given their gradients (averaged over ranks, if any)."""
        if not params:
            return
        if group["kind"] == "adam":
            self._adam(group, params, grads)
            return
        for same in _by_shape(params):
            same_params, same_grads = [params[i] for i in same], [grads[i] for i in same]
            self._apply(group, same_params, self._dual_updates(group, same_params, same_grads))

    def _dual_updates(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]):
        """The updates u of same-shape parameters, with one batched map for the matrix kinds."""
        kind = group["kind"]
        if kind == "embed":
            grads = [dualize_embed(g) for g in grads]  # before momentum: see the class docstring
        updates = self._momentum(group, params, grads)
        if kind == "embed":
            return updates
        if kind == "head_sign":
            return [dualize_sign(u) for u in updates]
        return list(_dualize_stack(group, torch.stack(updates)).unbind(0))

    def _momentum(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]):
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        mu = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        return torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs

    def _apply(self, group: dict, params: list[torch.Tensor], updates: list[torch.Tensor]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if wd and group["cautious_wd"]:
            for p, u in zip(params, updates, strict=True):
                p.sub_(p * (u * p >= 0), alpha=lr * wd)
        elif wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, updates, alpha=-lr)

    def _adam(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """torch's AdamW math and state layout: foreach on CPU, fused on CUDA."""
        fused = group["fused"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=not fused,
            fused=fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _dualize_stack(group: dict, U: torch.Tensor) -> torch.Tensor:
    """The matrix kinds' maps on a stack U (B, ...) of same-shape momentum updates."""
    newton_schulz = dict(
        steps=group["ns_steps"], coefficients=group["ns_coefficients"], dtype=group["ns_dtype"]
    )
    if group["kind"] == "conv":
        return dualize_conv2d(U, **newton_schulz)
    if group["kind"] == "head_linear":
        return dualize_linear(U, **newton_schulz)
    d_out, d_in = U.shape[-2:]
    return orthogonalize(U, **newton_schulz).mul_(LR_SCALES[group["lr_scale"]](d_out, d_in))


def _by_shape(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the same shape, dtype and device, in first-seen order: each list becomes one stack."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.shape, p.dtype, p.device), []).append(i)
    return list(groups.values())


def _default_kinds(params) -> dict[str, list]:
    """torch.optim.Muon's rule for parameters given without a kind: 2-D → hidden, the rest → adam."""
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    split: dict[str, list] = {"hidden": [], "adam": []}
    for p in params:
        tensor = p[1] if isinstance(p, tuple) else p  # (name, tensor) pairs carry param_names
        split["hidden" if tensor.ndim == 2 else "adam"].append(p)
    return {kind: ps for kind, ps in split.items() if ps}


def _check_group(group: dict) -> None:
    kind = group["kind"]
    if kind not in KINDS:
        raise ValueError(f"Muon: unknown param-group kind {kind!r}; use one of {KINDS}")
    if group["lr_scale"] not in LR_SCALES:
        raise ValueError(f"Muon: unknown lr_scale {group['lr_scale']!r}; use one of {tuple(LR_SCALES)}")
    resolve_coefficients(group["ns_coefficients"])  # a bad name fails here, not at the first step
    for p in group["params"]:
        ndim_ok = p.ndim >= 2 if kind == "hidden" else p.ndim == _NDIM.get(kind, p.ndim)
        if not ndim_ok:
            raise ValueError(
                f"Muon: a parameter of shape {tuple(p.shape)} can't be kind {kind!r} "
                f"(it needs {_NDIM.get(kind, '2 or more')} dims); give it another kind in its param group"
            )
