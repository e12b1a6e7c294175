"""fully_shard's layout from shapes alone (no torch.distributed.tensor import): each rank's rows of a
parameter, and the slots of the owner exchange that maps a stack's whole matrices (optim/fsdp.py)."""

import math

from .distributed import same_shape
from .kinds import KINDS, MATRIX


def shard_rows(m: int, rank: int, world_size: int) -> int:
    """Rows of an m-row parameter on `rank` under fully_shard: torch.chunk's, ⌈m/W⌉ until none are left."""
    c = math.ceil(m / world_size)
    return max(0, min(m, (rank + 1) * c) - rank * c)


def local_shape(shape: tuple, rank: int, world_size: int) -> tuple:
    """A parameter's shape on `rank` under fully_shard: its rows, every other dim whole."""
    return (shard_rows(shape[0], rank, world_size), *shape[1:]) if len(shape) else ()


def exchange_slots(n: int, dealt: int, world_size: int) -> list[int | None]:
    """The owner exchange's slots for a stack of n matrices after `dealt` others of its step: slot
    s = lead + i holds matrix i (lead = dealt mod W), None pads both ends to C·W slots; slot s belongs
    to rank s mod W, column s // W."""
    slots = [None] * (dealt % world_size) + list(range(n))
    return slots + [None] * (-len(slots) % world_size)


def exchange_elements(param_groups: list[dict], world_size: int) -> list[int]:
    """Per stack of a matrix kind (same_shape, in group order, every parameter with a gradient), the
    elements of one (W, C, c, …) buffer of its owner exchange: C·W slots of c = ⌈m/W⌉ rows each."""
    sizes, dealt = [], 0
    for group in param_groups:
        if KINDS[group["kind"]].shard != MATRIX:
            continue
        for stack in same_shape(group["params"]):
            m, *rest = stack[0].shape
            slots = exchange_slots(len(stack), dealt, world_size)
            sizes.append(len(slots) * math.ceil(m / world_size) * math.prod(rest))
            dealt += len(stack)
    return sizes
