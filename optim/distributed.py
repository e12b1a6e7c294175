"""Muon across W ranks: the optimizer owns gradient averaging, sharded by kind (optim/zero.py).

Process group. Muon(process_group=...) takes "world" (the default: torch.distributed's default group
when one is initialized, one process otherwise, and an error under torchrun, WORLD_SIZE > 1, before
init_process_group), None (each process alone) or a ProcessGroup. With more than one rank the
optimizer creates its own group once, at construction, over the same ranks (new_group: a collective
call over the world, or, for a subgroup, over its ranks only; torch names a subgroup's by its ranks,
so build one Muon per subgroup at a time), and issues every collective on it: a user's collective
on another group between backward and step() can never be paired with one of ours. At construction
it also broadcasts every parameter from the group's first rank, as DDP does, so that ranks built
from different seeds start alike.

A step. Gradients are reduce-scattered and averaged; each rank steps its share (whole matrices for
the Newton–Schulz kinds, 1/W of the elements or rows for the others, holding that share's state
only); updated values are all-gathered. It equals the one-process step on the gradient averaged over
ranks. Every collective's per-rank chunk is a multiple of 16 bytes, and its buffers are made at the
first step and reused: step_collectives(param_groups, W, unused_parameters) lists one step's
collectives, and state_shapes(param_groups, rank, W) the state each rank keeps, from the same shards
the step builds, without a process group.

Unused parameters. By default (Muon(unused_parameters=False), as DDP's find_unused_parameters) every
parameter of a group the step updates must have a gradient on every rank: a rank without one for some
parameter raises, naming it, before the step sends anything more (a frozen parameter's bucket waits
for step() to be refused there). With unused_parameters=True a parameter no rank has a gradient for
is left alone, as one process leaves it (decided on the device from has-a-gradient flags, one small
all-reduce per shard sent after its last bucket; no host read); one missing on some ranks counts as
zero there.

Launch order. Collectives must be issued in the same order on every rank. During the first
synchronized backward each rank records the order in which its buckets fill; the first step adopts
rank 0's (one broadcast, the only host read, once), and from then on a filled bucket is launched as
soon as every bucket before it in that order has been; step() launches the rest in the same order.
A shard's flags (unused_parameters=True) follow its last bucket in that order.

Guards. Inside sync_gradients(), `loss.backward()` is intercepted (a TorchFunctionMode on
Tensor.backward) to: register hooks for parameters unfrozen since construction; refuse, before any
gradient moves, an nn.Parameter the backward reaches that is in no param group (nobody would
average it); and, once backward returns, refuse gradients changed after they were sent (a DDP
wrapper's averaging does this). step() and clip_grad_norm_() refuse the same late changes (e.g.
torch.nn.utils.clip_grad_norm_ or GradScaler.unscale_ on p.grad), and, outside sync_gradients(), a
p.grad changed after backward accumulated it: it is this rank's own, so such a change (a clip by its
norm) would differ between ranks. The gradient hooks hold the
optimizer weakly and are removed when it is dropped or closed.

Distributions. Muon picks one from its first param group (optim/distribution.py, which states their
common interface): FullyShardedParallel (optim/fsdp.py) when its parameters are DTensors
(fully_shard), else DataParallel here, or OneProcess. `update(group, keys, tensors, grads, flags,
dualize=None)` (Muon._update) steps any local tensors, whole parameters or slices, by their kind;
`dualize` stands in for a matrix kind's stacked map (optim/update.py kind_update).
"""

import importlib
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

from .kinds import KINDS, MATRIX, ROW
from .update import clip_coefficient, resting
from .zero import BUCKET_ELEMENTS, Collective, FlatShard, GradientBucket, MatrixShard, wait_flags

WORLD = "world"

# Steps (keys, tensors) by their group's rule given averaged gradients and flags: Muon._update. A
# keyword `dualize` stands in for a matrix kind's stacked map (optim/update.py kind_update).
Update = Callable[..., None]


def resolve_process_group(process_group) -> "dist.ProcessGroup | None":
    """The group to average over, or None for one process (see the module docstring)."""
    if isinstance(process_group, str):
        if process_group != WORLD:
            raise ValueError(f"Muon: process_group={process_group!r}; use {WORLD!r}, None or a ProcessGroup")
        if not (dist.is_available() and dist.is_initialized()):
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            if world_size > 1:
                raise RuntimeError(
                    f"Muon: WORLD_SIZE={world_size} (torchrun) but torch.distributed is not initialized; "
                    "call torch.distributed.init_process_group() before building the optimizer, or pass "
                    "process_group=None to step each process on its own gradients")
            return None
        process_group = dist.group.WORLD
    if process_group is None or dist.get_world_size(process_group) == 1:
        return None
    return process_group


def shards_of(group_index: int, params: list[torch.Tensor], kind, rank: int, world_size: int,
              unused_parameters: bool) -> list["MatrixShard | FlatShard"]:
    """How DataParallel splits a param group of `kind` (optim/zero.py): whole matrices per same-shape
    stack, or flat buckets of elements or rows; each with has-a-gradient flags if unused_parameters."""
    if kind.shard == MATRIX:
        return [MatrixShard(group_index, same, rank, world_size, unused_parameters)
                for same in same_shape(params)]
    return [FlatShard(group_index, same, unit, kind.shard == ROW, rank, world_size, unused_parameters)
            for same, unit in _flat_buckets(params, kind.shard == ROW)]


def step_collectives(param_groups: list[dict], world_size: int,
                     unused_parameters: bool = False) -> list[Collective]:
    """The collectives of one DataParallel step at `world_size` ranks, without a process group.

    `param_groups`: Muon's param groups (opt.param_groups) or optim.param_groups(model)'s, each with
    "params" (tensors or (name, tensor) pairs; meta tensors will do) and "kind". The shards are built
    by shards_of, as DataParallel builds them, and each Collective is the description the step makes
    that collective's buffers from: per shard in param-group order, its buckets' reduce-scatters, its
    flags' all-reduce (only if unused_parameters, Muon's option of that name), its all-gather (at run
    time the reduce-scatters leave in the agreed fill order, each shard's flags right after its last
    bucket). Which rank owns what does not change any collective's size, so rank 0's shards stand for
    every rank's. One rank: none.
    """
    _check_kinds(param_groups, "step_collectives")
    if world_size == 1:
        return []
    return [collective for _, shard in _planned_shards(param_groups, 0, world_size, unused_parameters)
            for collective in shard.collectives]


def state_shapes(param_groups: list[dict], rank: int, world_size: int) -> list[list[tuple | None]]:
    """Per param group, per parameter: the shape of the state rank `rank` of `world_size` keeps for it
    under DataParallel (the whole shape for a matrix it owns, its slice's for the others), or None
    where it keeps none; from the shards DataParallel builds, without a process group. `param_groups`
    as step_collectives takes them. One rank: every parameter's own shape (one process)."""
    _check_kinds(param_groups, "state_shapes")
    if world_size == 1:
        return [[tuple(p.shape) for p in _tensors(group)] for group in param_groups]
    shapes: list[list[tuple | None]] = [[None] * len(group["params"]) for group in param_groups]
    for index, shard in _planned_shards(param_groups, rank, world_size, unused_parameters=False):
        params = _tensors(param_groups[index])
        for p in shard.params:
            shapes[index][next(i for i, q in enumerate(params) if q is p)] = shard.state_shape(p)
    return shapes


def _planned_shards(param_groups: list[dict], rank: int, world_size: int,
                    unused_parameters: bool) -> Iterator[tuple[int, "MatrixShard | FlatShard"]]:
    """(group index, shard) per shard of rank `rank`, in param-group order, as DataParallel builds them."""
    for index, group in enumerate(param_groups):
        for shard in shards_of(index, _tensors(group), KINDS[group["kind"]], rank, world_size,
                               unused_parameters):
            yield index, shard


def _check_kinds(param_groups: list[dict], where: str) -> None:
    for index, group in enumerate(param_groups):
        if group.get("kind") not in KINDS:
            raise ValueError(f"{where}: param group {index} has kind {group.get('kind')!r}; "
                             f"give each group one of {tuple(KINDS)} (optim.param_groups(model) does)")


def _tensors(group: dict) -> list[torch.Tensor]:
    """A group's parameters: its tensors, or the tensors of its (name, tensor) pairs."""
    return [p[1] if isinstance(p, tuple) else p for p in group["params"]]


def is_dtensor(p: torch.Tensor) -> bool:
    # No DTensor exists unless torch.distributed.tensor was imported: checking sys.modules spares
    # every other process that module's half-second import.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def own_group(parent: "dist.ProcessGroup") -> "dist.ProcessGroup":
    """A new process group over `parent`'s ranks and backend, for the optimizer's collectives alone."""
    # torch.optim.Optimizer imports torch._dynamo on first use, and that import keeps every process
    # group existing at the time alive past destroy_process_group (its gloo threads then outlive
    # main() and may abort the interpreter's exit). Importing it first spares the group made here.
    importlib.import_module("torch._dynamo")
    ranks = dist.get_process_group_ranks(parent)
    # Over the whole world every rank takes part, and the group gets a fresh name; a subgroup's is
    # made among its own ranks only, and torch names it by those ranks.
    subgroup = len(ranks) < dist.get_world_size()
    return dist.new_group(ranks, backend=dist.get_backend(parent), use_local_synchronization=subgroup)


class DataParallel:
    """Muon's gradient averaging over a process group: its own group, shards, buckets, hooks, guards.
    A Distribution (optim/distribution.py)."""

    copyable = False  # it owns a process group and gradient hooks
    local_gradients = True  # p.grad is this rank's own gradient; the average travels in the buckets

    def __init__(self, parent: "dist.ProcessGroup", unused_parameters: bool):
        self.group = own_group(parent)
        self.unused_parameters = unused_parameters  # flags, or a gradient required of every parameter
        ranks = dist.get_process_group_ranks(parent)
        self.rank, self.world_size, self.source = dist.get_rank(self.group), len(ranks), ranks[0]
        self.shards: list = []
        self.shard_of: dict[int, object] = {}  # id(param) -> its shard
        self.groups: dict[int, dict] = {}  # group index -> the param group (read live: step_every)
        self.buckets: list[GradientBucket] = []
        self.order: list[int] | None = None  # agreed launch order, bucket indices
        self.filled_order: list[int] = []  # this rank's fill order until one is agreed
        self.launched = 0  # buckets launched this step: a prefix of order
        self.in_sync_backward = False
        self.closed = False
        self.accumulated: dict[int, tuple] = {}  # id(param) -> (param, grad, its version) after backward
        self.hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}  # id(param) -> its gradient hook
        self._remove_hooks = weakref.finalize(self, _remove_all, self.hooks)

    def add_group(self, group_index: int, group: dict) -> None:
        """Broadcast a param group's parameters from the first rank; give them shards and buckets."""
        params, kind = list(group["params"]), KINDS[group["kind"]]
        self.groups[group_index] = group
        for p in params:
            if not p.is_contiguous():
                raise ValueError(f"Muon: a parameter of shape {tuple(p.shape)} is not contiguous; "
                                 "distributed Muon steps flat views of its parameters")
        self._broadcast(params)
        for shard in shards_of(group_index, params, kind, self.rank, self.world_size, self.unused_parameters):
            self.shards.append(shard)
            self.shard_of.update((id(p), shard) for p in shard.params)
            for bucket in shard.buckets:
                self._add(bucket)

    def sync_backward(self) -> TorchFunctionMode:
        self._check_open()
        return _SynchronizedBackward(self)

    def synchronized_backward(self, backward: Callable, args: tuple, kwargs: dict):
        """Tensor.backward with buckets sent as they fill, and the guards of the module docstring."""
        self._check_open()
        for bucket in self.buckets:
            bucket.refresh()
            for p in bucket.params:
                self._hook(p, bucket)
        inputs = kwargs.get("inputs", args[4] if len(args) > 4 else None)
        self._check_covered(args[0], inputs)
        self.in_sync_backward = True
        try:
            result = backward(*args, **kwargs)
        finally:
            self.in_sync_backward = False
        self._check_unchanged()
        return result

    def step(self, groups: list[dict], update: Update) -> None:
        """Launch what backward did not; then in launch order: average, update each shard, all-gather."""
        self._receive()
        pending = {id(shard): len(shard.buckets) for shard in self.shards}
        finish_gathers = []
        for bucket in self._sending(self.buckets[i] for i in self.order):
            bucket.average(self.world_size)
            shard = bucket.shard
            pending[id(shard)] -= 1
            if pending[id(shard)] == 0:
                update(groups[shard.group_index], *shard.gradients())
                finish_gathers.append(shard.all_gather(self.group))
        for finish in finish_gathers:
            finish()
        self._reset()

    def collectives(self) -> list[Collective]:
        """This rank's collectives of one step, as step_collectives lists them."""
        return [collective for shard in self.shards for collective in shard.collectives]

    def clip_grad_norm_(self, groups: list[dict], max_norm: float) -> torch.Tensor:
        """Scale this rank's averaged shares by min(1, max_norm/(‖g‖ + 1e-6)), ‖g‖ over all ranks' shares."""
        self._receive()
        for bucket in self._sending(self.buckets):
            bucket.average(self.world_size)
        shards = [shard for shard in self.shards if not self._resting(shard)]
        squares = torch.stack([shard.squares() for shard in shards]).sum()
        dist.all_reduce(squares, group=self.group)
        total = squares.sqrt()
        factor = clip_coefficient(total, max_norm)
        for shard in shards:
            shard.scale_(factor)
        return total

    def discard(self) -> None:
        """Complete this step's collectives on every rank, then forget them."""
        self._receive(check=False)
        for bucket in self._sending(self.buckets):
            bucket.average(self.world_size)
        for shard in self.shards:
            if not self._resting(shard):
                wait_flags(shard)
        self._reset()

    def close(self) -> None:
        if self.closed:
            return
        for i in (self.order or [])[: self.launched]:  # sent by a backward no step followed
            if self.buckets[i].work is not None:  # None: a resting group's, never sent
                self.buckets[i].work.wait()
        for shard in self.shards:
            if shard.flags is not None and shard.flags.work is not None:
                shard.flags.wait()
        self._remove_hooks()
        dist.destroy_process_group(self.group)
        self.group = None  # the last reference: its threads end with it
        self.closed = True

    def state_shape(self, p: torch.Tensor) -> tuple | None:
        shard = self.shard_of.get(id(p))
        return None if shard is None else shard.state_shape(p)

    def stamp(self) -> dict:
        """What state_dict() records and load_state_dict() requires: each rank loads its own state."""
        return {"rank": self.rank, "world_size": self.world_size}

    def saved(self, state_dict: dict, groups: list[dict]) -> dict:
        return state_dict  # each rank's own slices, as plain tensors

    def loaded(self, state_dict: dict, groups: list[dict]) -> dict:
        return state_dict

    def gradient_ready(self, bucket: GradientBucket, p: torch.Tensor) -> None:
        """A parameter's gradient was accumulated: during a synchronized backward, maybe send buckets."""
        if bucket.work is not None:
            raise RuntimeError(
                "Muon: a gradient was accumulated after it was sent to the other ranks; wrap only the "
                "last micro-step's backward in optimizer.sync_gradients() and call optimizer.step() next"
            )
        self.accumulated[id(p)] = (p, p.grad, p.grad._version)
        if not self.in_sync_backward:
            return  # an earlier micro-step: gradients still accumulating
        bucket.ready.add(id(p))
        if not bucket.filled:
            return
        if self.order is None:
            if bucket.index not in self.filled_order:
                self.filled_order.append(bucket.index)
        else:
            self._launch(only_filled=True)

    def _add(self, bucket: GradientBucket) -> None:
        bucket.index = len(self.buckets)
        self.buckets.append(bucket)
        if self.order is not None:  # a group added after the first step goes last, on every rank
            self.order.append(bucket.index)
        bucket.refresh()
        for p in bucket.params:
            self._hook(p, bucket)

    def _hook(self, p: torch.Tensor, bucket: GradientBucket) -> None:
        if p.requires_grad and id(p) not in self.hooks:
            self.hooks[id(p)] = p.register_post_accumulate_grad_hook(
                partial(_on_gradient, weakref.ref(self), bucket))

    def _broadcast(self, params: list[torch.Tensor]) -> None:
        by_type: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_type.setdefault((p.dtype, p.device), []).append(p)
        with torch.no_grad():
            for same in by_type.values():
                flat = torch.cat([p.reshape(-1) for p in same])
                dist.broadcast(flat, src=self.source, group=self.group)
                pieces = flat.split([p.numel() for p in same])
                torch._foreach_copy_(same, [x.view_as(p) for x, p in zip(pieces, same, strict=True)])

    def _check_covered(self, loss: torch.Tensor, inputs) -> None:
        leaves = _graph_leaves(loss) if inputs is None else [inputs] if torch.is_tensor(inputs) else inputs
        for leaf in leaves:
            if isinstance(leaf, nn.Parameter) and leaf.requires_grad and id(leaf) not in self.shard_of:
                raise RuntimeError(
                    f"Muon: a parameter of shape {tuple(leaf.shape)} gets a gradient in this synchronized "
                    "backward but is in none of the optimizer's param groups, so no rank would average it; "
                    "add it to a param group (optim.param_groups(model) covers every parameter)")

    def _check_unchanged(self) -> None:
        for i in (self.order or [])[: self.launched]:
            p = self.buckets[i].changed()
            if p is not None:
                raise RuntimeError(
                    f"Muon: the gradient of a parameter of shape {tuple(p.shape)} changed after "
                    "sync_gradients() sent it to the other ranks, so the change would be lost. Clip with "
                    "optimizer.clip_grad_norm_(), or change gradients after a backward outside "
                    "sync_gradients() (step() then sends them as they are). A DistributedDataParallel "
                    "wrapper does this too: Muon averages gradients itself, so do not wrap the model")

    def _check_present(self) -> None:
        """Without unused_parameters, refuse a parameter of a bucket still to be sent that has no gradient
        on this rank: with no flags, the other ranks would count its zeros as a gradient (momentum,
        weight decay and the step count would move), where one process leaves it alone."""
        if self.unused_parameters:
            return
        for bucket in self._sending(self.buckets[i] for i in self.order[self.launched :]):
            for p in bucket.params:
                if p.grad is None:
                    group = self.groups[bucket.shard.group_index]
                    raise RuntimeError(
                        f"Muon: {_name_of(p, group, bucket.shard.group_index)} has no gradient on rank "
                        f"{self.rank} at this step; every parameter must have one on every rank (as DDP "
                        "requires by default), or pass Muon(..., unused_parameters=True) to leave alone "
                        "those no rank has a gradient for")

    def _check_untouched(self) -> None:
        """Refuse a p.grad changed after backward accumulated it: p.grad is this rank's own gradient, so a
        change made from it (a clip by its norm, an unscale that checks its infs) differs between ranks."""
        for p, grad, version in self.accumulated.values():
            if p.grad is not grad or grad._version != version:
                raise RuntimeError(
                    f"Muon: the gradient of a parameter of shape {tuple(p.shape)} changed between backward "
                    "and step(); with several processes p.grad is this rank's own gradient, so a change made "
                    "from it differs between ranks. Clip with optimizer.clip_grad_norm_() "
                    "(torch.nn.utils.clip_grad_norm_ clips by this rank's norm), scale the loss rather than "
                    "p.grad, and do not wrap the model in DistributedDataParallel (Muon averages gradients)")

    def _receive(self, check: bool = True) -> None:
        """Agree the launch order (first step), refuse late gradient changes and (without
        unused_parameters) a missing gradient, launch every bucket left."""
        self._check_open()
        if self.order is None:
            self.order = self._agree_order()
        if check:
            self._check_unchanged()
            self._check_untouched()
            self._check_present()
        self._launch(only_filled=False)

    def _launch(self, only_filled: bool) -> None:
        while self.launched < len(self.order):
            bucket = self.buckets[self.order[self.launched]]
            if self._resting(bucket.shard):  # its gradients stay local and accumulate (step_every)
                self.launched += 1
                continue
            if only_filled and not bucket.filled:
                return
            bucket.launch(self.group)
            self.launched += 1
            shard = bucket.shard
            if shard.flags is not None and all(b.work is not None for b in shard.buckets):
                shard.flags.launch(shard.buckets, self.group)

    def _resting(self, shard) -> bool:
        """Whether the coming step leaves the shard's group alone (step_every): nothing of it is sent."""
        return resting(self.groups[shard.group_index])

    def _sending(self, buckets) -> Iterator[GradientBucket]:
        """The buckets of groups the coming step updates, in the order given."""
        return (bucket for bucket in buckets if not self._resting(bucket.shard))

    def _agree_order(self) -> list[int]:
        """Rank 0's fill order, then the buckets it never saw filled in index order, on every rank."""
        if not self.buckets:
            return []
        seen = self.filled_order + [i for i in range(len(self.buckets)) if i not in self.filled_order]
        order = torch.tensor(seen, dtype=torch.int64, device=self.buckets[0].params[0].device)
        dist.broadcast(order, src=self.source, group=self.group)
        return order.tolist()

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.reset()
        for shard in self.shards:
            if shard.flags is not None:
                shard.flags.reset()
        self.launched = 0
        self.accumulated.clear()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("Muon: this optimizer was closed; build a new one")


class _SynchronizedBackward(TorchFunctionMode):
    """Routes `loss.backward()` inside optimizer.sync_gradients() to DataParallel.synchronized_backward."""

    def __init__(self, data_parallel: DataParallel):
        super().__init__()
        self.data_parallel = data_parallel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            return self.data_parallel.synchronized_backward(func, args, kwargs)
        return func(*args, **kwargs)


def _on_gradient(owner: "weakref.ref[DataParallel]", bucket: GradientBucket, p: torch.Tensor) -> None:
    data_parallel = owner()
    if data_parallel is not None:
        data_parallel.gradient_ready(bucket, p)


def _name_of(p: torch.Tensor, group: dict, group_index: int) -> str:
    """'parameter NAME (param group i, kind)' where the group records names, else its position and shape."""
    i = next(i for i, q in enumerate(group["params"]) if q is p)
    names = group.get("param_names")
    which = repr(names[i]) if names else f"{i} of shape {tuple(p.shape)}"
    return f"parameter {which} (param group {group_index}, {group['kind']})"


def _remove_all(hooks: dict) -> None:
    for handle in hooks.values():
        handle.remove()
    hooks.clear()


def _graph_leaves(loss: torch.Tensor) -> Iterator[torch.Tensor]:
    """The leaf tensors a backward from `loss` accumulates gradients into (its AccumulateGrad nodes)."""
    if loss.grad_fn is None:
        yield loss
        return
    seen, stack = {loss.grad_fn}, [loss.grad_fn]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is not None and node not in seen:
                seen.add(node)
                stack.append(node)
                if hasattr(node, "variable"):
                    yield node.variable


def same_shape(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Stacks of one shape, dtype and device, in first-seen order."""
    stacks: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        stacks.setdefault((p.shape, p.dtype, p.device), []).append(p)
    return list(stacks.values())


def _flat_buckets(params: list[torch.Tensor], by_rows: bool) -> Iterator[tuple[list[torch.Tensor], int]]:
    """(parameters, unit) per dtype, device and unit, packed in order up to BUCKET_ELEMENTS each."""
    same: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        unit = p.shape[-1] if by_rows else 1
        same.setdefault((p.dtype, p.device, unit), []).append(p)
    for (_, _, unit), members in same.items():
        bucket, size = [], 0
        for p in members:
            if bucket and size + p.numel() > BUCKET_ELEMENTS:
                yield bucket, unit
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
        yield bucket, unit
