"""Route a model's parameters to Muon's kinds by the layer each belongs to."""

from collections.abc import Iterable

from torch import nn

from .muon import KINDS

_HEAD_KINDS = {"adam": "adam", "linear": "head_linear", "sign": "head_sign"}
_EMBED_KINDS = {"dual": "embed", "adam": "adam"}


def param_groups(
    model: nn.Module,
    *,
    embed: str = "dual",
    head: str = "adam",
    head_names: Iterable[str] = ("lm_head",),
    overrides: dict[str, str] | None = None,
    lrs: dict[str, float] | None = None,
) -> list[dict]:
    """Muon param groups for any model, one per kind present, in the order of KINDS.

    By layer (subclasses count as their base class):
      - the weight of a module named in head_names (its full name, or its last component) → the
        head map: head="adam" (practice: Muon, the speedrun), "linear" (the paper: a Linear) or
        "sign" (Scion);
      - nn.Embedding weights → "embed" (embed="dual") or "adam" (embed="adam");
      - nn.Conv2d weights → "conv";  other nn.Linear weights → "hidden";
      - everything else (biases, norm gains, scalars, parameters held directly by a module) → "adam".
    overrides maps a parameter name (as in named_parameters) to its kind and wins over the rules,
    e.g. for matrices a model keeps as bare nn.Parameters. lrs maps a kind to its group's lr;
    kinds not in lrs use Muon's lr. Parameters are passed as (name, tensor) pairs, so the
    optimizer's state_dict records their names.
    """
    if embed not in _EMBED_KINDS:
        raise ValueError(f"param_groups: embed={embed!r}; use one of {tuple(_EMBED_KINDS)}")
    if head not in _HEAD_KINDS:
        raise ValueError(f"param_groups: head={head!r}; use one of {tuple(_HEAD_KINDS)}")
    overrides, lrs = overrides or {}, lrs or {}
    named = dict(model.named_parameters())
    _check_known(overrides, named, "overrides: no parameter named", "see model.named_parameters()")
    _check_known(overrides.values(), KINDS, "overrides: unknown kind", f"use one of {KINDS}")
    _check_known(lrs, KINDS, "lrs: unknown kind", f"use one of {KINDS}")

    kinds = {}
    for module_name, module in model.named_modules():
        is_head = any(module_name == h or module_name.endswith("." + h) for h in head_names)
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            kind = _kind(module, param_name, is_head, _HEAD_KINDS[head], _EMBED_KINDS[embed])
            kinds.setdefault(name, kind)  # a shared parameter keeps its first name, as named_parameters does
    kinds.update(overrides)

    groups = []
    for kind in KINDS:
        params = [(name, p) for name, p in named.items() if kinds[name] == kind]
        if params:
            groups.append({"params": params, "kind": kind} | ({"lr": lrs[kind]} if kind in lrs else {}))
    return groups


def _kind(module: nn.Module, param_name: str, is_head: bool, head_kind: str, embed_kind: str) -> str:
    if param_name != "weight":
        return "adam"
    if is_head:
        return head_kind
    if isinstance(module, nn.Embedding):
        return embed_kind
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "hidden"
    return "adam"


def _check_known(given: Iterable[str], known: Iterable[str], problem: str, hint: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"param_groups {problem} {unknown}; {hint}")
