"""Step parity with record #46 (the 2025-11-29 format, tools/parity_record46.py): `python -m tools.parity
--reference RECORD_46_LOG` comes here.

    python -m tools.parity --reference RECORD_46_LOG --reference-only [--steps 0-19 --steps 706-709
        --steps 1800-1801] [--width 256] [--batch-divisor 16] [--data DIR]

The record is built at --width (heads of 128, its 12 layers) as its main body builds it and trained
at the --steps of its 2160-step schedule with its own get_lr, get_muon_momentum, get_ws (and YaRN at
each long-window change), get_bs (over --batch-divisor: a smaller step for the CPU, as a smaller
width), step_optimizers (NorMuon every step, DistAdam on odd steps on the gradients of the even and
the odd step), fed by its own data generator on --data (the demo corpus by default), 8 micro-batches
a step as on its 8 ranks. Each run of consecutive steps starts from the weights reached so far with
fresh optimizer state; start runs on even steps, as the record's Adam sums an even and an odd step.

The noise floor: three twins of the record (TWINS), each identical but for a reordering of the same
sums at rounding level, as the record's own runs reorder them: SDPA's math kernel in place of its
default; the 8 micro-batches' gradients summed in reverse order, as ranks reduce in another order;
both. Each is fed the same micro-batches from the same weights. One twin's largest loss difference
over a run is a sample that spreads by about ±30% (docs/RECIPE.md, "Three twins"); the largest of
three spreads less. Printed per step: the record's loss per token, summed in float32 (its forward in
eval mode, before the step) and as it trains (a bf16 sum, resolving 2^-8 of the loss); the twins'
float32 loss difference of the largest magnitude; per kind their largest update difference
‖u_ref − u_twin‖/‖u_ref‖.

One-optimizer-step floor (--check-steps): from the record's current weights, fresh optimizer state and
one step's gradients, its step with Polar Express in float32 against float64, per kind.

Our side is `--preset speedrun`, record #46's recipe (tools/parity_ours46.py). Before any training
its four schedules (lr, momentum, windows, batch size) are compared with the record's own functions at
every step 0..2160 and the result printed; without --reference-only a difference beyond rounding
stops the run, as does `missing_for_ours` (the preset's model against RECORD_46, its window rule of
W + 1 keys, the loader's max_doc_len). Ours is initialized (--seed) and each run of steps starts the
record and its twins from our current weights through the name table (every parameter of both covered
once, shapes equal), every optimizer fresh; ours takes the record's 8 micro-batches. Printed under each
step: our float32 loss, ours − record, and per kind ‖u_ref − u_ours‖/‖u_ref‖. With --check-steps,
beside the record's floor: one optimizer step of ours and of the record from our weights, fresh state
and our gradients of that step's micro-batches (through the name table; DistAdam's on an odd step sent
by its own `_sync_gradient`), Polar Express in float32 on both, per kind ‖u_ref − u_ours‖/‖u_ref‖,
and for each kind ours stores in bf16 the most bf16 steps an entry of ours' new weights lies from the
record's. The kinds (tools/parity_table.py KINDS): hidden (the float32 attention and MLP matrices), gate (the
smear and attention gates, bf16 as the record stores them), embed, value_embed, head, scalar.
Exit status 1 when the largest |ours − record| exceeds --loss-factor (2) times the twins' largest
|floor| plus --loss-tol, or a kind's one-step difference exceeds max(the record's floor, --step-tol
KIND=REL, STEP_TOLERANCES_46 by default), unless ours stores that kind in bf16 and each entry of its new
weights is the record's or one bf16 step from it (one rounding of the stored weight).
"""

import argparse
import contextlib
import inspect
import sys
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

from data.loader import TokenLoader
from model import GPT, PRESETS, GPTConfig
from model.attention import dense_mask
from tools.parity_ours46 import PRESET, build_ours46, our_config, schedule_report
from tools.parity_record import load_reference
from tools.parity_record46 import Record20251129
from tools.parity_source import record_session, sdpa_choice
from tools.parity_table import (
    Entry,
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
from training.recipe import PRESETS_TRAIN

DEFAULT_STEPS = [*range(20), *range(706, 710), 1800, 1801]
# Default one-step tolerances (relative update difference), measured in docs/RECIPE.md ("Step parity
# with record #46") at step 1801 from our gradients. With ours' storage float32 (before 7840bbf), ours and
# the record differed by the record's bf16 storage alone (its head and gate weights and every DistAdam
# moment in bf16): hidden matrices and gates together 6.5e-4, embed and value_embed 1.3e-2, head 1.7e-2,
# scalar 3.9e-3; with that storage in float32 (--record-float32) the record's step was ours to 3.2e-6
# (hidden and gates, under its float32-vs-float64 floor), 1.2e-4 (value_embed) and less. With the
# record's storage and Adam arithmetic in the preset (a7a6bb8): every Adam kind 0, hidden and gates
# together 2.4e-4; apart (f6653f1) hidden 3.4e-6 against the floor 3.1e-5, the gates 8.1e-3, their bf16
# NorMuon in another op order; with the record's NorMuon arithmetic (db8bf7b) the gates 4.0e-4 (seed 0)
# and 2.9e-3 (seed 1), where the record's own float32-vs-float64 floor measured 0 and 3.0e-3: Newton-Schulz
# noise flipping bf16 roundings of the gates' small entries. So hidden, the float32 matrices, is held to
# float32 Newton-Schulz noise (the floor, 5.7e-6 to 3.1e-5 measured, or 1e-4), the gates to 0.01 or to
# one bf16 step per entry (`verdict`): seed 6 measured 1.2e-2, two of 132 entries one bf16 step apart.
STEP_TOLERANCES_46 = {"hidden": 1e-4, "gate": 0.01, "embed": 0.03, "value_embed": 0.03, "head": 0.03,
                      "scalar": 0.01}
# Record #46's architecture as GPTConfig options (tests/test_model_46.py holds them to its tensors).
RECORD_46 = dict(attention_free_layers=(0, 7), mlp_free_layers=(0,), long_window_layers=(4, 11), smear=True,
                 attn_gate=True, backout_layer=8, skips=((4, 7),), skip_gate="sigmoid", block_lambda_init=1.1,
                 yarn=True, attn_scale=0.1, head_softcap="sigmoid_unscaled", value_lambda_all_layers=True,
                 softcap_dtype="head", head_gate_dtype="bfloat16")


# ---- our side ------------------------------------------------------------------------------------------


def our_model(width: int) -> GPT:
    """Our GPT with record #46's options at `width` (heads of 128): the name table's other side."""
    return GPT(GPTConfig(n_head=width // 128, dim=width, max_seq_len=2048, attention="sdpa", **RECORD_46))


def missing_for_ours() -> list[str]:
    """What our side of the comparison needs and this code base lacks, one phrase each: the preset's
    model options against RECORD_46, its window rule (W + 1 keys), the loader's max_doc_len."""
    missing = []
    model = PRESETS[model_name()]
    differ = [name for name, value in RECORD_46.items() if getattr(model, name) != value]
    if differ:
        missing.append(f"--preset {PRESET} as record #46's model (model/gpt.py PRESETS[{model_name()!r}]: "
                       f"{', '.join(differ)} differ from RECORD_46)")
    if not sees_window_plus_one(model.window_rule):
        missing.append(f"a window rule where query i sees key j iff 0 <= i - j <= W, W + 1 keys (the "
                       f"preset's {model.window_rule!r} does not; model/attention.py)")
    if "max_doc_len" not in inspect.signature(TokenLoader).parameters:
        missing.append("documents cut to max_doc_len 2048 in data/loader.py TokenLoader")
    return missing


def model_name() -> str:
    return PRESETS_TRAIN[PRESET]["model"]


def sees_window_plus_one(rule: str) -> bool:
    """Whether `rule` lets a query see W + 1 keys for a window of W = 384 tokens, as FA3's (W, 0)."""
    mask = dense_mask(1024, torch.tensor(384), None, "cpu", rule)
    return int(mask[..., -1, :].sum()) == 385


def check_ours_buildable() -> None:
    missing = missing_for_ours()
    if missing:
        raise SystemExit(f"error: tools.parity: our side of record #46 lacks: "
                         f"{'; '.join(missing)}. Pass --reference-only to run the record and its noise floor")


# ---- the record and its twins -----------------------------------------------------------------------------

# The noise-floor twins: (what differs, SDPA's kernels or None for its default, micro-batches reversed).
TWINS = (("SDPA math kernel", [SDPBackend.MATH], False),
         ("micro-batches in reverse order", None, True),
         ("both", [SDPBackend.MATH], True))


@dataclass
class Side:
    ref: Record20251129
    backend: list[SDPBackend] | None  # None: SDPA's default choice
    reverse: bool = False  # its micro-batches taken last to first: its gradients summed in reverse order

    def kernel(self):
        return sdpa_choice(self.backend)

    def fed(self, micro_batches: list) -> list:
        return micro_batches[::-1] if self.reverse else micro_batches

    def weights(self) -> dict[str, Tensor]:
        return {name: p.detach().float().clone() for name, p in self.ref.model.named_parameters()}

    def train_step(self, table: list[Entry], micro_batches: list,
                   step: int) -> tuple[float, float, dict, dict]:
        """(float32 loss, bf16 training loss) per token before the step, and the step's weight change
        by the record's names and by ours (through `table`)."""
        tokens = sum(targets.numel() for _, targets, _ in micro_batches)
        before, ours_before = self.weights(), reference_weights(table, self.ref)
        fed = self.fed(micro_batches)
        with self.kernel():
            loss = self.ref.float_loss(fed, step)
            trained = self.ref.forward_backward(fed, step)
        check_unread(table, self.ref)
        self.ref.step(step)
        return (loss / tokens, trained / tokens, change(self.weights(), before),
                change(reference_weights(table, self.ref), ours_before))


@dataclass
class Row:
    step: int
    batch: int  # tokens in the step
    windows: tuple[int, int]  # short, long, in tokens
    loss: float  # float32, per token
    trained: float  # its training loss (bf16 sum), per token
    floors: tuple[float, ...]  # per twin, its float32 loss minus the record's
    update_floor: dict[str, float]  # per kind the twins' largest ‖u_ref − u_twin‖/‖u_ref‖
    ours: float | None = None  # our float32 loss per token (None: --reference-only)
    update: dict[str, float] | None = None  # per kind ‖u_ref − u_ours‖/‖u_ref‖

    @property
    def diff(self) -> float:
        """Our float32 loss minus the record's."""
        return self.ours - self.loss

    @property
    def floor(self) -> float:
        """The twins' loss difference of the largest magnitude (0 without twins)."""
        return max(self.floors, key=abs, default=0.0)


@dataclass
class Report46:
    substitutions: dict[str, int]
    table_entries: int
    rows: list[Row] = field(default_factory=list)
    checks: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> the one-step floor per kind
    our_checks: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> ours vs the record
    steps_apart: dict[int, dict[str, int]] = field(default_factory=dict)  # step -> bf16 kind -> bf16 steps
    gradients: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # step -> [ours, twins] vs it
    failures: list[str] = field(default_factory=list)  # none without our side: nothing to hold to a floor
    ours: bool = False  # our side ran


class RecordParity:
    """The record and its noise-floor twins, from identical weights, fed identical micro-batches."""

    def __init__(self, args: argparse.Namespace):
        self.ours = None if args.reference_only else build_ours46(args.width, args.seed)
        torch.manual_seed(args.seed)
        ref, self.substitutions = load_reference(args.reference, args.width, batch_divisor=args.batch_divisor)
        self.table = ref.table(self.ours.model if self.ours else our_model(args.width))
        self.kinds = reference_kinds(self.table)
        self.our_kinds = kind_of(self.table)
        self.sides = [Side(ref, None)]
        if args.floor:
            for _, backend, reverse in TWINS:
                twin, _ = load_reference(args.reference, args.width, batch_divisor=args.batch_divisor)
                self.sides.append(Side(twin, backend, reverse))
        if args.record_float32:
            for side in self.sides:
                side.ref.store_float32()
        ref.open_data(str(shards(args.data)[0].parent / "*_train_*.bin"), [*args.steps, *args.check_steps][0])

    def start_segment(self) -> None:
        """The record and its twins at our current weights through the name table (--reference-only:
        the twins at the record's); every optimizer fresh."""
        record = self.sides[0].ref
        for side in self.sides:
            if self.ours:
                copy_weights(self.table, self.ours.model, side.ref)
            elif side.ref is not record:
                side.ref.model.load_state_dict(record.model.state_dict())
            side.ref.fresh_state()
        if self.ours:
            self.ours.fresh_state()

    def train_step(self, step: int) -> Row:
        record = self.sides[0].ref
        micro_batches = record.batches(step)
        tokens = sum(t.numel() for _, t, _ in micro_batches)
        ours = self.ours.train_step(micro_batches, step) if self.ours else None
        (loss, trained, update, by_our_names), *twins = [side.train_step(self.table, micro_batches, step)
                                                          for side in self.sides]
        windows = tuple(w * record.args.block_size for w in record.ns["get_ws"](step))
        row = Row(step, tokens, windows, loss, trained, tuple(twin[0] - loss for twin in twins),
                  largest([relative_differences(self.kinds, update, twin[2]) for twin in twins], self.kinds))
        if ours:
            row.ours = ours[0] / tokens
            row.update = relative_differences(self.our_kinds, by_our_names, ours[2])
        return row


    def check_step(self, step: int) -> dict[str, float]:
        """The record's own one-step floor: from its current weights, fresh optimizer state and step's
        gradients, its optimizer step with Polar Express in float32 against float64, per kind (only
        the hidden matrices take Polar Express). The weights are left as they were."""
        record, side = self.sides[0].ref, self.sides[0]
        record.fresh_state()
        record.forward_backward(record.batches(step), step)
        weights = {n: p.detach().clone() for n, p in record.model.named_parameters()}
        grads = {n: p.grad for n, p in record.model.named_parameters()}
        synced = dict(record.adam._reduce_scatter_futures)  # DistAdam's gradients, sent by its hooks
        updates = {}
        for dtype in (torch.float32, torch.float64):
            self.restore(weights, grads)
            record.adam._reduce_scatter_futures.update(synced)
            record.set_ns_dtype(dtype)
            before = side.weights()
            record.step(step)
            updates[dtype] = change(side.weights(), before)
        record.set_ns_dtype(torch.bfloat16)
        self.restore(weights, {})
        return relative_differences(self.kinds, updates[torch.float32], updates[torch.float64])

    def check_ours(self, step: int) -> tuple[dict[str, float], dict[str, int], dict[str, float],
                                              dict[str, float]]:
        """Ours against the record from our weights on step's micro-batches: one optimizer step each
        from fresh state and our gradients (the same scale: both losses are sums / 8), Polar Express in
        float32 on both, per kind ‖u_ref − u_ours‖/‖u_ref‖, and for our bf16 kinds the most bf16 steps
        an entry of ours' new weights lies from the record's; and the gradients themselves, per kind
        ‖g_ref − g_ours‖/‖g_ref‖ and the twins' largest ‖g_ref − g_twin‖/‖g_ref‖ (0 without twins).
        Ours is left at its weights."""
        self.start_segment()
        weights = our_weights(self.ours.model)
        batches = self.sides[0].ref.batches(step)
        grads = self.ours.gradients(batches, step)
        record_grads = [self.reference_gradients(side, batches, step) for side in self.sides]
        record_update = self.record_step_from(grads, step)
        ours_update = self.ours.one_step(step, torch.float32)
        self.ours.restore(weights)
        twins = [relative_differences(self.our_kinds, record_grads[0], g) for g in record_grads[1:]]
        stored = dict(self.ours.model.named_parameters())
        bf16 = {n: k for n, k in self.our_kinds.items() if stored[n].dtype == torch.bfloat16}
        apart = dict.fromkeys(kinds_in(bf16), 0)  # in KINDS order
        for name, kind in bf16.items():
            steps = bf16_steps_apart(weights[name] + record_update[name], weights[name] + ours_update[name])
            apart[kind] = max(apart[kind], steps)
        return (relative_differences(self.our_kinds, record_update, ours_update), apart,
                relative_differences(self.our_kinds, record_grads[0], grads),
                largest(twins, self.our_kinds))

    def reference_gradients(self, side: Side, batches: list, step: int) -> dict[str, Tensor]:
        """side's gradients of step's training loss at its current weights, by our names (float32
        copies); its optimizers left fresh."""
        with side.kernel():
            side.ref.forward_backward(side.fed(batches), step)
        grads = {e.ours: reference_tensor(side.ref, e, grad=True).float().clone()
                 for e in self.table if e.ours is not None}
        side.ref.fresh_state()
        return grads

    def record_step_from(self, grads: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """The record's step_optimizers on `grads` (our names) through the name table: NorMuon reads
        p.grad; DistAdam what its backward hook `_sync_gradient` sends, run per parameter on an odd
        step as on the last micro-batch; Polar Express in float32. The change by our names."""
        record = self.sides[0].ref
        with torch.no_grad():
            for p in record.model.parameters():
                p.grad = torch.zeros_like(p)
            for entry in self.table:
                if entry.ours is not None:
                    reference_tensor(record, entry, grad=True).copy_(grads[entry.ours])
        if step % 2:
            record.adam.should_sync = True
            for p in (p for group in record.adam.param_groups for p in group["params"]):
                record.adam._sync_gradient(p)
        record.set_ns_dtype(torch.float32)
        before = reference_weights(self.table, record)
        record.step(step)
        record.set_ns_dtype(torch.bfloat16)
        return change(reference_weights(self.table, record), before)

    def restore(self, weights: dict[str, Tensor], grads: dict[str, Tensor | None]) -> None:
        """The record at `weights` with `grads` (none where absent), its optimizers fresh."""
        record = self.sides[0].ref
        record.fresh_state()
        with torch.no_grad():
            for name, p in record.model.named_parameters():
                p.copy_(weights[name])
                p.grad = grads.get(name)


def bf16_steps_apart(a: Tensor, b: Tensor) -> int:
    """The most bf16 steps (units in the last place, counted across powers of two and through 0)
    between entries of a and b, which hold bf16 values."""
    def ordered(x: Tensor) -> Tensor:
        bits = x.bfloat16().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def largest(differences: list[dict[str, float]], kinds: dict[str, str]) -> dict[str, float]:
    """Per kind the largest of `differences` (each kind -> relative difference); 0 for none."""
    return {k: max((d[k] for d in differences), default=0.0) for k in kinds_in(kinds)}


def reference_kinds(table: list[Entry]) -> dict[str, str]:
    """Each reference parameter's kind (the kind of its entries; the scalars' are all 'scalar')."""
    return {e.reference: e.kind for e in table}


def run(args: argparse.Namespace, out=None) -> Report46:
    """The record's side, printed as it goes (module docstring)."""
    out = out or sys.stdout
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    args.check_steps = [1801] if args.check_steps is None else args.check_steps
    odd = [segment[0] for segment in segments(args.steps) if segment[0] % 2]
    if odd:
        raise SystemExit(f"error: --steps: a run of steps must start on an even step (DistAdam steps on the "
                         f"gradients of an even and the following odd step), got one from {odd[0]}")
    if not args.reference_only:
        check_ours_buildable()
    with record_session(args.threads), last_shard_quiet():
        parity = RecordParity(args)
        report = Report46(parity.substitutions, len(parity.table), ours=parity.ours is not None)
        schedules, error = schedule_report(parity.sides[0].ref.ns, our_config(), args.batch_divisor)
        if error and not args.reference_only:
            raise SystemExit(error)
        print(schedules, header(args, report, kinds_in(parity.our_kinds)), sep="\n", file=out)
        for segment in segments(args.steps):
            parity.start_segment()
            for step in segment:
                report.rows.append(parity.train_step(step))
                print(format_row(report.rows[-1]), file=out)
        for step in args.check_steps:
            report.checks[step] = parity.check_step(step)
            print(format_check(step, report.checks[step]), file=out)
            if parity.ours:
                checked = parity.check_ours(step)
                report.our_checks[step], report.steps_apart[step], *report.gradients[step] = checked
                print(format_our_check(step, report.our_checks[step], report.steps_apart[step],
                                       *report.gradients[step]), file=out)
    tolerances = {**STEP_TOLERANCES_46, **args.step_tol}
    report.failures = verdict(report, args.loss_factor, args.loss_tol, tolerances)
    diagnostic = "DIAGNOSTIC (--record-float32), not the record: " if args.record_float32 else ""
    print(diagnostic + summary(report, args.loss_factor), file=out)
    return report


@contextlib.contextmanager
def last_shard_quiet():
    """The record's data generator starts a thread that reads the next shard at once (line 1134); on
    the last shard it ends in StopIteration, which the generator meets only once the data run out
    (`Record20251129.batches` then stops the run): that thread's traceback is not printed."""
    hook = threading.excepthook
    threading.excepthook = lambda failed: None if failed.exc_type is StopIteration else hook(failed)
    try:
        yield
    finally:
        threading.excepthook = hook


def header(args: argparse.Namespace, report: Report46, kinds: tuple[str, ...]) -> str:
    made = ", ".join(f"{what} x{n}" for what, n in report.substitutions.items())
    names = " ".join(f"{k:>11}" for k in kinds)
    diagnostic = ("DIAGNOSTIC (--record-float32): the record's head, gate weights and DistAdam moments in "
                  "float32; not the record\n" if args.record_float32 else "")
    return (f"{diagnostic}reference {args.reference} ({Record20251129.name}); CPU substitutions: {made}\n"
            f"name table: {report.table_entries} entries, every parameter of the record and of our GPT "
            f"with its options (width {args.width}) covered once, shapes equal\n"
            f"width {args.width}, 12 layers, batch sizes / {args.batch_divisor}, 8 micro-batches a step; "
            f"loss per token (fp32: eval-mode forward before the step; bf16: its training sum); "
            f"twins: {'; '.join(name for name, _, _ in TWINS)}; floor: their loss difference of the "
            f"largest magnitude, update: their largest |u_ref - u_twin|/|u_ref|\n"
            f"{'step':>5} {'tokens':>7} {'windows':>10} {'loss fp32':>10} {'loss bf16':>10} "
            f"{'floor':>10} {names}")


def format_row(row: Row) -> str:
    updates = " ".join(f"{value:11.1e}" for value in row.update_floor.values())
    windows = f"{row.windows[0]}/{row.windows[1]}"
    line = (f"{row.step:5d} {row.batch:7d} {windows:>10} {row.loss:10.5f} {row.trained:10.5f} "
            f"{row.floor:+10.1e} {updates}")
    if row.ours is None:
        return line
    ours = " ".join(f"{value:11.1e}" for value in row.update.values())
    return f"{line}\n{'ours':>34} {row.ours:10.5f} {'':10} {row.diff:+10.1e} {ours}"


def format_check(step: int, floor: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {value:.1e}" for k, value in floor.items())
    return (f"one optimizer step at step {step} (its weights, fresh state, its gradients), Polar Express "
            f"float32 against float64: {parts}")


def verdict(report: Report46, loss_factor: float, loss_tol: float, step_tol: dict[str, float]) -> list[str]:
    """Our float32 loss held to the record's within loss_factor x the largest floor plus loss_tol; each
    kind's one-step difference to max(the record's own float32-vs-float64 floor, step_tol[kind]), or, for
    a kind ours stores in bf16, its new weights to the record's within one bf16 step per entry: one
    rounding of the stored weight apart."""
    if not report.ours:
        return []
    loss = loss_failure([(r.step, r.diff, r.floor) for r in report.rows], loss_factor, loss_tol)
    failures = [loss] if loss else []
    for step, update in report.our_checks.items():
        apart = report.steps_apart.get(step, {})
        for kind, difference in update.items():
            floor, tol = report.checks[step][kind], step_tol[kind]
            one_rounding = kind in apart and apart[kind] <= 1  # bf16 weights the record's or a step from them
            if difference <= max(floor, tol) or one_rounding:
                continue
            stored = f", its bf16 weights up to {apart[kind]} steps apart" if kind in apart else ""
            failures.append(f"one step at {step}: {kind} {difference:.1e} exceeds max(floor {floor:.1e}, "
                            f"--step-tol {kind}={tol:g}){stored}")
    return failures


def format_our_check(step: int, update: dict[str, float], apart: dict[str, int], grads: dict[str, float],
                     twin: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {value:.1e}" for k, value in update.items())
    steps = ", ".join(f"{k} {value}" for k, value in apart.items())
    gradients = ", ".join(f"{k} {value:.1e} ({twin[k]:.1e})" for k, value in grads.items())
    return (f"one optimizer step at step {step}, ours against the record (our weights, fresh state, our "
            f"gradients), Polar Express float32: {parts}; the most bf16 steps an entry of ours' new bf16 "
            f"weights lies from the record's: {steps}\n"
            f"gradients at step {step} from our weights, ours against the record (the twins' largest): "
            f"{gradients}")


def twins_apart(rows: list[Row]) -> str:
    """Each twin's largest |twin − record| over the other twins' largest: the loss rule's chance of
    failing, seen on samples that differ from the record by rounding alone. "-" where the others' largest
    is 0 (at step 0 every twin's loss can be the record's to the last bit)."""
    peaks = [max(abs(r.floors[i]) for r in rows) for i in range(len(rows[0].floors))]
    if len(peaks) < 2:
        return ""
    others = [max(peaks[:i] + peaks[i + 1:]) for i in range(len(peaks))]
    ratios = [f"{value / other:.2f}" if other else "-" for value, other in zip(peaks, others, strict=True)]
    return f" (each twin's largest over the others': {', '.join(ratios)})"


def summary(report: Report46, loss_factor: float) -> str:
    if not report.rows:
        return "; ".join(["no steps run", *report.failures])
    floors = [abs(r.floor) for r in report.rows]
    floor = (f"noise floor of the float32 loss over {len(floors)} steps: mean "
             f"{sum(floors) / len(floors):.1e}, max {max(floors):.1e}{twins_apart(report.rows)}")
    if not report.ours:
        return f"reference only: {floor}; no verdict without our side"
    diffs = [abs(r.diff) for r in report.rows]
    verdict_line = "; ".join(report.failures) or (f"ours within {loss_factor:g} x the floor and the one-step "
                                                   f"tolerances")
    return (f"ours - record, float32 loss: mean {sum(diffs) / len(diffs):.1e}, max {max(diffs):.1e}; "
            f"{floor}; {verdict_line}")

