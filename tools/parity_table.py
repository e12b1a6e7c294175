"""The name table of tools.parity: which tensor of a record's model is which parameter of ours, and what
every record-format adapter provides (`Reference`)."""

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Entry:
    """Reference parameter `reference` (its elements `part`, a slice of dim 0, or all) is our `ours`;
    `ours` None: the reference's forward never reads those elements (checked: zero gradient).
    layout: how those elements read as our tensor: None as they are, "T" transposed (the record
    stores our (out, in) matrix as (in, out)), or a shape to view them in."""

    reference: str
    part: slice | None
    ours: str | None
    kind: str  # hidden, embed, value_embed, head, scalar: how the differences are reported
    layout: str | tuple[int, ...] | None = None

    def view(self, tensor: Tensor) -> Tensor:
        """The elements of the reference's `tensor` (the parameter or its gradient) in our layout: a view,
        so copying into it writes the reference's tensor."""
        tensor = tensor if self.part is None else tensor[self.part]
        if self.layout == "T":
            return tensor.mT
        return tensor if self.layout is None else tensor.view(self.layout)


class NameTableError(SystemExit):
    """A parameter the name table does not cover, or covers with the wrong shape: a one-line exit."""


Rule = tuple  # (reference pattern, our pattern, kind[, layout]); `{i}` matches a block or table index


def resolve_table(rules: list[Rule], extra: list[Entry], reference: nn.Module,
                  ours: nn.Module) -> list[Entry]:
    """The entries for every reference parameter: `extra` (slices), then one rule match per name.

    Fails (NameTableError, naming the parameter) on a reference parameter no rule or entry covers,
    on an element covered twice, on our parameter left uncovered or named twice, and on a shape
    mismatch.
    """
    ref_params, our_params = dict(reference.named_parameters()), dict(ours.named_parameters())
    entries = list(extra)
    sliced = {e.reference for e in extra}
    for name in ref_params:
        if name not in sliced:
            entries.append(rule_entry(name, rules, ref_params[name]))
    check_table(entries, ref_params, our_params)
    return entries


def rule_entry(name: str, rules: list[Rule], param: Tensor) -> Entry:
    """The entry of the first rule whose pattern matches `name` ({i}: an index), else NameTableError."""
    for pattern, target, kind, *layout in rules:
        found = re.fullmatch(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)"), name)
        if found:
            ours = target.replace("{i}", found.group(1)) if found.groups() else target
            return Entry(name, None, ours, kind, *layout)
    raise NameTableError(f"error: tools.parity: reference parameter {name} {tuple(param.shape)} is not in "
                         f"the name table")


def check_table(entries: list[Entry], ref_params: dict, our_params: dict) -> None:
    """Every reference element covered once, every our parameter once, shapes equal (else NameTableError)."""
    covered = {name: torch.zeros(p.shape[:1] if p.ndim else (), dtype=torch.int64)
               for name, p in ref_params.items()}
    used: dict[str, str] = {}
    for e in entries:
        if e.reference not in ref_params:
            raise NameTableError(f"error: tools.parity: the name table names reference parameter "
                                 f"{e.reference}, which the reference does not have")
        counts = covered[e.reference] if e.part is None else covered[e.reference][e.part]
        counts += 1
        if e.ours is None:
            continue
        if e.ours not in our_params:
            raise NameTableError(f"error: tools.parity: the name table maps {describe(e)} to {e.ours}, "
                                 f"which our model does not have")
        if e.ours in used:
            raise NameTableError(f"error: tools.parity: our parameter {e.ours} is mapped twice "
                                 f"({used[e.ours]} and {describe(e)})")
        used[e.ours] = describe(e)
        view = e.view(ref_params[e.reference].detach())
        if view.shape != our_params[e.ours].shape:
            raise NameTableError(f"error: tools.parity: reference {describe(e)} {tuple(view.shape)} and our "
                                 f"{e.ours} {tuple(our_params[e.ours].shape)} differ in shape")
    for name, counts in covered.items():
        if (counts != 1).any():
            how = "not" if (counts == 0).any() else "doubly"
            raise NameTableError(f"error: tools.parity: reference parameter {name} "
                                 f"{tuple(ref_params[name].shape)} is {how} covered by the name table")
    missing = sorted(set(our_params) - set(used))
    if missing:
        raise NameTableError(f"error: tools.parity: our parameter {missing[0]} "
                             f"{tuple(our_params[missing[0]].shape)} has no reference counterpart in the "
                             f"name table")


def describe(e: Entry) -> str:
    name = e.reference if e.part is None else f"{e.reference}[{e.part.start}:{e.part.stop}]"
    return name if e.layout is None else f"{name} as {e.layout}"


class Reference:
    """What tools.parity needs of a reference, whatever its format (one subclass per format).

    model: its nn.Module; optimizers: its optimizers. Methods: table(ours) its name table to our
    model (list[Entry]); schedule(step) sets lr and momentum as its main body does; window(step) the
    attention window its forward takes; loss(inputs, targets, window) its training loss, summed over
    the (1, T) batch's tokens; step() steps its optimizers and clears the gradients;
    set_ns_dtype(dtype) the precision of its Newton–Schulz. `stand_ins` (tools/parity_source.py): what
    its loading substitutes for the CPU.
    """

    name = ""
    defines: frozenset[str] = frozenset()  # top-level names its script defines: how it is recognised
