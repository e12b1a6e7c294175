"""What a Muon state dict holds and must hold, checked before anything is loaded: one clear ValueError,
naming what the state dict has and what this optimizer expected. The checks read only their arguments:
the optimizer's groups and hyper-parameter names, and its distribution's stamp and state shapes
(optim/distribution.py).

Besides each kind's state (muon_state_layout), a parameter's entry holds PENDING_GRAD while its group
rests (step_every > 1, pending_steps > 0): p.grad, the sum of its gradients since the group's last update,
which zero_grad() keeps and the group's next update uses; loaded, it replaces p.grad (None where none
was saved, in every group with step_every > 1). Under DataParallel it is this rank's own,
whole (each rank sends its sum at the update), so a rank holds it for every parameter of a resting
group, its state only for its share; fully_shard refuses step_every, so its state dicts hold none.
"""

from collections.abc import Callable, Iterable

import torch

from .update import normuon_shape, state_dtype


def muon_state_layout(p: torch.Tensor, kind: str, shape: tuple,
                      group: dict | None = None) -> dict[str, tuple[tuple, torch.dtype]]:
    """key → (shape, dtype) of the state a Muon kind keeps for a parameter (or this rank's slice of it);
    with its `group`, in the dtype of the group's state_dtype rule (else the default, at least float32),
    and NorMuon's "second_moment" too where the group has normuon on."""
    dtype = state_dtype(p, "float32" if group is None else group["state_dtype"])
    if kind == "adam":
        return {"step": ((), torch.float32), "exp_avg": (shape, dtype), "exp_avg_sq": (shape, dtype)}
    layout = {"momentum_buffer": (shape, dtype)}
    if group is not None and group["normuon"] is not None:
        layout["second_moment"] = (normuon_shape(group, shape), dtype)
    return layout


PENDING_GRAD = "pending_grad"


def with_pending_gradients(state_dict: dict, groups: list[dict]) -> dict:
    """torch's `state_dict` of these `groups` with PENDING_GRAD = p.grad (a reference, as the rest) in the
    entry of each parameter of a resting group that has a gradient; the optimizer's own entries untouched."""
    state = dict(state_dict["state"])
    for saved, group in zip(state_dict["param_groups"], groups, strict=True):
        if group["pending_steps"]:
            for i, p in zip(saved["params"], group["params"], strict=True):
                if p.grad is not None:
                    state[i] = {**state.get(i, {}), PENDING_GRAD: p.grad}
    return {**state_dict, "state": state}


def without_pending_gradients(state: dict) -> tuple[dict, dict]:
    """A state dict's "state" split into (the kinds' state, index → pending gradient); an entry that held
    only a pending gradient is left out of the first."""
    kinds = {i: {k: v for k, v in entry.items() if k != PENDING_GRAD} for i, entry in state.items()}
    pending = {i: entry[PENDING_GRAD] for i, entry in state.items() if PENDING_GRAD in entry}
    return {i: entry for i, entry in kinds.items() if entry or i not in pending}, pending


StateShape = Callable[[torch.Tensor], "tuple | None"]  # p → its state's shape on this rank, None: not kept

# Group keys optim.Muon gained after its state dicts were first saved, each with the value that
# reproduces how a state dict saved without it was computed: such a state dict loads as saved with it.
KEYS_SINCE = {"state_dtype": "float32", "step_rounding": "precise"}
# Group keys renamed since, old name → new: a state dict saved under the old name loads under the new.
KEYS_RENAMED = {"adam_rounding": "step_rounding"}


def with_keys_since(state_dict):
    """state_dict with each saved param group's KEYS_RENAMED under their new names and the KEYS_SINCE
    it lacks given (the same object if no group needs either, or if it is no state dict, which
    check_muon_state_dict then refuses)."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return state_dict
    if all(KEYS_SINCE.keys() <= g.keys() and not KEYS_RENAMED.keys() & g.keys() for g in groups):
        return state_dict
    renamed = [{KEYS_RENAMED.get(k, k): v for k, v in g.items()} for g in groups]
    return {**state_dict, "param_groups": [{**KEYS_SINCE, **g} for g in renamed]}


def check_muon_state_dict(state_dict, groups: list[dict], hyperparameters: Iterable[str], stamp: dict,
                          state_shape: StateShape) -> None:
    """Raise ValueError unless state_dict is one saved by a Muon with these param `groups` (kinds and
    sizes), every key of `hyperparameters` in each group, the distribution `stamp` (rank and world size)
    and, per parameter p it holds state for, muon_state_layout on state_shape(p)."""
    where = "Muon.load_state_dict"
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"{where}: expected a state dict with 'state' and 'param_groups', got {got}")
    saved = state_dict["param_groups"]
    expected = [(g["kind"], len(g["params"])) for g in groups]
    for i, group in enumerate(saved):
        if "kind" not in group:
            raise ValueError(
                f"{where}: saved param group {i} has no 'kind', so this is not an optim.Muon state dict "
                f"(torch.optim.Muon and AdamW save none); expected groups (kind, parameters) {expected}")
    got = [(g["kind"], len(g["params"])) for g in saved]
    if got != expected:
        raise ValueError(f"{where}: saved groups (kind, parameters) {got}, but this optimizer has {expected}")
    for i, group in enumerate(saved):
        missing = sorted(set(hyperparameters) - set(group))
        if missing:
            raise ValueError(f"{where}: saved param group {i} lacks {missing}: it was saved by another "
                             "version of optim.Muon; start the optimizer afresh")
    # One process also takes a state dict without a stamp: torch.distributed.checkpoint's
    # get/set_optimizer_state_dict keep only "state" and "param_groups".
    saved_stamp = state_dict.get("distribution", stamp if stamp.get("world_size") == 1 else None)
    if saved_stamp != stamp:
        raise ValueError(
            f"{where}: state saved as {_describe(saved_stamp)}, but this optimizer is {_describe(stamp)}; "
            "each rank loads the state it saved itself, with the same number of ranks")
    _check_entries(state_dict["state"], saved, groups, state_shape)


def _check_entries(state: dict, saved: list[dict], groups: list[dict], state_shape: StateShape) -> None:
    state, pending = without_pending_gradients(state)
    for saved_group, group in zip(saved, groups, strict=True):
        names = group.get("param_names") or [None] * len(group["params"])
        for i, p, name in zip(saved_group["params"], group["params"], names, strict=True):
            label = f"parameter {name or i} of shape {tuple(p.shape)}"
            if i in pending:
                _check_pending(pending[i], p, label, saved_group)
            if i not in state:
                continue
            shape = state_shape(p)
            if shape is None:
                raise ValueError(f"Muon.load_state_dict: the state dict holds state for {label}, which this "
                                 "rank does not own: it is another rank's state")
            layout = muon_state_layout(p, group["kind"], shape, group)
            got = {key: (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value
                   for key, value in state[i].items()}
            if got != layout:
                raise ValueError(f"Muon.load_state_dict: state of {label} is {got}; this optimizer keeps "
                                 f"{layout} (kind {group['kind']!r})")


def _check_pending(grad, p: torch.Tensor, label: str, saved_group: dict) -> None:
    """A pending gradient is p.grad as it was: p's shape and dtype, in a group saved resting."""
    if not saved_group.get("pending_steps"):
        raise ValueError(f"Muon.load_state_dict: the state dict holds a pending gradient for {label}, whose "
                         "group was saved with pending_steps 0 (not resting); it was not saved by optim.Muon")
    got = (tuple(grad.shape), grad.dtype) if isinstance(grad, torch.Tensor) else type(grad).__name__
    if got != (tuple(p.shape), p.dtype):
        raise ValueError(f"Muon.load_state_dict: the pending gradient of {label} is {got}; expected its "
                         f"p.grad's {(tuple(p.shape), p.dtype)}")


def _describe(stamp) -> str:
    if not isinstance(stamp, dict):
        return "an unknown rank (no 'distribution' entry: not saved by this optim.Muon)"
    return f"rank {stamp.get('rank')} of {stamp.get('world_size')}"
