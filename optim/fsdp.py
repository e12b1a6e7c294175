"""Muon on FSDP2: the parameters torch.distributed.fsdp.fully_shard turned into row-sharded DTensors.

Layout. fully_shard splits every parameter on dim 0 over a 1-D device mesh of W ranks as torch.chunk
does: rank r holds rows [r·c, min((r+1)·c, m)) of an (m, …) parameter, c = ⌈m/W⌉ (possibly none), and
backward reduce-scatters each gradient into the same rows, averaged over ranks. Every gradient the
optimizer sees is thus already averaged; it steps each rank's rows:

- Row and element kinds (embed, head_sign, adam) step their rows alone: dualize_embed and sign act on
  one row at a time and Adam on one entry, and dim-0 shards hold whole rows.
- Matrix kinds (hidden, conv, head_linear) need whole matrices for their map. Momentum is elementwise,
  so each rank updates its rows of the momentum buffer (kept sharded like the parameter) and forms
  its rows of the Nesterov update U. A param group's matrices with gradients, in stacks of one shape,
  are dealt round-robin: the step's i-th matrix, in group and stack order, goes to rank i mod W. Per
  stack one all_to_all brings each owner every rank's rows of its matrices; the owner maps its whole
  matrices in one batched Newton–Schulz call (optim.update.dualize_all, as one process would) and a
  second all_to_all returns every rank its rows of the results, which it applies (weight decay, lr)
  to its own rows. Per rank: 1/W of the Newton–Schulz work and of the state, and in flight whole
  copies of only its own matrices of one stack.

Each step thus equals the one-process step on the averaged gradient. Bytes a rank sends per step for
a stack of n (m, …) matrices of M elements, b bytes an element, in C = ⌈(n + lead)/W⌉ columns
(OwnerExchange): 2·(W−1)·C·⌈m/W⌉·(M/m)·b, about 2·(W−1)/W²·n·M·b: 1/W of what DataParallel's
reduce-scatter and all-gather send, on top of fully_shard's own reduce-scatter of gradients and
all-gathers of parameters.

Collectives run on a process group of the optimizer's own over the mesh's ranks, as DataParallel's.
fully_shard's reduce-scatter covers the parameters that have a gradient and must cover the same ones
on every rank, so p.grad is None on every rank or on none, and all ranks deal the same matrices.

State dict. state_dict() holds every parameter's state, zeros where none was made yet (exactly what
the first step would create), each tensor a DTensor sharded like its parameter (Adam's 0-dim step
count is the same on every rank, a plain tensor): a layout that does not depend on W, so
torch.distributed.checkpoint saves it and loads it on any number of ranks.
"""

import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from .distributed import Update, own_group, same_shape
from .fsdp_layout import exchange_slots, local_shape, shard_rows
from .kinds import KINDS, MATRIX, Kind
from .state import muon_state_layout
from .update import clip_coefficient, dualize_all

STAMP = {"sharding": "fully_shard"}  # any number of ranks: DTensor state is resharded at load


class FullyShardedParallel:
    """Muon's step over DTensor parameters sharded on dim 0 of a 1-D device mesh (fully_shard's layout).
    A Distribution (optim/distribution.py)."""

    copyable = False  # it owns a process group
    local_gradients = False  # fully_shard's backward leaves every rank its rows of the average

    def __init__(self, mesh):
        if mesh.ndim != 1:
            raise ValueError(f"Muon: fully_shard parameters on a {mesh.ndim}-D device mesh; Muon supports a "
                             "1-D mesh (fully_shard(module, mesh=init_device_mesh(device, (world_size,))))")
        self.mesh = mesh
        self.group = own_group(mesh.get_group())
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if self.rank != mesh.get_local_rank():
            raise ValueError("Muon: the device mesh lists its ranks out of order; build it over ranks in "
                             "ascending order (init_device_mesh does)")
        self.params: dict[int, DTensor] = {}  # id → parameter
        self.closed = False

    def add_group(self, group_index: int, group: dict) -> None:
        """Check that the group's parameters are sharded as fully_shard shards them, on this mesh."""
        for p in group["params"]:
            self._check_sharded(p)
            self.params[id(p)] = p

    def sync_backward(self):
        """Nothing to overlap: fully_shard reduce-scatters the gradients during backward itself."""
        self._check_open()
        return contextlib.nullcontext()

    def step(self, groups: list[dict], update: Update) -> None:
        """Row and element kinds on local rows; matrix kinds per stack through their owners."""
        self._check_open()
        dealt = 0
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if KINDS[group["kind"]].shard != MATRIX:
                update(group, params, _local(params), _local_grads(params), None)
                continue
            for stack in same_shape(params):
                exchange = OwnerExchange(stack, dealt, self.rank, self.world_size, self.group)
                update(group, stack, _local(stack), _local_grads(stack), None, dualize=exchange.dualize)
                dealt += len(stack)

    def clip_grad_norm_(self, groups: list[dict], max_norm: float) -> torch.Tensor:
        """Scale every local gradient by min(1, max_norm/(‖g‖ + 1e-6)); ‖g‖ over all ranks' rows, fp32."""
        self._check_open()
        grads = _local_grads([p for p in self.params.values() if p.grad is not None])
        squares = torch.zeros((), dtype=torch.float32, device=self.mesh.device_type)
        if grads:
            squares = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
        dist.all_reduce(squares, group=self.group)
        total = squares.sqrt()
        torch._foreach_mul_(grads, clip_coefficient(total, max_norm))
        return total

    def discard(self) -> None:
        """Nothing in flight: fully_shard's gradient collectives end with backward."""
        self._check_open()

    def close(self) -> None:
        if not self.closed:
            dist.destroy_process_group(self.group)
            self.group = None
            self.closed = True

    def state_shape(self, p: torch.Tensor) -> tuple | None:
        return self._local_shape(p) if id(p) in self.params else None

    def stamp(self) -> dict:
        return dict(STAMP)

    def saved(self, state_dict: dict, groups: list[dict]) -> dict:
        """Every parameter's state (zeros where none yet), as DTensors sharded like the parameter."""
        state = state_dict["state"]
        params = [(p, group) for group in groups for p in group["params"]]
        for i, (p, group) in enumerate(params):  # torch numbers parameters in this order
            entry = state.get(i, {})
            layout = muon_state_layout(p, group["kind"], self._local_shape(p), group)
            state[i] = {key: self._sharded_like(p, entry[key] if key in entry else
                                                torch.zeros(shape, dtype=dtype, device=p.device))
                        for key, (shape, dtype) in layout.items()}
        return state_dict

    def loaded(self, state_dict: dict, groups: list[dict]) -> dict:
        """The state dict with each DTensor replaced by this rank's rows (checked next by Muon)."""
        state = {i: {key: value.to_local() if isinstance(value, DTensor) else value
                     for key, value in entry.items()}
                 for i, entry in state_dict["state"].items()}
        return {**state_dict, "state": state}

    def _local_shape(self, p: DTensor) -> tuple:
        return local_shape(p.shape, self.rank, self.world_size)

    def _sharded_like(self, p: DTensor, value: torch.Tensor) -> torch.Tensor:
        if value.ndim == 0:
            return value  # Adam's step count: the same on every rank
        return DTensor.from_local(value, self.mesh, (Shard(0),), run_check=False, shape=p.shape,
                                  stride=p.stride())

    def _check_sharded(self, p: torch.Tensor) -> None:
        where = f"Muon: a parameter of shape {tuple(p.shape)}"
        if p.device_mesh != self.mesh or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"{where} is placed {tuple(p.placements)} on {p.device_mesh}; Muon expects "
                             f"fully_shard's Shard(0) on {self.mesh} for every parameter")
        if tuple(p.to_local().shape) != self._local_shape(p):
            raise ValueError(f"{where} is {tuple(p.to_local().shape)} on rank {self.rank}, not torch.chunk's "
                             f"{self._local_shape(p)}")

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("Muon: this optimizer was closed; build a new one")


class OwnerExchange:
    """One stack's trip to its owners and back: `dualize` maps the local rows of each matrix's update.

    Slot s = lead + i holds matrix i (lead = the matrices of the group dealt before this stack, mod W);
    slot s belongs to rank s mod W, column s // W. Buffers are (W, C, c, …): [rank, column, row in
    the shard], shards padded to c rows and the slots to C·W with zeros.
    """

    def __init__(self, stack: list[DTensor], dealt: int, rank: int, world_size: int, group):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.shape = tuple(stack[0].shape)
        self.chunk = math.ceil(self.shape[0] / world_size)
        self.slots = exchange_slots(len(stack), dealt, world_size)
        self.columns = len(self.slots) // world_size
        mine = [c for c in range(self.columns) if self.slots[c * world_size + rank] is not None]
        self.owned = (mine[0], mine[-1] + 1) if mine else (0, 0)  # a range: slots hold matrices in a row
        self.rows = shard_rows(self.shape[0], rank, world_size)

    def dualize(self, kind: Kind, group: dict, updates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gather whole matrices to their owners, map them there, return this rank's rows of each map."""
        W, C, c, rest = self.world_size, self.columns, self.chunk, self.shape[1:]
        first, last = self.owned
        received = self._all_to_all(self._pack(updates))[:, first:last]  # every rank's rows of mine
        whole = received.transpose(0, 1).reshape(last - first, W * c, *rest)[:, : self.shape[0]]
        mapped = whole.new_zeros(C, W * c, *rest)
        if last > first:
            mapped[first:last, : self.shape[0]] = torch.stack(dualize_all(kind, group, list(whole.unbind())))
        returned = self._all_to_all(mapped.view(C, W, c, *rest).transpose(0, 1).contiguous())
        return [returned[s % W, s // W, : self.rows] for s, i in enumerate(self.slots) if i is not None]

    def _pack(self, updates: list[torch.Tensor]) -> torch.Tensor:
        """(W, C, c, …): this rank's rows of matrix i in [owner, column]; zeros elsewhere."""
        W = self.world_size
        packed = updates[0].new_zeros(W, self.columns, self.chunk, *self.shape[1:])
        targets = [packed[s % W, s // W, : self.rows] for s, i in enumerate(self.slots) if i is not None]
        torch._foreach_copy_(targets, updates)
        return packed

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received


def _local(params: list[DTensor]) -> list[torch.Tensor]:
    return [p.to_local() for p in params]


def _local_grads(params: list[DTensor]) -> list[torch.Tensor]:
    return [p.grad.to_local() for p in params]
