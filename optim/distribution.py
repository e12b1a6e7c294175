"""How Muon spreads its step over ranks: the Distribution interface, its one-process implementation,
and the choice among the three (one process, DataParallel, FullyShardedParallel).

Muon picks one Distribution when its first param group is added (at construction) and calls it for
everything that depends on the ranks; it never asks which one it has. A Distribution:

- add_group(group_index, group): takes a new param group (distributed: broadcasts it, gives it shards,
  buckets and gradient hooks; a collective, so every rank adds the same groups in order).
- sync_backward(): the context a synchronized backward runs in (sends gradients as they fill).
- step(groups, update): averages the gradients, calls update(group, keys, tensors, grads, flags,
  dualize=None) on what this rank owns (whole matrices for the Newton–Schulz kinds, rows or elements
  for the others), and brings every rank the updated values.
- clip_grad_norm_(groups, max_norm): scales the gradients step() will use by
  min(1, max_norm/(‖g‖₂ + 1e-6)), ‖g‖₂ over every rank's share; returns ‖g‖₂. `groups` (Muon's, as
  step's) is what OneProcess reads; the distributed ones read the groups add_group gave them.
- discard(): completes and forgets this step's communication; close(): releases hooks and groups.
- state_shape(p): the shape of the state this rank keeps for p, or None where it keeps none.
- stamp(), saved(state_dict, groups), loaded(state_dict, groups): the checkpoint's "distribution"
  entry, and the state dict as saved and as loaded (FSDP: DTensors to and from local rows).
- copyable: whether the optimizer may be deep-copied or pickled (it owns no group or hooks);
  local_gradients: whether p.grad is this rank's own gradient rather than the average (then
  torch.amp.GradScaler, which skips step() by p.grad's infs, would make the ranks disagree).

OneProcess is that interface with one rank: no collectives, no buffers, no hooks. Its step is the
plain loop over the groups a step updates, in stacks of one shape for the matrix kinds: the
allocations of a step are the update's own (tests/test_optim_structure.py counts them).
"""

import contextlib
from typing import Protocol

import torch

from .distributed import WORLD, DataParallel, Update, is_dtensor, resolve_process_group
from .kinds import KINDS, MATRIX
from .update import clip_coefficient, resting

ONE_PROCESS = {"rank": 0, "world_size": 1}  # the "distribution" entry of a one-process state dict


class Distribution(Protocol):
    """What Muon calls for everything that depends on the ranks (see the module docstring)."""

    copyable: bool
    local_gradients: bool

    def add_group(self, group_index: int, group: dict) -> None: ...

    def sync_backward(self) -> contextlib.AbstractContextManager: ...

    def step(self, groups: list[dict], update: Update) -> None: ...

    def clip_grad_norm_(self, groups: list[dict], max_norm: float) -> torch.Tensor: ...

    def discard(self) -> None: ...

    def close(self) -> None: ...

    def state_shape(self, p: torch.Tensor) -> tuple | None: ...

    def stamp(self) -> dict: ...

    def saved(self, state_dict: dict, groups: list[dict]) -> dict: ...

    def loaded(self, state_dict: dict, groups: list[dict]) -> dict: ...


class OneProcess:
    """One rank: each gradient is already the average; every parameter is stepped here, whole."""

    copyable = True
    local_gradients = False  # p.grad is the average: GradScaler's own skip is right

    def add_group(self, group_index: int, group: dict) -> None:
        """Nothing to share out."""

    def sync_backward(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step(self, groups: list[dict], update: Update) -> None:
        """update() per device (and per shape and dtype for the matrix kinds) of each group not resting."""
        for group in (g for g in groups if not resting(g)):
            for params in _batches(group, _with_dense_gradients(group["params"])):
                update(group, params, params, [p.grad for p in params], None)

    def clip_grad_norm_(self, groups: list[dict], max_norm: float) -> torch.Tensor:
        """Scale every gradient of the groups not resting; ‖g‖₂ in float32, on the device."""
        grads = [p.grad for group in groups if not resting(group) for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms))
        torch._foreach_mul_(grads, clip_coefficient(total, max_norm))
        return total

    def discard(self) -> None:
        """Nothing in flight."""

    def close(self) -> None:
        """Nothing to release."""

    def state_shape(self, p: torch.Tensor) -> tuple:
        return tuple(p.shape)

    def stamp(self) -> dict:
        return dict(ONE_PROCESS)

    def saved(self, state_dict: dict, groups: list[dict]) -> dict:
        return state_dict

    def loaded(self, state_dict: dict, groups: list[dict]) -> dict:
        return state_dict


def make_distribution(params: list[torch.Tensor], process_group, unused_parameters: bool) -> Distribution:
    """How Muon spreads its step, from its first param group's tensors (all DTensors or all plain):
    FullyShardedParallel (optim/fsdp.py) for DTensors, else DataParallel over
    resolve_process_group(process_group) (with flags if unused_parameters), or OneProcess."""
    if not any(is_dtensor(p) for p in params):
        group = resolve_process_group(process_group)
        return OneProcess() if group is None else DataParallel(group, unused_parameters)
    if process_group != WORLD:
        raise ValueError(f"Muon: process_group={process_group!r} with DTensor (fully_shard) parameters; "
                         f"leave it {WORLD!r}: the parameters' device mesh names the ranks")
    from .fsdp import FullyShardedParallel  # torch.distributed.tensor: imported only where it is in use

    return FullyShardedParallel(params[0].device_mesh)  # the group has DTensors only


def _batches(group: dict, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """One update call per device; matrix kinds also split by shape and dtype: each list is one stack."""
    matrix = KINDS[group["kind"]].shard == MATRIX
    batches: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        key = (p.device, p.shape, p.dtype) if matrix else (p.device,)
        batches.setdefault(key, []).append(p)
    return list(batches.values())


def _with_dense_gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters that have a gradient; a sparse one is refused (the updates are dense)."""
    with_grad = [p for p in params if p.grad is not None]
    for p in with_grad:
        if p.grad.layout != torch.strided:
            raise RuntimeError(f"Muon: the parameter of shape {tuple(p.shape)} has a {p.grad.layout} "
                               "gradient; Muon needs dense gradients (build nn.Embedding with sparse=False)")
    return with_grad
