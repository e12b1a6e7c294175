"""Modular-duality optimizer library: Newton–Schulz, the duality maps of each layer kind, and Muon."""

from .duality import dualize_conv2d, dualize_embed, dualize_linear, dualize_sign
from .grouping import ROLES, param_groups
from .kinds import KINDS, LR_SCALES, Kind
from .muon import Muon
from .newton_schulz import (
    COEFFICIENTS,
    Coefficients,
    default_dtype,
    newton_schulz_flops,
    orthogonalize,
    polar_reference,
    resolve_coefficients,
)

__all__ = [
    "COEFFICIENTS",
    "KINDS",
    "LR_SCALES",
    "ROLES",
    "Coefficients",
    "Kind",
    "Muon",
    "default_dtype",
    "dualize_conv2d",
    "dualize_embed",
    "dualize_linear",
    "dualize_sign",
    "newton_schulz_flops",
    "orthogonalize",
    "param_groups",
    "polar_reference",
    "resolve_coefficients",
]
