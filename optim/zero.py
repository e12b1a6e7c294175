"""The shares of a distributed Muon step: whole matrices of a stack, or 1/W of a group's elements (ZeRO-1).

A shard is a set of parameters whose gradients travel in one or more buckets. A bucket is one
reduce-scatter of a (W, L) buffer whose row j is what rank j should receive; rank r gets row r summed
over ranks and divides it by W: the average. Each gradient travels with a has-a-gradient flag, 1
where this rank has one (0 and a zero gradient otherwise), so the summed flag tells every rank,
without a host read, whether any rank had a gradient. After the update one all-gather per shard
brings every rank the others' updated values.

MatrixShard (Newton–Schulz kinds). A param group's n matrices of one shape form a stack, the unit
Muon batches into one Newton–Schulz call. Matrix i belongs to rank i mod W. The stack is padded with
zero matrices to P = W·⌈n/W⌉ and cut into P/W buckets of W consecutive matrices, row j = [G_j, flag_j]
(L = M + 1 for M elements a matrix), each sent as soon as its gradients are accumulated; rank r then
applies momentum, one batched Newton–Schulz call and the update to its ⌈(n − r)/W⌉ matrices only, and
keeps momentum buffers for those only.

FlatShard (row and element kinds: embed, head_sign, adam). A param group's parameters of one dtype and
device (up to BUCKET_ELEMENTS) are flattened in order into N elements and cut into W ranges of
S = u·⌈N/(u·W)⌉ elements, u the unit the map needs whole (a row of the last dim for embed and
head_sign, 1 for Adam). Rank r owns elements [rS, (r+1)S): the pieces of the parameters that fall
there. Row j = [range j of the gradients, all k flags] (L = S + k). Rank r steps its pieces only and
keeps their state only (a 1-D or (rows, u) slice per parameter): ZeRO stage 1.

Bytes a rank sends per step, ring algorithms, b bytes an element:
  MatrixShard  reduce-scatter (W−1)/W·P·(M+1)·b + all-gather (W−1)/W·P·M·b
  FlatShard    reduce-scatter (W−1)·(S+k)·b     + all-gather (W−1)·S·b
  all-reduce of the same gradients, as a replicated step sends them: 2(W−1)/W·(elements)·b
The same volume up to padding and flags. Gloo (CPU) builds its reduce-scatter from an all-reduce of
the whole input, keeping the rank's slice, so there a reduce-scatter moves twice as much
(bench.distributed measures it); NCCL's is a true reduce-scatter.
"""

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor forms of reduce-scatter and all-gather and warns on the old names;
# torch 2.11 (the GPU machines') has only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# A FlatShard holds parameters up to this many elements (64 MiB of float32), so that backward can send
# the first buckets while later gradients are still being computed; a larger parameter gets its own.
BUCKET_ELEMENTS = 2**24


class GradientBucket:
    """One reduce-scatter: the gradients of `slots` (None: padding), laid out in rows by its shard."""

    def __init__(self, shard, slots: list):
        self.shard, self.slots = shard, slots
        self.params = [p for p in slots if p is not None]
        self.index = -1  # position in DataParallel.buckets
        self.expected: set[int] = set()  # ids of the parameters whose gradients fill it
        self.ready: set[int] = set()
        self.work = None
        self.received: torch.Tensor | None = None
        self.averaged = False
        self.sent: list[tuple] = []  # (param, its grad, the grad's version) when launched

    def refresh(self) -> None:
        """Expect the gradients of the parameters that require one now (frozen or unfrozen since)."""
        self.expected = {id(p) for p in self.params if p.requires_grad}

    @property
    def filled(self) -> bool:
        return self.ready >= self.expected

    def launch(self, group) -> None:
        """Start the reduce-scatter of this rank's current gradients (zeros where it has none)."""
        self.sent = [(p, p.grad, None if p.grad is None else p.grad._version) for p in self.params]
        with torch.no_grad():
            rows = self.shard.rows(self)
        self.received = rows.new_empty(rows.shape[1])
        self.work = _reduce_scatter(self.received, rows.view(-1), group=group, async_op=True)

    def average(self, world_size: int) -> None:
        if not self.averaged:
            self.work.wait()
            self.received.div_(world_size)  # sum → average; flags stay > 0 where any rank had a gradient
            self.averaged = True

    def changed(self) -> torch.Tensor | None:
        """The first parameter whose p.grad was replaced or modified in place since it was sent."""
        for p, grad, version in self.sent:
            if p.grad is not grad or (grad is not None and grad._version != version):
                return p
        return None

    def reset(self) -> None:
        self.ready.clear()
        self.work = self.received = None
        self.averaged = False
        self.sent = []


class MatrixShard:
    """A group's n same-shape matrices; matrix i is owned, stepped and sent by rank i mod W."""

    def __init__(self, group_index: int, params: list[torch.Tensor], rank: int, world_size: int):
        self.group_index, self.params, self.rank, self.world_size = group_index, params, rank, world_size
        W = world_size
        padded = params + [None] * (-len(params) % W)
        self.buckets = [GradientBucket(self, padded[c : c + W]) for c in range(0, len(padded), W)]
        self.owned = params[rank::W]  # one per bucket, but none from the last bucket's padding

    def rows(self, bucket: GradientBucket) -> torch.Tensor:
        like = bucket.slots[0]  # a bucket's first slot is never padding
        rows = like.new_zeros(len(bucket.slots), like.numel() + 1)
        for row, p in zip(rows, bucket.slots, strict=True):
            if p is not None and p.grad is not None:
                row[:-1].copy_(p.grad.reshape(-1))
                row[-1] = 1
        return rows

    def gradients(self) -> tuple[list, list, list, torch.Tensor | None]:
        """(keys, tensors, averaged gradients, has-a-gradient flags) of this rank's matrices."""
        received = [bucket.received for bucket in self.buckets[: len(self.owned)]]
        if not received:
            return [], [], [], None
        grads = [r[:-1].view_as(p) for p, r in zip(self.owned, received, strict=True)]
        return self.owned, self.owned, grads, torch.stack([r[-1] for r in received]) > 0

    def squares(self) -> torch.Tensor:
        """Σ of this rank's averaged gradients' squares, in float32."""
        received = [bucket.received[:-1] for bucket in self.buckets[: len(self.owned)]]
        norms = torch._foreach_norm(received, 2, dtype=torch.float32) if received else []
        like = self.params[0]
        return torch.stack(norms).square().sum() if norms else like.new_zeros((), dtype=torch.float32)

    def scale_(self, factor: torch.Tensor) -> None:
        for bucket in self.buckets[: len(self.owned)]:
            bucket.received[:-1].mul_(factor)

    def all_gather(self, group) -> Callable[[], None]:
        """Send this rank's matrices (updated or not) to all; the returned call copies in the others'."""
        like = self.params[0]
        padding = [torch.zeros_like(like)] * (len(self.buckets) - len(self.owned))
        mine = torch.stack([*self.owned, *padding])
        W, C = self.world_size, len(self.buckets)
        everyone = like.new_empty(W * C, *like.shape)  # rank-major: row j·C + c is matrix c·W + j
        work = _all_gather(everyone, mine, group=group, async_op=True)
        others = [i for i in range(len(self.params)) if i % W != self.rank]
        targets = [self.params[i] for i in others]

        def finish() -> None:
            work.wait()
            if targets:
                torch._foreach_copy_(targets, [everyone[i % W * C + i // W] for i in others])

        return finish

    def state_shape(self, p: torch.Tensor) -> tuple | None:
        return tuple(p.shape) if any(p is q for q in self.owned) else None


class FlatShard:
    """ZeRO-1: parameters flattened in order, rank r owning elements [rS, (r+1)S) in whole units of u."""

    def __init__(self, group_index: int, params: list[torch.Tensor], unit: int, by_rows: bool,
                 rank: int, world_size: int):
        self.group_index, self.params, self.unit, self.by_rows = group_index, params, unit, by_rows
        self.world_size = world_size
        self.sizes = [p.numel() for p in params]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(params))]
        S = self.span = unit * math.ceil(sum(self.sizes) / (unit * world_size))
        self.pieces: list[tuple[int, int, int]] = []  # this rank's: (parameter, start, end) in the parameter
        self.row_pieces: list[list[tuple]] = []  # per parameter: (row, start, end in the row, start, end)
        self.foreign: list[int] = []  # parameters the all-gather writes into: not wholly this rank's
        for i, (o, n) in enumerate(zip(self.offsets, self.sizes, strict=True)):
            if o < (rank + 1) * S and o + n > rank * S:
                self.pieces.append((i, *_overlap(rank * S, S, o, n)))
            if o < rank * S or o + n > (rank + 1) * S:
                self.foreign.append(i)
            pieces = []
            for j in range(o // S, (o + n - 1) // S + 1):
                a, b = _overlap(j * S, S, o, n)
                pieces.append((j, o + a - j * S, o + b - j * S, a, b))
            self.row_pieces.append(pieces)
        self.bucket = GradientBucket(self, params)
        self.buckets = [self.bucket]
        self._flag_patterns: dict[tuple[bool, ...], torch.Tensor] = {}
        self._piece_params: torch.Tensor | None = None

    def rows(self, bucket: GradientBucket) -> torch.Tensor:
        like, S, k = self.params[0], self.span, len(self.params)
        rows = like.new_zeros(self.world_size, S + k)
        targets, sources = [], []
        for p, pieces in zip(self.params, self.row_pieces, strict=True):
            if p.grad is not None:
                flat = p.grad.reshape(-1)
                for j, a, b, c, d in pieces:
                    targets.append(rows[j, a:b])
                    sources.append(flat[c:d])
        if targets:
            torch._foreach_copy_(targets, sources)
        rows[:, S:] = self._flags(tuple(p.grad is not None for p in self.params))
        return rows

    def gradients(self) -> tuple[list, list, list, torch.Tensor | None]:
        """(keys, tensors, averaged gradients, flags) of this rank's pieces; tensors view the parameters."""
        if not self.pieces:
            return [], [], [], None
        received, starts = self.bucket.received, 0
        keys, tensors, grads = [], [], []
        for i, a, b in self.pieces:
            keys.append(self.params[i])
            tensors.append(self._shaped(self.params[i].view(-1)[a:b]))
            grads.append(self._shaped(received[starts : starts + b - a]))
            starts += b - a
        if self._piece_params is None:  # once: which parameter each piece belongs to, on the device
            self._piece_params = torch.tensor([i for i, _, _ in self.pieces], device=received.device)
        return keys, tensors, grads, received[self.span :].index_select(0, self._piece_params) > 0

    def squares(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.bucket.received[: self.span], dtype=torch.float32).square()

    def scale_(self, factor: torch.Tensor) -> None:
        self.bucket.received[: self.span].mul_(factor)

    def all_gather(self, group) -> Callable[[], None]:
        like, S = self.params[0], self.span
        mine = like.new_zeros(S)
        if self.pieces:
            pieces = [self.params[i].view(-1)[a:b] for i, a, b in self.pieces]
            torch.cat(pieces, out=mine[: sum(b - a for _, a, b in self.pieces)])
        everyone = like.new_empty(self.world_size * S)  # in order: the flattened parameters, then padding
        work = _all_gather(everyone, mine, group=group, async_op=True)

        def finish() -> None:
            work.wait()
            if self.foreign:
                targets = [self.params[i].view(-1) for i in self.foreign]
                sources = [everyone[self.offsets[i] : self.offsets[i] + self.sizes[i]] for i in self.foreign]
                torch._foreach_copy_(targets, sources)

        return finish

    def state_shape(self, p: torch.Tensor) -> tuple | None:
        for i, a, b in self.pieces:
            if self.params[i] is p:
                return ((b - a) // self.unit, self.unit) if self.by_rows else (b - a,)
        return None

    def _shaped(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(-1, self.unit) if self.by_rows else flat

    def _flags(self, pattern: tuple[bool, ...]) -> torch.Tensor:
        """The flags as a device tensor, copied from the host once per pattern, not once per step."""
        if pattern not in self._flag_patterns:
            like = self.params[0]
            self._flag_patterns[pattern] = torch.tensor(pattern, dtype=like.dtype, device=like.device)
        return self._flag_patterns[pattern]


def _overlap(start: int, length: int, offset: int, size: int) -> tuple[int, int]:
    """Flat range [start, start + length) as offsets within the parameter at [offset, offset + size)."""
    return max(start, offset) - offset, min(start + length, offset + size) - offset
