"""Modular-duality optimizer library: Newton–Schulz, the duality maps of each layer kind, and Muon.

Modules, one job each:
  newton_schulz  orthogonalize (≈ U Vᵀ) and its coefficient sets
  duality        the duality map of each layer kind (linear, embed, sign, conv2d)
  kinds          one record per Muon kind: its map, where momentum sits, how ranks share it
  grouping       a model's parameters routed to kinds by role (param_groups)
  update         one kind's step on local tensors: momentum, map, NorMuon, Adam, weight decay
  muon           the optimizer: groups checked, every rank-dependent call made on its Distribution
  distribution   the Distribution interface, its one-process implementation, and the choice
  distributed    DataParallel: Muon's own gradient averaging (reduce-scatter, step a share, all-gather)
  zero           DataParallel's shards, buckets and collectives (ZeRO-1)
  fsdp           FullyShardedParallel: Muon on fully_shard's row-sharded DTensors
  fsdp_layout    fully_shard's rows and the owner exchange's slots, from shapes alone
  state          the checks a state dict passes before it is loaded; a resting group's gradients in it
  allocations    counting the tensors a step allocates

Code outside optim/ imports from `optim` only (tests/test_optim_distribution.py checks it); the
public names:

  Muon                  the optimizer (optim/muon.py has its contract)
  param_groups          a model's parameters in Muon's param groups, by role; ROLES names the roles
  KINDS, Kind           the layer kinds and their record; LR_SCALES, a hidden matrix's scale rules
  orthogonalize         Newton–Schulz ≈ U Vᵀ; COEFFICIENTS, Coefficients, resolve_coefficients its sets;
                        ROUNDINGS its roundings; default_dtype its default precision;
                        newton_schulz_flops its cost; polar_reference the exact U Vᵀ by SVD
  dualize_linear, dualize_embed, dualize_sign, dualize_conv2d   the duality maps
  EPS_FORMS, WD_FORMS, NORMUON_AXES, STEP_ROUNDINGS   the choices of Muon's adam_eps_form, wd_form,
                        normuon and step_rounding
  Distribution          what Muon calls for everything that depends on the ranks; OneProcess is one rank
  is_dtensor            whether a tensor is a DTensor (fully_shard's), without importing DTensor
  step_collectives      one DataParallel step's collectives at W ranks, without a process group;
                        Collective describes one, REDUCE_SCATTER, ALL_GATHER, ALL_REDUCE name its op
  state_shapes          the state's shape per parameter on one rank of DataParallel, without a group
  muon_state_layout     key → (shape, dtype) of the state a kind keeps for a parameter of a shape
  local_shape           a parameter's shape on one rank under fully_shard
  exchange_elements     per stack, one buffer of fully_shard's owner exchange, in elements
  count_allocations     context counting the tensors the code inside allocates (a step's)
"""

from .allocations import count_allocations
from .distributed import is_dtensor, state_shapes, step_collectives
from .distribution import Distribution, OneProcess
from .duality import dualize_conv2d, dualize_embed, dualize_linear, dualize_sign
from .fsdp_layout import exchange_elements, local_shape
from .grouping import ROLES, param_groups
from .kinds import KINDS, LR_SCALES, Kind
from .muon import EPS_FORMS, NORMUON_AXES, WD_FORMS, Muon
from .newton_schulz import (
    COEFFICIENTS,
    ROUNDINGS,
    Coefficients,
    default_dtype,
    newton_schulz_flops,
    orthogonalize,
    polar_reference,
    resolve_coefficients,
)
from .state import muon_state_layout
from .update import STEP_ROUNDINGS
from .zero import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, Collective

__all__ = [
    "STEP_ROUNDINGS",
    "ALL_GATHER",
    "ALL_REDUCE",
    "COEFFICIENTS",
    "EPS_FORMS",
    "KINDS",
    "LR_SCALES",
    "NORMUON_AXES",
    "REDUCE_SCATTER",
    "ROLES",
    "ROUNDINGS",
    "WD_FORMS",
    "Coefficients",
    "Collective",
    "Distribution",
    "Kind",
    "Muon",
    "OneProcess",
    "count_allocations",
    "default_dtype",
    "dualize_conv2d",
    "dualize_embed",
    "dualize_linear",
    "dualize_sign",
    "exchange_elements",
    "is_dtensor",
    "local_shape",
    "muon_state_layout",
    "newton_schulz_flops",
    "orthogonalize",
    "param_groups",
    "polar_reference",
    "resolve_coefficients",
    "state_shapes",
    "step_collectives",
]
