"""The shares of a distributed Muon step: whole matrices of a stack, or 1/W of a group's elements (ZeRO-1).

A shard is a set of parameters whose gradients travel in one or more buckets. A bucket is one
reduce-scatter of a (W, L) buffer whose row j is what rank j should receive; rank r gets row r summed
over ranks and divides it by W: the average. Each shard's has-a-gradient flags travel apart from the
data, in one all-reduce of int32 counts launched right after the shard's last bucket: a parameter's
count is the number of ranks that had a gradient for it, so every rank knows, without a host read,
whether any rank had one (a rank without one sends zeros in its place). Shards have flags only under
Muon(unused_parameters=True); by default every parameter has a gradient on every rank (checked
before sending, optim/distributed.py) and no flag travels. After the update one all-gather per shard
brings every rank the others' updated values.

Alignment. Every collective's per-rank chunk (a reduce-scatter's row, an all-gather's contribution,
the flags' buffer) is padded with zeros to a multiple of ALIGNMENT = 16 bytes, whatever W and the
shapes: NCCL's protocols slow down on chunks that are not. Collective describes each one, and
`shard.collectives` lists a shard's; the buffers are made from these descriptions, once, at the first
step, and reused by every step after (optim.distributed.step_collectives lists a whole step's).

MatrixShard (Newton–Schulz kinds). A param group's n matrices of one shape form a stack, the unit
Muon batches into one Newton–Schulz call. Matrix i belongs to rank i mod W. The stack is padded with
zero matrices to P = W·⌈n/W⌉ and cut into P/W buckets of W consecutive matrices, row j = G_j padded to
L = ⌈M⌉₁₆ elements (M a matrix's elements, ⌈·⌉₁₆ rounding up to 16 bytes), each sent as soon as its
gradients are accumulated; rank r then applies momentum, one batched Newton–Schulz call and the
update to its ⌈(n − r)/W⌉ matrices only, and keeps momentum buffers for those only.

FlatShard (row and element kinds: embed, head_sign, adam). A param group's parameters of one dtype and
device (up to BUCKET_ELEMENTS) are flattened in order into N elements and cut into W ranges of
S = u·⌈N/(u·W)⌉ elements, u the unit the map needs whole (a row of the last dim for embed and
head_sign, 1 for Adam). Rank r owns elements [rS, (r+1)S): the pieces of the parameters that fall
there. Row j = range j of the gradients padded to L = ⌈S⌉₁₆. Rank r steps its pieces only and keeps
their state only (a 1-D or (rows, u) slice per parameter): ZeRO stage 1.

Bytes a rank sends per step, ring algorithms, b bytes an element, k parameters in the shard:
  MatrixShard  reduce-scatter (W−1)/W·P·L·b + all-gather (W−1)/W·P·L·b [+ flags 2(W−1)/W·⌈k⌉₁₆·4]
  FlatShard    reduce-scatter (W−1)·L·b     + all-gather (W−1)·L·b     [+ flags 2(W−1)/W·⌈k⌉₁₆·4]
  all-reduce of the same gradients, as a replicated step sends them: 2(W−1)/W·(elements)·b
The same volume up to padding (and flags, under unused_parameters=True). Gloo (CPU) builds its
reduce-scatter from an all-reduce of the whole input, keeping the rank's slice, so there a
reduce-scatter moves twice as much (bench.distributed measures it); NCCL's is a true reduce-scatter.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor forms of reduce-scatter and all-gather and warns on the old names;
# torch 2.11 (the GPU machines') has only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# A FlatShard holds parameters up to this many elements (64 MiB of float32), so that backward can send
# the first buckets while later gradients are still being computed; a larger parameter gets its own.
BUCKET_ELEMENTS = 2**24

ALIGNMENT = 16  # bytes: every collective's per-rank chunk is a multiple of it
FLAG_DTYPE = torch.int32  # has-a-gradient counts, summed over ranks

REDUCE_SCATTER, ALL_GATHER, ALL_REDUCE = "reduce_scatter", "all_gather", "all_reduce"


def aligned(elements: int, dtype: torch.dtype) -> int:
    """`elements` rounded up to a whole number of ALIGNMENT bytes of `dtype`: ⌈elements⌉₁₆."""
    per = max(1, ALIGNMENT // dtype.itemsize)
    return -(-elements // per) * per


@dataclass(frozen=True)
class Collective:
    """One collective of a distributed step, as the step issues it.

    op: REDUCE_SCATTER, ALL_GATHER or ALL_REDUCE. elements: the per-rank chunk, in elements of dtype:
    what each rank receives from a reduce-scatter (its input is W such rows), what each rank
    contributes to an all-gather (its output is W such chunks), or an all-reduce's whole buffer.
    group: the index of the param group it serves; what: its content, in words.
    """

    op: str
    elements: int
    dtype: torch.dtype
    group: int
    what: str

    @property
    def bytes(self) -> int:
        """The per-rank chunk in bytes; a multiple of ALIGNMENT."""
        return self.elements * self.dtype.itemsize


class GradientBucket:
    """One reduce-scatter: the gradients of `slots` (None: padding), laid out in rows by its shard."""

    def __init__(self, shard, slots: list, collective: Collective):
        self.shard, self.slots, self.collective = shard, slots, collective
        self.params = [p for p in slots if p is not None]
        self.index = -1  # position in DataParallel.buckets
        self.expected: set[int] = set()  # ids of the parameters whose gradients fill it
        self.ready: set[int] = set()
        self.work = None
        # (W, L) rows sent and the (L,) row received, made at the first launch and reused; padding
        # (columns past the data, padding slots) is zero from then on.
        self.rows: torch.Tensor | None = None
        self.received: torch.Tensor | None = None
        self.averaged = False
        self.sent: list[tuple] = []  # (param, its grad, the grad's version) when launched

    def refresh(self) -> None:
        """Expect the gradients of the parameters that require one now (frozen or unfrozen since); without
        flags, of every parameter: a frozen one keeps the bucket for step(), which refuses it."""
        flagged = self.shard.flags is not None
        self.expected = {id(p) for p in self.params if p.requires_grad or not flagged}

    @property
    def filled(self) -> bool:
        return self.ready >= self.expected

    def launch(self, group) -> None:
        """Start the reduce-scatter of this rank's current gradients (zeros where it has none)."""
        self.sent = [(p, p.grad, None if p.grad is None else p.grad._version) for p in self.params]
        if self.rows is None:
            like, length = self.params[0], self.collective.elements
            self.rows = torch.zeros(self.shard.world_size, length, dtype=self.collective.dtype,
                                    device=like.device)
            self.received = torch.empty(length, dtype=self.collective.dtype, device=like.device)
        with torch.no_grad():
            self.shard.fill(self)
        self.work = _reduce_scatter(self.received, self.rows.view(-1), group=group, async_op=True)

    def average(self, world_size: int) -> None:
        if not self.averaged:
            self.work.wait()
            self.received.div_(world_size)  # sum → average
            self.averaged = True

    def changed(self) -> torch.Tensor | None:
        """The first parameter whose p.grad was replaced or modified in place since it was sent."""
        for p, grad, version in self.sent:
            if p.grad is not grad or (grad is not None and grad._version != version):
                return p
        return None

    def reset(self) -> None:
        self.ready.clear()
        self.work = None
        self.averaged = False
        self.sent = []


class Flags:
    """A shard's has-a-gradient counts: one all-reduce of int32, after the shard's last bucket is sent.

    Entry i (parameter i of the shard) is 1 on a rank that sent a gradient for it and 0 on one that
    sent zeros; summed, it is > 0 where any rank had one. The patterns a rank sends are copied to
    the device once each, not once per step.
    """

    def __init__(self, group_index: int, params: list[torch.Tensor]):
        self.params = params
        self.collective = Collective(ALL_REDUCE, aligned(len(params), FLAG_DTYPE), FLAG_DTYPE, group_index,
                                     f"has-a-gradient flags of {len(params)} parameters")
        self.patterns: dict[tuple[bool, ...], torch.Tensor] = {}
        self.counts: torch.Tensor | None = None  # the buffer all-reduced, made once
        self.work = None

    def launch(self, buckets: list[GradientBucket], group) -> None:
        """Send which of the shard's parameters this rank had a gradient for when its bucket left."""
        pattern = tuple(grad is not None for bucket in buckets for _, grad, _ in bucket.sent)
        if pattern not in self.patterns:
            like = self.params[0]
            padding = (False,) * (self.collective.elements - len(pattern))
            self.patterns[pattern] = torch.tensor(pattern + padding, dtype=FLAG_DTYPE, device=like.device)
            if self.counts is None:
                self.counts = torch.empty_like(self.patterns[pattern])
        self.counts.copy_(self.patterns[pattern])
        self.work = dist.all_reduce(self.counts, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        """The counts summed over ranks (waits for them)."""
        self.work.wait()
        return self.counts

    def reset(self) -> None:
        self.work = None


class MatrixShard:
    """A group's n same-shape matrices; matrix i is owned, stepped and sent by rank i mod W."""

    def __init__(self, group_index: int, params: list[torch.Tensor], rank: int, world_size: int,
                 unused_parameters: bool):
        self.group_index, self.params, self.rank, self.world_size = group_index, params, rank, world_size
        W, like = world_size, params[0]
        self.elements = like.numel()
        row = aligned(self.elements, like.dtype)
        padded = params + [None] * (-len(params) % W)
        shape = "×".join(map(str, like.shape))
        self.buckets = [
            GradientBucket(self, padded[c : c + W], Collective(
                REDUCE_SCATTER, row, like.dtype, group_index,
                f"gradients of {shape} matrices {c}-{c + W - 1} of {len(params)}"))
            for c in range(0, len(padded), W)]
        self.owned = params[rank::W]  # one per bucket, but none from the last bucket's padding
        self.flags = Flags(group_index, params) if unused_parameters else None
        self.gather = Collective(ALL_GATHER, len(self.buckets) * row, like.dtype, group_index,
                                 f"{len(self.buckets)} updated {shape} matrices a rank")
        self.mine: torch.Tensor | None = None  # (C, L) sent and (W, C, L) gathered, made once
        self.everyone: torch.Tensor | None = None

    @property
    def collectives(self) -> list[Collective]:
        return [bucket.collective for bucket in self.buckets] + flag_collectives(self) + [self.gather]

    def fill(self, bucket: GradientBucket) -> None:
        """Row j of the bucket's rows ← its slot j's gradient, or zeros where this rank has none."""
        M, targets, sources, missing = self.elements, [], [], []
        for row, p in zip(bucket.rows, bucket.slots, strict=True):
            if p is None:
                continue  # padding: zero since the rows were made
            if p.grad is None:
                missing.append(row[:M])
            else:
                targets.append(row[:M])
                sources.append(p.grad.reshape(-1))
        if targets:
            torch._foreach_copy_(targets, sources)
        if missing:
            torch._foreach_zero_(missing)

    def gradients(self) -> tuple[list, list, list, torch.Tensor | None]:
        """(keys, tensors, averaged gradients, has-a-gradient flags or None: all have one) of this
        rank's matrices."""
        counts = wait_flags(self)
        received = [bucket.received for bucket in self.buckets[: len(self.owned)]]
        if not received:
            return [], [], [], None
        grads = [r[: self.elements].view_as(p) for p, r in zip(self.owned, received, strict=True)]
        flags = None if counts is None else counts[self.rank : len(self.params) : self.world_size] > 0
        return self.owned, self.owned, grads, flags

    def squares(self) -> torch.Tensor:
        """Σ of this rank's averaged gradients' squares, in float32."""
        received = [bucket.received[: self.elements] for bucket in self.buckets[: len(self.owned)]]
        norms = torch._foreach_norm(received, 2, dtype=torch.float32) if received else []
        like = self.params[0]
        return torch.stack(norms).square().sum() if norms else like.new_zeros((), dtype=torch.float32)

    def scale_(self, factor: torch.Tensor) -> None:
        for bucket in self.buckets[: len(self.owned)]:
            bucket.received[: self.elements].mul_(factor)

    def all_gather(self, group) -> Callable[[], None]:
        """Send this rank's matrices (updated or not) to all; the returned call copies in the others'."""
        W, C, M, like = self.world_size, len(self.buckets), self.elements, self.params[0]
        if self.mine is None:  # rank-major: everyone[j, c] is matrix c·W + j; padding stays zero
            self.mine = torch.zeros(C, self.gather.elements // C, dtype=self.gather.dtype, device=like.device)
            self.everyone = torch.empty(W, *self.mine.shape, dtype=self.gather.dtype, device=like.device)
        if self.owned:
            torch._foreach_copy_([self.mine[c, :M] for c in range(len(self.owned))],
                                 [p.reshape(-1) for p in self.owned])
        work = _all_gather(self.everyone.view(-1), self.mine.view(-1), group=group, async_op=True)
        others = [i for i in range(len(self.params)) if i % W != self.rank]
        targets = [self.params[i] for i in others]
        sources = [self.everyone[i % W, i // W, :M].view_as(like) for i in others]

        def finish() -> None:
            work.wait()
            if targets:
                torch._foreach_copy_(targets, sources)

        return finish

    def state_shape(self, p: torch.Tensor) -> tuple | None:
        return tuple(p.shape) if any(p is q for q in self.owned) else None


class FlatShard:
    """ZeRO-1: parameters flattened in order, rank r owning elements [rS, (r+1)S) in whole units of u."""

    def __init__(self, group_index: int, params: list[torch.Tensor], unit: int, by_rows: bool,
                 rank: int, world_size: int, unused_parameters: bool):
        self.group_index, self.params, self.unit, self.by_rows = group_index, params, unit, by_rows
        self.rank, self.world_size = rank, world_size
        self.sizes = [p.numel() for p in params]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(params))]
        S = self.span = unit * math.ceil(sum(self.sizes) / (unit * world_size))
        self.pieces: list[tuple[int, int, int]] = []  # this rank's: (parameter, start, end) in the parameter
        self.row_pieces: list[list[tuple]] = []  # per parameter: (row, start, end in the row, start, end)
        for i, (o, n) in enumerate(zip(self.offsets, self.sizes, strict=True)):
            if o < (rank + 1) * S and o + n > rank * S:
                self.pieces.append((i, *_overlap(rank * S, S, o, n)))
            pieces = []
            for j in range(o // S, (o + n - 1) // S + 1):
                a, b = _overlap(j * S, S, o, n)
                pieces.append((j, o + a - j * S, o + b - j * S, a, b))
            self.row_pieces.append(pieces)
        like, row = params[0], aligned(S, params[0].dtype)
        what = f"{len(params)} parameters, {sum(self.sizes)} elements"
        self.bucket = GradientBucket(self, params, Collective(REDUCE_SCATTER, row, like.dtype, group_index,
                                                              f"gradients of {what}"))
        self.buckets = [self.bucket]
        self.flags = Flags(group_index, params) if unused_parameters else None
        self.gather = Collective(ALL_GATHER, row, like.dtype, group_index, f"updated {what}, 1/W a rank")
        self.mine: torch.Tensor | None = None  # (L,) sent and (W, L) gathered, made once
        self.everyone: torch.Tensor | None = None
        self._piece_params: torch.Tensor | None = None

    @property
    def collectives(self) -> list[Collective]:
        return [self.bucket.collective] + flag_collectives(self) + [self.gather]

    def fill(self, bucket: GradientBucket) -> None:
        """Row j[a:b] ← the gradient's piece in range j, or zeros where this rank has no gradient."""
        targets, sources, missing = [], [], []
        for p, pieces in zip(self.params, self.row_pieces, strict=True):
            flat = None if p.grad is None else p.grad.reshape(-1)
            for j, a, b, c, d in pieces:
                if flat is None:
                    missing.append(bucket.rows[j, a:b])
                else:
                    targets.append(bucket.rows[j, a:b])
                    sources.append(flat[c:d])
        if targets:
            torch._foreach_copy_(targets, sources)
        if missing:
            torch._foreach_zero_(missing)

    def gradients(self) -> tuple[list, list, list, torch.Tensor | None]:
        """(keys, tensors, averaged gradients, flags or None) of this rank's pieces; tensors view the
        parameters."""
        counts = wait_flags(self)
        if not self.pieces:
            return [], [], [], None
        received, starts = self.bucket.received, 0
        keys, tensors, grads = [], [], []
        for i, a, b in self.pieces:
            keys.append(self.params[i])
            tensors.append(self._shaped(self.params[i].view(-1)[a:b]))
            grads.append(self._shaped(received[starts : starts + b - a]))
            starts += b - a
        if counts is None:
            return keys, tensors, grads, None
        if self._piece_params is None:  # once: which parameter each piece belongs to, on the device
            self._piece_params = torch.tensor([i for i, _, _ in self.pieces], device=received.device)
        return keys, tensors, grads, counts.index_select(0, self._piece_params) > 0

    def squares(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.bucket.received[: self.span], dtype=torch.float32).square()

    def scale_(self, factor: torch.Tensor) -> None:
        self.bucket.received[: self.span].mul_(factor)

    def all_gather(self, group) -> Callable[[], None]:
        """Send this rank's range (updated or not) to all; the returned call copies in the others' ranges."""
        like = self.params[0]
        if self.mine is None:  # row j of everyone: rank j's range, then padding
            self.mine = torch.zeros(self.gather.elements, dtype=self.gather.dtype, device=like.device)
            self.everyone = torch.empty(self.world_size, self.gather.elements, dtype=self.gather.dtype,
                                        device=like.device)
        if self.pieces:
            pieces = [self.params[i].view(-1)[a:b] for i, a, b in self.pieces]
            torch.cat(pieces, out=self.mine[: sum(b - a for _, a, b in self.pieces)])
        work = _all_gather(self.everyone.view(-1), self.mine, group=group, async_op=True)
        targets, sources = [], []
        for p, pieces in zip(self.params, self.row_pieces, strict=True):
            for j, a, b, c, d in pieces:
                if j != self.rank:
                    targets.append(p.view(-1)[c:d])
                    sources.append(self.everyone[j, a:b])

        def finish() -> None:
            work.wait()
            if targets:
                torch._foreach_copy_(targets, sources)

        return finish

    def state_shape(self, p: torch.Tensor) -> tuple | None:
        for i, a, b in self.pieces:
            if self.params[i] is p:
                return ((b - a) // self.unit, self.unit) if self.by_rows else (b - a,)
        return None

    def _shaped(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(-1, self.unit) if self.by_rows else flat


def flag_collectives(shard) -> list[Collective]:
    """The shard's flags' all-reduce, or none where it has no flags."""
    return [] if shard.flags is None else [shard.flags.collective]


def wait_flags(shard) -> torch.Tensor | None:
    """The shard's has-a-gradient counts summed over ranks (waits for them), or None without flags."""
    return None if shard.flags is None else shard.flags.wait()


def _overlap(start: int, length: int, offset: int, size: int) -> tuple[int, int]:
    """Flat range [start, start + length) as offsets within the parameter at [offset, offset + size)."""
    return max(start, offset) - offset, min(start + length, offset + size) - offset
