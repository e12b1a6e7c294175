"""Step parity: a record's own training script beside this repo's preset for it, on CPU.

    python -m tools.parity --reference RECORD_LOG_OR_PY [--steps 0-19 --steps 1000,1500]
                           [--check-steps 1,1500] [--width 256] [--seq-len 2048] [--data DIR]

The reference (a record's log, whose source precedes its first line of '=' characters, or that source
as a .py) is loaded by tools/parity_record.py: definitions only, with the CPU substitutions listed
there, by the adapter of its format. This module runs the 2025-07-12 format; a record #46 (2025-11-29)
reference is run by tools/parity46.py, with its own defaults and flags (--batch-divisor,
--reference-only). Ours is that record's preset (PRESET: the 2025-07-12 record's
`--preset speedrun-2025-07-12`), built by training/recipe.py (parse_config, build_optimizer) and its
training/schedule.py Schedule, at the same width (heads of 128) and the record's 12 layers, with the
embedding tables in bf16 as on CUDA (GPT.cast_embeddings).

Both start from identical weights: ours are initialized (--seed) and copied into the reference
through the adapter's explicit name table; a parameter the table does not cover, either side, or a
shape that differs, stops the run naming it. Both are fed the same BOS-aligned --seq-len batches
(data/loader.py, --data or the demo corpus) and stepped at the --steps schedule steps of a
1750-step run, so lr, momentum and window are the schedule's at those steps. Steps that continue
the previous one train on; the first step of each run of consecutive steps starts every model from
ours' current weights with fresh optimizer state (steps 1000 and 1500 cannot be trained to on a CPU:
they get the schedule's lr, momentum and window, from the weights reached so far).

Units. The reference's training loss is a sum over the sequence, ours a mean: losses are printed
per token, and ours uses the preset's rule for Adam's and Newton–Schulz's ε, the record's 1e-10 and
1e-7 divided by the tokens its loss sums over (49,152 in the preset, --seq-len here), so both sides
see the same ε relative to their gradients.

Printed per step: both losses and their difference; per kind (hidden matrices, embeddings, value
embeddings, head, scalars) the update difference ‖u_ref − u_ours‖/‖u_ref‖, u the change a step made
to the weights, mapped to our names. The noise floor comes from the same run: a second copy of the
reference, identical but for SDPA's math kernel in place of its default one (a reordering of the
same sums at rounding level), trained beside it; its loss difference from the reference, and its
update difference, are the floor.

One-optimizer-step check (--check-steps): from a common state (ours' weights, fresh optimizer
state) and identical gradients (ours', times the tokens the reference's loss sums over), one step
of each optimizer with both Newton–Schulz in float32, compared per kind. Its floor for the hidden
matrices is the reference's own step with float32 against float64 Newton–Schulz.

Exit status 1 when the largest loss difference exceeds --loss-factor times the largest floor plus
--loss-tol, or a kind's one-step difference exceeds max(its floor, --step-tol KIND=REL); 0 otherwise.
The factor (2 by default) is there because ours and the twin are two samples of rounding-driven
divergence, whose largest values over a run differ by chance (docs/RECIPE.md, "The loss rule").
"""

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

from data.loader import TokenLoader
from model import GPT
from optim import Muon
from tools import parity46
from tools.parity_ours46 import model_and_optimizer, set_ns_dtype
from tools.parity_record import load_reference, recognise
from tools.parity_record46 import Record20251129
from tools.parity_source import record_session, sdpa_choice
from tools.parity_table import (
    KINDS,
    Entry,
    Reference,
    change,
    check_unread,
    copy_weights,
    kind_of,
    kinds_in,
    loss_failure,
    our_weights,
    reference_tensor,
    reference_weights,
    relative_differences,
    segments,
    shards,
)
from training.recipe import PRESETS_TRAIN, parse_config, schedule_of
from training.schedule import Schedule

# Our preset for the 2025-07-12 record, the record this adapter compares.
PRESET = "speedrun-2025-07-12"

MAX_STEP = 2160  # the longest schedule of a known format: record #46's 2160 steps (2025-07-12: 1750)
DEFAULT_STEPS = [*range(20), 1000, 1500]
# Default one-step tolerances (relative update difference), measured against the 2025-07-12 record in
# docs/RECIPE.md ("Step parity"): with the preset's ns_eps, ns_rounding and adam_eps_form the hidden,
# head and scalar updates are bit-identical (0), so hidden is held to its own float32-vs-float64
# Newton–Schulz floor and head and scalars to float32 rounding; the embeddings keep the one named
# difference left, the record's bf16 Adam moments (measured 0.9% and 2.5%).
STEP_TOLERANCES = {"hidden": 0.0, "embed": 0.05, "value_embed": 0.05, "head": 1e-6, "scalar": 1e-6}
# The loss check: ours' largest |ours - record| at most LOSS_FACTOR x the floor's largest |twin - record|.
# Both are samples of rounding-driven divergence, so their largest values over a run differ by chance:
# against one twin ours' was 0.63 to 2.00 times the twin's over eleven runs (docs/RECIPE.md, "The loss
# rule"), and a factor of 2 fails by chance in a few percent of runs. Record #46's floor is therefore the
# largest of three twins (tools/parity46.py TWINS); this format's run has one twin and measured 0.63.
LOSS_FACTOR = 2.0


# ---- ours ---------------------------------------------------------------------------------------------


@dataclass
class Ours:
    model: GPT
    optimizer: Muon
    schedule: Schedule


def build_ours(width: int, seq_len: int, seed: int) -> Ours:
    """The record's preset (PRESET) at `width` (heads of 128) and one `seq_len` sequence a step, as on CUDA:
    bf16 embedding tables, Newton–Schulz in bf16; Adam's and Newton–Schulz's ε the record's 1e-10 and
    1e-7 over seq_len tokens."""
    preset = PRESETS_TRAIN[PRESET]
    per_token = {name: preset[name] * preset["seq_len"] / seq_len for name in ("adam_eps", "ns_eps")}
    cfg = parse_config(["--preset", PRESET, "--seq-len", str(seq_len), "--tokens-per-step", str(seq_len),
                        *(f"--{name.replace('_', '-')}={value!r}" for name, value in per_token.items())])
    return Ours(*model_and_optimizer(cfg, width, seq_len, seed), schedule_of(cfg))


def our_loss(ours: Ours, inputs: Tensor, targets: Tensor, step: int) -> Tensor:
    """Mean cross-entropy at the schedule's window for `step`."""
    window = torch.tensor(ours.schedule.at(step).window, dtype=torch.int32)
    return ours.model(inputs, targets, window=window)


def step_ours(ours: Ours, step: int) -> None:
    ours.schedule.apply(ours.optimizer, step)
    ours.optimizer.step()
    ours.optimizer.zero_grad(set_to_none=True)


# ---- a side of the comparison: the reference, possibly under another attention kernel --------------------


@dataclass
class Side:
    ref: Reference
    backend: list[SDPBackend] | None  # None: SDPA's default choice

    def kernel(self):
        return sdpa_choice(self.backend)

    def train_step(self, table: list[Entry], inputs: Tensor, targets: Tensor,
                   step: int) -> tuple[float, dict]:
        """One training step at schedule step `step`: (loss per token, the weights' change by our names)."""
        before = reference_weights(table, self.ref)
        with self.kernel():
            total = self.ref.loss(inputs, targets, self.ref.window(step))
            total.backward()
        check_unread(table, self.ref)
        self.ref.schedule(step)
        self.ref.step()
        return total.item() / targets.numel(), change(reference_weights(table, self.ref), before)


def fresh_state(*optimizers) -> None:
    for opt in optimizers:
        opt.state.clear()


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class StepRow:
    step: int
    window: int
    loss_ref: float
    loss_ours: float
    loss_floor: float  # the reference under the math kernel
    update: dict[str, float]
    update_floor: dict[str, float]

    @property
    def loss_diff(self) -> float:
        return self.loss_ours - self.loss_ref

    @property
    def floor_diff(self) -> float:
        return self.loss_floor - self.loss_ref


@dataclass
class CheckRow:
    step: int
    update: dict[str, float]
    floor: dict[str, float]


@dataclass
class Report:
    substitutions: dict[str, int]
    steps: list[StepRow] = field(default_factory=list)
    checks: list[CheckRow] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class Parity:
    """Ours, the reference and its noise-floor twin, from identical weights, fed identical batches."""

    def __init__(self, reference: str | Path, width: int, seq_len: int, data: list[Path], seed: int,
                 floor: bool = True):
        self.ours = build_ours(width, seq_len, seed)
        ref, self.substitutions = load_reference(reference, width, seq_len=seq_len)
        self.table = ref.table(self.ours.model)
        self.kinds = kind_of(self.table)
        self.sides = [Side(ref, None)]
        if floor:
            self.sides.append(Side(load_reference(reference, width, seq_len=seq_len)[0], [SDPBackend.MATH]))
        self.loader = TokenLoader(data, 1, seq_len, align_to_bos=True)

    def start_segment(self) -> None:
        """Every model at ours' current weights, every optimizer with fresh state."""
        for side in self.sides:
            copy_weights(self.table, self.ours.model, side.ref)
            fresh_state(*side.ref.optimizers)
            side.ref.model.zero_grad(set_to_none=True)
        fresh_state(self.ours.optimizer)

    def train_step(self, step: int) -> StepRow:
        inputs, targets = self.loader.next_batch()
        before = our_weights(self.ours.model)
        loss = our_loss(self.ours, inputs, targets, step)
        loss.backward()
        step_ours(self.ours, step)
        ours_update = change(our_weights(self.ours.model), before)
        (loss_ref, ref_update), *twin = (side.train_step(self.table, inputs, targets, step)
                                          for side in self.sides)
        loss_floor, floor_update = twin[0] if twin else (loss_ref, ref_update)  # --no-floor: floor 0
        return StepRow(step, self.ours.schedule.at(step).window, loss_ref, loss.item(), loss_floor,
                       relative_differences(self.kinds, ref_update, ours_update),
                       relative_differences(self.kinds, ref_update, floor_update))

    def check_step(self, step: int) -> CheckRow:
        """One optimizer step of each from a common state and identical gradients, Newton–Schulz in
        float32 (module docstring); the floor: the reference's own float32 against float64 step."""
        self.start_segment()
        inputs, targets = self.loader.next_batch()
        our_loss(self.ours, inputs, targets, step).backward()
        grads = {name: p.grad.clone() for name, p in self.ours.model.named_parameters()}
        ref = self.sides[0].ref
        updates = {}
        for dtype in (torch.float32, torch.float64):
            updates[dtype] = self.reference_step(ref, grads, targets.numel(), step, dtype)
        set_ns_dtype(self.ours.optimizer, torch.float32)
        before = our_weights(self.ours.model)
        step_ours(self.ours, step)
        set_ns_dtype(self.ours.optimizer, torch.bfloat16)
        ours_update = change(our_weights(self.ours.model), before)
        self.start_segment()
        return CheckRow(step, relative_differences(self.kinds, updates[torch.float32], ours_update),
                        relative_differences(self.kinds, updates[torch.float32], updates[torch.float64]))

    def reference_step(self, ref: Reference, grads: dict[str, Tensor], tokens: int, step: int,
                       ns_dtype: torch.dtype) -> dict[str, Tensor]:
        """The reference's optimizer step from ours' weights and fresh state, its gradients ours times
        `tokens` (its loss is a sum), Newton–Schulz in ns_dtype; the weights' change by our names."""
        copy_weights(self.table, self.ours.model, ref)
        fresh_state(*ref.optimizers)
        params = dict(ref.model.named_parameters())
        for p in params.values():
            p.grad = torch.zeros_like(p)
        with torch.no_grad():
            for entry in self.table:
                if entry.ours is not None:
                    reference_tensor(ref, entry, grad=True).copy_(grads[entry.ours].float() * tokens)
        ref.set_ns_dtype(ns_dtype)
        ref.schedule(step)
        before = reference_weights(self.table, ref)
        ref.step()
        ref.set_ns_dtype(torch.bfloat16)
        return change(reference_weights(self.table, ref), before)


def run(args: argparse.Namespace, out=None) -> Report:
    """The comparison, printed as it goes (to `out`, default stdout); the report carries every figure and
    the failed checks."""
    out = out or sys.stdout
    adapter, _ = recognise(args.reference)
    if adapter is Record20251129:
        return parity46.run(args, out)
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    args.check_steps = [1, 1500] if args.check_steps is None else args.check_steps
    if max([0, *args.steps, *args.check_steps]) > 1750:
        raise SystemExit(f"error: --steps, --check-steps: the 2025-07-12 schedule has steps 0..1750, got "
                         f"{max(args.steps + args.check_steps)}")
    with record_session(args.threads):
        parity = Parity(args.reference, args.width, args.seq_len, shards(args.data), args.seed, args.floor)
        report = Report(parity.substitutions)
        print(header(args, parity), file=out)
        for segment in segments(args.steps):
            parity.start_segment()
            for step in segment:
                report.steps.append(parity.train_step(step))
                print(format_step(report.steps[-1]), file=out)
        for step in args.check_steps:
            report.checks.append(parity.check_step(step))
            print(format_check(report.checks[-1]), file=out)
    report.failures = verdicts(report, args.loss_factor, args.loss_tol, {**STEP_TOLERANCES, **args.step_tol})
    for line in report.failures or ["PASS: every difference within its tolerance"]:
        print(line, file=out)
    return report


def verdicts(report: Report, loss_factor: float, loss_tol: float, step_tol: dict[str, float]) -> list[str]:
    """The failed checks, one line each (module docstring)."""
    loss = loss_failure([(r.step, r.loss_diff, r.floor_diff) for r in report.steps], loss_factor, loss_tol)
    failures = [f"FAIL: {loss}"] if loss else []
    for row in report.checks:
        for kind, update in row.update.items():
            allowed = max(row.floor[kind], step_tol[kind])
            if update > allowed:
                failures.append(f"FAIL: one-step {kind} update difference {update:.2e} at step "
                                f"{row.step} exceeds max(floor {row.floor[kind]:.1e}, --step-tol "
                                f"{kind}={step_tol[kind]:g})")
    return failures


# ---- printing -------------------------------------------------------------------------------------------


def header(args: argparse.Namespace, parity: Parity) -> str:
    made = ", ".join(f"{what} x{n}" for what, n in parity.substitutions.items()) or "none needed"
    names = " ".join(f"{k:>17}" for k in kinds_in(parity.kinds))
    return (f"reference {args.reference} ({type(parity.sides[0].ref).__name__}); CPU substitutions: {made}\n"
            f"width {args.width}, 12 layers, {args.seq_len}-token BOS-aligned batches; loss per token; "
            f"update: |u_ref - u_ours|/|u_ref| (floor: reference under SDPA's math kernel)\n"
            f"{'step':>5} {'window':>6} {'loss ref':>9} {'loss ours':>9} {'diff':>9} {'floor':>9} {names}")


def format_step(row: StepRow) -> str:
    updates = " ".join(f"{row.update[k]:8.1e}/{row.update_floor[k]:8.1e}" for k in row.update)
    return (f"{row.step:5d} {row.window:6d} {row.loss_ref:9.5f} {row.loss_ours:9.5f} {row.loss_diff:+9.1e} "
            f"{row.floor_diff:+9.1e} {updates}")


def format_check(row: CheckRow) -> str:
    parts = ", ".join(f"{k} {row.update[k]:.1e}" + (f" (floor {row.floor[k]:.1e})" if k == "hidden" else "")
                      for k in row.update)
    return (f"one optimizer step at step {row.step} (common state and gradients, Newton-Schulz float32):\n"
            f"  {parts}")


# ---- flags ------------------------------------------------------------------------------------------------


def step_list(text: str) -> list[int]:
    """'0-19' or '1000,1500' (or both, comma-separated) -> the steps; 'none' -> no step."""
    if text == "none":
        return []
    steps = []
    for part in text.split(","):
        found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not found:
            raise argparse.ArgumentTypeError(f"expected steps like 0-19 or 1000,1500; got {text!r}")
        low, high = int(found.group(1)), int(found.group(2) or found.group(1))
        steps.extend(range(low, high + 1))
    if any(s > MAX_STEP for s in steps):
        raise argparse.ArgumentTypeError(f"steps must lie in a record's schedule, 0..{MAX_STEP}; "
                                         f"got {text!r}")
    return steps


def tolerance(text: str) -> tuple[str, float]:
    kind, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if kind not in KINDS or not number >= 0:
        raise argparse.ArgumentTypeError(f"expected KIND=REL with KIND one of {', '.join(KINDS)} and "
                                         f"REL >= 0; "
                                         f"got {text!r}")
    return kind, number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.parity", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--reference", required=True, help="a record's log (its source is read up to the "
                        "first line of '=') or that source as a .py")
    parser.add_argument("--steps", type=step_list, action="append",
                        help="schedule steps to train, e.g. 0-19 or 1000,1500, or none; repeatable "
                             "[default: 0-19 and 1000,1500; record #46: 0-19, 706-709, 1800-1801]")
    parser.add_argument("--check-steps", type=step_list,
                        help="schedule steps of the one-optimizer-step check, or none [default: 1,1500; "
                             "record #46: 1801]")
    parser.add_argument("--width", type=int, default=256, help="residual width, a multiple of 128 [256]")
    parser.add_argument("--seq-len", type=int, default=2048,
                        help="tokens per batch, a multiple of 128 [2048]")
    parser.add_argument("--data", help="folder of *_train_*.bin shards [the demo corpus]")
    parser.add_argument("--seed", type=int, default=0, help="seed of our weight init [0]")
    parser.add_argument("--loss-factor", type=float, default=LOSS_FACTOR,
                        help=f"the largest loss difference allowed, in multiples of the noise floor's "
                             f"largest [{LOSS_FACTOR:g}]")
    parser.add_argument("--loss-tol", type=float, default=0.0,
                        help="loss difference allowed beyond --loss-factor x the noise floor [0]")
    parser.add_argument("--step-tol", type=tolerance, action="append", default=[],
                        help="KIND=REL: one-step relative update difference allowed for KIND "
                             f"[2025-07-12: {' '.join(f'{k}={v:g}' for k, v in STEP_TOLERANCES.items())}; "
                             f"record #46: "
                             f"{' '.join(f'{k}={v:g}' for k, v in parity46.STEP_TOLERANCES_46.items())}]")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="train the reference's noise-floor twin (--no-floor: a third less work; "
                             "the floor is then 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batch-divisor", type=int, default=1,
                        help="record #46: its batch sizes over this (a smaller step for the CPU) [1]")
    parser.add_argument("--reference-only", action="store_true",
                        help="record #46: run the record and its noise-floor twin without our side")
    parser.add_argument("--record-float32", action="store_true",
                        help="record #46, a diagnostic: its bf16 head and gate weights and DistAdam moments "
                             "kept in float32 (no longer the record: tells their share apart)")
    args = parser.parse_args(argv)
    args.steps = None if args.steps is None else sorted({s for part in args.steps for s in part})
    args.step_tol = dict(args.step_tol)  # each format's defaults under these
    if args.loss_factor <= 0:
        parser.error(f"--loss-factor must be positive, got {args.loss_factor:g}")
    for flag, value in (("--width", args.width), ("--seq-len", args.seq_len)):
        if value < 128 or value % 128:
            parser.error(f"{flag} must be a positive multiple of 128, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    return 1 if run(parse_args(argv)).failures else 0


if __name__ == "__main__":
    sys.exit(main())
