"""What every tools.parity run shares, whatever the record's format: the name table (which tensor of a
record's model is which parameter of ours), what every adapter provides (`Reference`), the weights and
updates of both sides in our names, the runs of consecutive steps, the loss rule, and the training
shards."""

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from data.shards import ShardError, list_shards

# How the differences are reported, in this order: the hidden matrices, the gates (record #46's smear and
# attention gates: Muon-stepped, stored in bf16), the embeddings, value embeddings, head and scalars. A
# format's report has the kinds its name table uses (`kinds_in`): the 2025-07-12 record has no gates.
KINDS = ("hidden", "gate", "embed", "value_embed", "head", "scalar")


@dataclass(frozen=True)
class Entry:
    """Reference parameter `reference` (its elements `part`, a slice of dim 0, or all) is our `ours`;
    `ours` None: the reference's forward never reads those elements (checked: zero gradient).
    layout: how those elements read as our tensor: None as they are, "T" transposed (the record
    stores our (out, in) matrix as (in, out)), or a shape to view them in."""

    reference: str
    part: slice | None
    ours: str | None
    kind: str  # one of KINDS: how the differences are reported
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


# ---- the two sides in our names ---------------------------------------------------------------------


def reference_tensor(ref: Reference, entry: Entry, grad: bool = False) -> Tensor | None:
    """The reference's tensor (or its gradient) behind a table entry."""
    param = dict(ref.model.named_parameters())[entry.reference]
    tensor = param.grad if grad else param
    return None if tensor is None else entry.view(tensor)


@torch.no_grad()
def copy_weights(table: list[Entry], ours: nn.Module, ref: Reference) -> None:
    """Our weights into the reference, entry by entry (its unread elements are left as they are)."""
    params = dict(ours.named_parameters())
    for entry in table:
        if entry.ours is not None:
            reference_tensor(ref, entry).copy_(params[entry.ours])


@torch.no_grad()
def reference_weights(table: list[Entry], ref: Reference) -> dict[str, Tensor]:
    """The reference's weights under our names, as float32 copies."""
    return {e.ours: reference_tensor(ref, e).float().clone() for e in table if e.ours is not None}


@torch.no_grad()
def our_weights(ours: nn.Module) -> dict[str, Tensor]:
    return {name: p.float().clone() for name, p in ours.named_parameters()}


def check_unread(table: list[Entry], ref: Reference) -> None:
    """The elements the table calls unread must get no gradient from the reference's loss."""
    for entry in table:
        grad = reference_tensor(ref, entry, grad=True) if entry.ours is None else None
        if grad is not None and grad.any():
            raise SystemExit(f"error: tools.parity: the name table calls {describe(entry)} unread, but the "
                             f"reference's loss has a gradient there; map it to one of our parameters")


def kind_of(table: list[Entry]) -> dict[str, str]:
    return {e.ours: e.kind for e in table if e.ours is not None}


def kinds_in(kinds: dict[str, str]) -> tuple[str, ...]:
    """The kinds that `kinds` (parameter -> kind) uses, in KINDS order: the columns of its report."""
    used = set(kinds.values())
    return tuple(k for k in KINDS if k in used)


def relative_differences(kinds: dict[str, str], a: dict[str, Tensor],
                         b: dict[str, Tensor]) -> dict[str, float]:
    """Per kind of kinds_in(kinds), ‖a − b‖/‖a‖ over all of that kind's tensors together (0/0 counts
    as 0)."""
    columns = kinds_in(kinds)
    num, den = dict.fromkeys(columns, 0.0), dict.fromkeys(columns, 0.0)
    for name, kind in kinds.items():
        num[kind] += torch.linalg.vector_norm(a[name] - b[name]).item() ** 2
        den[kind] += torch.linalg.vector_norm(a[name]).item() ** 2
    return {k: math.sqrt(num[k] / den[k]) if den[k] else math.sqrt(num[k]) for k in columns}


def loss_failure(steps: list[tuple[int, float, float]], loss_factor: float, loss_tol: float) -> str | None:
    """The loss rule (docs/RECIPE.md "The loss rule"), over (step, ours - record, floor) per step: ours'
    largest |ours - record| at most loss_factor x the floor's largest |twin - record| + loss_tol. None
    where it holds (or no step ran), else the failure in one line."""
    if not steps:
        return None
    step, worst, _ = max(steps, key=lambda s: abs(s[1]))
    floor = max(abs(f) for _, _, f in steps)
    if abs(worst) <= loss_factor * floor + loss_tol:
        return None
    return (f"loss difference {worst:+.1e} (ours - record) at step {step} exceeds --loss-factor "
            f"{loss_factor:g} x the floor {floor:.1e} + --loss-tol {loss_tol:g}")


def change(after: dict[str, Tensor], before: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: after[name] - before[name] for name in after}


# ---- runs of steps and the data -------------------------------------------------------------------


def segments(steps: list[int]) -> Iterator[list[int]]:
    """Runs of consecutive steps: [0, 1, 2, 1000, 1500] -> [0, 1, 2], [1000], [1500]."""
    run: list[int] = []
    for step in steps:
        if run and step != run[-1] + 1:
            yield run
            run = []
        run.append(step)
    if run:
        yield run


def shards(data: str | None) -> list[Path]:
    """The training shards of --data, or of the demo corpus (built on first use)."""
    if data is None:
        from data.demo import demo_shards

        data = demo_shards()
    try:
        return list_shards(data, "train")
    except ShardError as error:
        raise SystemExit(f"error: --data: {error}") from None
