"""Modular-duality optimizer library: Newton–Schulz, the duality maps of each layer kind, and Muon."""

from .duality import (
    dualize_bias,
    dualize_conv2d,
    dualize_embed,
    dualize_gain,
    dualize_linear,
    dualize_sign,
)
from .grouping import param_groups
from .muon import KINDS, LR_SCALES, Muon
from .newton_schulz import (
    COEFFICIENTS,
    Coefficients,
    newton_schulz_flops,
    orthogonalize,
    polar_reference,
    resolve_coefficients,
)

__all__ = [
    "COEFFICIENTS",
    "KINDS",
    "LR_SCALES",
    "Coefficients",
    "Muon",
    "dualize_bias",
    "dualize_conv2d",
    "dualize_embed",
    "dualize_gain",
    "dualize_linear",
    "dualize_sign",
    "newton_schulz_flops",
    "orthogonalize",
    "param_groups",
    "polar_reference",
    "resolve_coefficients",
]
