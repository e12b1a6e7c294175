"""One record per Muon kind: its duality map, where momentum sits, how ranks share it, the dims it takes.

muon.py steps by these records, distributed.py shards by them and grouping.py routes layers to them.
Adding a kind is one entry here plus its map (duality.py); the maps and their norms are in
docs/MATH.md.
"""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .duality import dualize_conv2d, dualize_embed, dualize_linear, dualize_sign
from .newton_schulz import orthogonalize, resolve_coefficients

# Scale of a hidden (d_out, d_in) matrix's U Vᵀ. The rules are not interchangeable: each has its
# own good learning rate.
LR_SCALES = {
    "spectral": lambda d_out, d_in: math.sqrt(d_out / d_in),  # the paper: RMS→RMS duality map
    "muon": lambda d_out, d_in: math.sqrt(max(1.0, d_out / d_in)),  # Muon, speedrun, torch "original"
    "rms": lambda d_out, d_in: 0.2 * math.sqrt(max(d_out, d_in)),  # Moonlight: AdamW's update RMS
}

# How a kind's work is split across ranks (optim/distributed.py):
MATRIX = "matrix"  # whole matrices dealt out, rank r owns matrices r, r + W, …: the map needs all of one
ROW = "row"  # ZeRO-1 over the last dim's rows: the map acts on each row alone
ELEMENT = "element"  # ZeRO-1 over single entries: the update is elementwise (Adam)


@dataclass(frozen=True)
class Kind:
    """A layer kind: the map u = dualize(U, group) of a stack U (B, *shape) or a single tensor.

    dualize is None for Adam, which is not a duality map but torch's AdamW math. before_momentum:
    the gradient is dualized and momentum averages the results (embed), instead of the momentum
    being dualized (every other kind). shard: MATRIX, ROW or ELEMENT. ndim: the fewest and most
    dims a parameter may have (None: no limit). lr_scale: the group's lr_scale rule (LR_SCALES)
    multiplies a MATRIX kind's map; otherwise the map's own norm fixes the update's size.
    """

    name: str
    dualize: Callable[[torch.Tensor, dict], torch.Tensor] | None
    before_momentum: bool
    shard: str
    ndim: tuple[int, int | None]
    lr_scale: bool = False

    def accepts(self, p: torch.Tensor) -> bool:
        low, high = self.ndim
        return p.ndim >= low and (high is None or p.ndim <= high)

    def dims(self) -> str:
        low, high = self.ndim
        return f"{low} or more" if high is None else str(low) if low == high else f"{low} to {high}"


def _ns_options(group: dict) -> dict:
    """orthogonalize's options from a group: ns_steps, ns_coefficients with ε = ns_eps unless that is
    None (the set's own), ns_dtype and ns_rounding."""
    coefficients = group["ns_coefficients"]
    if group["ns_eps"] is not None:
        coefficients = dataclasses.replace(resolve_coefficients(coefficients), eps=group["ns_eps"])
    return dict(steps=group["ns_steps"], coefficients=coefficients, dtype=group["ns_dtype"],
                rounding=group["ns_rounding"])


_KINDS = (
    Kind("hidden", lambda U, group: orthogonalize(U, **_ns_options(group)), False, MATRIX, (2, 3),
         lr_scale=True),
    Kind("conv", lambda U, group: dualize_conv2d(U, **_ns_options(group)), False, MATRIX, (4, 4)),
    Kind("embed", lambda U, group: dualize_embed(U), True, ROW, (2, 2)),
    Kind("head_linear", lambda U, group: dualize_linear(U, **_ns_options(group)), False, MATRIX, (2, 2)),
    Kind("head_sign", lambda U, group: dualize_sign(U), False, ROW, (2, 2)),
    Kind("adam", None, False, ELEMENT, (0, None)),
)
KINDS: dict[str, Kind] = {kind.name: kind for kind in _KINDS}
