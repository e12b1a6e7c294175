"""Counting the tensors a piece of code allocates, e.g. one optimizer step (tests, bench).

An allocation is a tensor storage that an aten operator creates: a tensor the operator returns whose
storage is none of the storages of the tensors it was given. So factories (empty, zeros, full,
tensor), out-of-place arithmetic and copies (.to, clone, stack, a foreach op's every output) count,
one per new storage; in-place and out= operators (they return their inputs), views (they share their
base's storage) and collectives (in place on their buffers) do not, nor do storages of 0 bytes.
Counted at the dispatcher by a TorchDispatchMode, on any device; what a torch.compile'd graph
allocates inside itself (inductor's buffers bypass the dispatcher) is not seen.

    with count_allocations() as allocations:
        opt.step()
    allocations.count, allocations.bytes, allocations.by_op
"""

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Allocations(TorchDispatchMode):
    """The allocations made while active: count, bytes, and count by operator name."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.bytes = 0

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        new = {}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() and _storage(t) not in given:
                new[_storage(t)] = t.untyped_storage().nbytes()
        if new:
            self.by_op[func.overloadpacket.__name__] += len(new)
            self.bytes += sum(new.values())
        return out


@contextmanager
def count_allocations() -> Iterator[Allocations]:
    """Count the allocations (see the module docstring) of the code inside; read the result after."""
    with Allocations() as allocations:
        yield allocations


def _storage(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()
