"""Route a model's parameters to Muon param groups by the role each plays in the model."""

from collections.abc import Iterable

from torch import nn

from .kinds import KINDS

# A parameter's role, and the kinds each role may take (the first is the default for that role).
ROLES = {
    "hidden": ("hidden",),  # nn.Linear weights, but the head's; a linear_stack module's (k, d_out, d_in)
    "conv": ("conv",),  # nn.Conv2d weights
    "embed": ("embed", "adam"),  # nn.Embedding weights: token and value embeddings
    "head": ("adam", "head_linear", "head_sign"),  # the weight of a module named in head_names
    "scalar": ("adam",),  # biases, gains, scalars, and any parameter no rule above claims
}


def param_groups(
    model: nn.Module,
    *,
    embed: str = "embed",
    head: str = "adam",
    lrs: dict[str, float] | None = None,
    head_names: Iterable[str] = ("lm_head",),
    overrides: dict[str, str] | None = None,
) -> list[dict]:
    """Muon param groups, one per role present, in the order of ROLES, each with its kind and lr.

    Roles, by layer (subclasses count as their base class): "hidden" (nn.Linear weights, and the
    weight of a module with `linear_stack = True`: k Linear weights (k, d_out, d_in) in one tensor,
    which the hidden kind maps as k matrices, e.g. model.gpt.StackedLinear's merged q, k, v), "conv"
    (nn.Conv2d weights), "embed" (nn.Embedding weights), "head" (the weight of a module named in
    head_names: its full name or its last component), "scalar" (biases, norm gains, scalars,
    parameters a module holds directly). Kinds: hidden → "hidden", conv → "conv", scalar → "adam";
    embed → `embed`: "embed" (the embedding duality map) or "adam"; head → `head`: "adam" (Muon,
    the speedrun), "head_linear" (the paper: a Linear) or "head_sign" (Scion).

    lrs maps a role to its group's lr; roles not in lrs use Muon's lr. overrides maps a parameter
    name (as in named_parameters) to its role and wins over the rules, e.g. for matrices a model
    keeps as bare nn.Parameters. Each group carries "role" and "kind"; parameters are passed as
    (name, tensor) pairs, so the optimizer's state_dict records their names. The speedrun's grouping:

        param_groups(model, embed="adam", head="adam",
                     lrs=dict(hidden=0.05, embed=0.6, head=0.22, scalar=0.04))
    """
    _check_choice("embed", embed, ROLES["embed"])
    _check_choice("head", head, ROLES["head"])
    overrides, lrs = overrides or {}, lrs or {}
    named = dict(model.named_parameters())
    _check_known(overrides, named, "overrides: no parameter named", "see model.named_parameters()")
    _check_known(overrides.values(), ROLES, "overrides: unknown role", f"use one of {tuple(ROLES)}")
    _check_known(lrs, ROLES, "lrs: unknown role", f"use one of {tuple(ROLES)}")

    roles = {}
    for module_name, module in model.named_modules():
        is_head = any(module_name == h or module_name.endswith("." + h) for h in head_names)
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            # A shared parameter keeps its first name, as named_parameters does.
            roles.setdefault(name, _role(module, param_name, is_head))
    roles.update(overrides)

    kinds = {"hidden": "hidden", "conv": "conv", "embed": embed, "head": head, "scalar": "adam"}
    groups = []
    for role, kind in kinds.items():
        params = [(name, p) for name, p in named.items() if roles[name] == role]
        for name, p in params:
            if not KINDS[kind].accepts(p):
                raise ValueError(f"param_groups: {name} of shape {tuple(p.shape)} can't have role {role!r} "
                                 f"(kind {kind!r} needs {KINDS[kind].dims()} dims); see overrides")
        if params:
            lr = {"lr": lrs[role]} if role in lrs else {}
            groups.append({"params": params, "role": role, "kind": kind} | lr)
    return groups


def _role(module: nn.Module, param_name: str, is_head: bool) -> str:
    if param_name != "weight":
        return "scalar"
    if is_head:
        return "head"
    if isinstance(module, nn.Embedding):
        return "embed"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear) or getattr(module, "linear_stack", False):
        return "hidden"
    return "scalar"


def _check_choice(role: str, kind: str, allowed: tuple[str, ...]) -> None:
    if kind not in allowed:
        raise ValueError(f"param_groups: {role}={kind!r}; use one of {allowed}")


def _check_known(given: Iterable[str], known: Iterable[str], problem: str, hint: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"param_groups {problem} {unknown}; {hint}")
