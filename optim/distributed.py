"""Muon's distributed step: reduce-scatter gradients, orthogonalize a share per rank, all-gather.

REFERENCE §3, pattern 2, with the optimizer owning gradient synchronization (no DDP wrapper). There are
W ranks on torch.distributed's default process group, and every rank holds every parameter.

Sharded kinds (hidden, conv). A param group's n matrices of one shape form a stack, the unit Muon
batches into one Newton–Schulz call. Matrix i belongs to rank i mod W. The stack is padded with zero
matrices to P = W·⌈n/W⌉ and cut into P/W chunks of W consecutive matrices, one per rank:
  1. a chunk's gradients are reduce-scattered (sum) as soon as the last of them is accumulated, so
     while backward goes on rank r receives Σ_ranks G_{cW+r}; it divides that by W: the average;
  2. rank r applies momentum, one batched Newton–Schulz call and the update to its ⌈(n − r)/W⌉
     matrices only; momentum buffers exist only for them;
  3. one all-gather per stack brings every rank the others' updated matrices.
Replicated kinds (adam, embed, head_linear, head_sign). A param group's gradients of one dtype travel
as one flat buffer, all-reduced (sum), divided by W, and every rank applies the same update to the
same state. Sum-then-divide works on every backend, AVG or not, and on a chunk it divides only the
received share.

Bytes a rank sends per step for a stack, ring algorithms, M elements of b bytes per matrix:
  sharded             reduce-scatter (W−1)/W·P·(M+1)·b (+1: the flag below) + all-gather (W−1)/W·P·M·b;
                      at most ⌈n/W⌉ matrices through Newton–Schulz
  all-reduce first    2(W−1)/W·n·M·b; all n matrices through Newton–Schulz on every rank
The same volume when W divides n, P/n times more otherwise: the gain is the W-fold cut in
Newton–Schulz work. Gloo (CPU) builds its reduce-scatter from an all-reduce of the whole input,
keeping the rank's slice, so there the reduce-scatter itself moves 2(W−1)/W·P·(M+1)·b
(bench.distributed measures it); NCCL's is a true reduce-scatter.

Each gradient travels with a flag, 1 where this rank has a gradient for it. A parameter no rank has a
gradient for is skipped, as one process skips it; one missing on some ranks counts as zero there.

Launch order: collectives must be issued in the same order on every rank. During the first
synchronized backward each rank records the order in which its buckets fill; the first step adopts
rank 0's (one broadcast), and from then on a filled bucket is launched as soon as every bucket before
it in that order has been. step() launches whatever backward did not, in the same order.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist

SHARDED_KINDS = ("hidden", "conv")

# torch 2.13 renamed the tensor forms of reduce-scatter and all-gather and warns on the old names;
# torch 2.11 (the GPU machines') has only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Steps params by their group's map given their averaged gradients: Muon._update.
Update = Callable[[dict, list[torch.Tensor], list[torch.Tensor]], None]


class _Bucket:
    """Gradients that travel in one collective, each followed by its has-a-gradient flag.

    A chunk of a stack (`stack` set): slots[j] is rank j's matrix (None for padding); the buffer is
    (W, M + 1), row j = [G_j, flag_j], reduce-scattered, so rank r receives row r summed over ranks.
    A replicated group's dtype (`stack` None): the flat buffer [G_0, …, G_k, flag_0, …, flag_k],
    all-reduced. Either way `received` ends up divided by W: averages, and flags > 0 where any rank
    had a gradient. The param group is named by its index: Optimizer.load_state_dict replaces the
    group dicts.
    """

    def __init__(self, group_index: int, slots: list, stack: "_Stack | None" = None):
        self.group_index, self.slots, self.stack = group_index, slots, stack
        self.index = -1  # position in Sharding.buckets
        self.expected_params = [p for p in slots if p is not None and p.requires_grad]
        self.expected = {id(p) for p in self.expected_params}
        self.ready: set[int] = set()
        self.work = None
        self.received: torch.Tensor | None = None

    @property
    def filled(self) -> bool:
        return self.ready >= self.expected

    def launch(self) -> None:
        """Start the collective on this rank's current gradients (zeros where it has none)."""
        with torch.no_grad():
            if self.stack is None:
                self.received = self._flat()
                self.work = dist.all_reduce(self.received, async_op=True)
            else:
                rows = self._rows()
                self.received = rows.new_empty(rows.shape[1])
                self.work = _reduce_scatter(self.received, rows.view(-1), async_op=True)

    def wait(self, world_size: int) -> None:
        self.work.wait()
        self.received.div_(world_size)

    def replicated_gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters some rank had a gradient for, with their average gradients."""
        *grads, flags = self.received.split([p.numel() for p in self.slots] + [len(self.slots)])
        kept = [(p, g.view_as(p)) for p, g, f in zip(self.slots, grads, flags.tolist(), strict=True) if f > 0]
        return [p for p, _ in kept], [g for _, g in kept]

    def reset(self) -> None:
        self.ready.clear()
        self.work = self.received = None

    def _flat(self) -> torch.Tensor:
        grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in self.slots]
        like = self.slots[0]
        flags = torch.tensor([p.grad is not None for p in self.slots], dtype=like.dtype, device=like.device)
        return torch.cat([*grads, flags])

    def _rows(self) -> torch.Tensor:
        like = self.slots[0]  # a chunk's first slot is never padding
        rows = like.new_zeros(len(self.slots), like.numel() + 1)
        for row, p in zip(rows, self.slots, strict=True):
            if p is not None and p.grad is not None:
                row[:-1].copy_(p.grad.reshape(-1))
                row[-1] = 1
        return rows


class _Stack:
    """A sharded group's n same-shape matrices; matrix i is owned by rank i mod W."""

    def __init__(self, group_index: int, params: list[torch.Tensor], rank: int, world_size: int):
        self.group_index, self.params, self.rank, self.world_size = group_index, params, rank, world_size
        padded = params + [None] * (-len(params) % world_size)
        W = world_size
        self.chunks = [_Bucket(group_index, padded[c : c + W], self) for c in range(0, len(padded), W)]
        self.owned = params[rank::world_size]  # one per chunk, but none from the last chunk's padding
        self.chunks_received = 0  # this step

    def owned_gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's matrices that some rank had a gradient for, with their average gradients."""
        received = [chunk.received for chunk in self.chunks[: len(self.owned)]]
        if not received:
            return [], []
        flags = torch.stack([r[-1] for r in received]).tolist()  # one device sync per stack
        kept = [(p, r[:-1].view_as(p)) for p, r, f in zip(self.owned, received, flags, strict=True) if f > 0]
        return [p for p, _ in kept], [g for _, g in kept]

    def all_gather(self) -> Callable[[], None]:
        """Send this rank's matrices (updated or not) to all; the returned call copies in the others'."""
        like = self.params[0]
        padding = [torch.zeros_like(like)] * (len(self.chunks) - len(self.owned))
        mine = torch.stack([*self.owned, *padding])
        W, C = self.world_size, len(self.chunks)
        everyone = like.new_empty(W * C, *like.shape)  # rank-major: row j·C + c is matrix c·W + j
        work = _all_gather(everyone, mine, async_op=True)
        others = [i for i in range(len(self.params)) if i % W != self.rank]
        targets = [self.params[i] for i in others]

        def finish() -> None:
            work.wait()
            if targets:
                torch._foreach_copy_(targets, [everyone[i % W * C + i // W] for i in others])

        return finish


class Sharding:
    """Muon's gradient synchronization on the default process group: buckets, hooks, collectives."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.buckets: list[_Bucket] = []
        self.stacks: list[_Stack] = []
        self.order: list[int] | None = None  # agreed launch order, bucket indices
        self.filled_order: list[int] = []  # this rank's fill order until one is agreed
        self.launched = 0  # buckets launched this step: a prefix of order
        self.in_sync_backward = False
        self.device: torch.device | None = None

    @staticmethod
    def for_default_group() -> "Sharding | None":
        """A Sharding when the default process group has more than one rank; None for one process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return Sharding()
        return None

    def add_group(self, group_index: int, group: dict, stacks: list[list[torch.Tensor]]) -> None:
        """Buckets for a param group: the chunks of each same-shape stack, or one per dtype."""
        if not group["params"]:
            return
        if self.device is None:
            self.device = group["params"][0].device
        if group["kind"] in SHARDED_KINDS:
            for params in stacks:
                self.stacks.append(_Stack(group_index, params, self.rank, self.world_size))
                for chunk in self.stacks[-1].chunks:
                    self._add(chunk)
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in group["params"]:
            by_dtype.setdefault(p.dtype, []).append(p)
        for params in by_dtype.values():
            self._add(_Bucket(group_index, params))

    @contextmanager
    def sync_backward(self) -> Iterator[None]:
        self.in_sync_backward = True
        try:
            yield
        finally:
            self.in_sync_backward = False

    def step(self, groups: list[dict], update: Update) -> None:
        """Launch what backward did not, then in launch order: average, update, all-gather."""
        if self.order is None:
            self.order = self._agree_order()
        self._launch(only_filled=False)
        finish_gathers = []
        for bucket in (self.buckets[i] for i in self.order):
            bucket.wait(self.world_size)
            if bucket.stack is None:
                update(groups[bucket.group_index], *bucket.replicated_gradients())
                continue
            stack = bucket.stack
            stack.chunks_received += 1
            if stack.chunks_received == len(stack.chunks):
                update(groups[stack.group_index], *stack.owned_gradients())
                finish_gathers.append(stack.all_gather())
        for finish in finish_gathers:
            finish()
        self._reset()

    def _add(self, bucket: _Bucket) -> None:
        bucket.index = len(self.buckets)
        self.buckets.append(bucket)
        if self.order is not None:  # a group added after the first step goes last, on every rank
            self.order.append(bucket.index)
        for p in bucket.expected_params:
            p.register_post_accumulate_grad_hook(partial(self._on_gradient, bucket))

    def _on_gradient(self, bucket: _Bucket, p: torch.Tensor) -> None:
        if bucket.work is not None:
            raise RuntimeError(
                "Muon: a gradient was accumulated after it was sent to the other ranks; wrap only the "
                "last micro-step's backward in optimizer.sync_gradients() and call optimizer.step() next"
            )
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

    def _launch(self, only_filled: bool) -> None:
        while self.launched < len(self.order):
            bucket = self.buckets[self.order[self.launched]]
            if only_filled and not bucket.filled:
                return
            bucket.launch()
            self.launched += 1

    def _agree_order(self) -> list[int]:
        """Rank 0's fill order, then the buckets it never saw filled in index order, on every rank."""
        seen = self.filled_order + [i for i in range(len(self.buckets)) if i not in self.filled_order]
        order = torch.tensor(seen, dtype=torch.int64, device=self.device)
        dist.broadcast(order, src=0)
        return order.tolist()

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.reset()
        for stack in self.stacks:
            stack.chunks_received = 0
        self.launched = 0
