"""Our side of the step parity with record #46 (tools/parity46.py): `--preset speedrun`, record #46's
recipe (training/recipe.py), held to the record's own definitions.

The schedules. At every step s = 0..max_steps (2160: the record's loop runs to it, validating on the
last) our Schedule (training/schedule.py) is compared with the record's functions:
  lr        Schedule.lr_factor(s)                       with get_lr(s)
  momentum  Schedule.momentum_at(s)                     with get_muon_momentum(s)
  windows   (short_window(w, rule), w) / 128, w = Schedule.window_at(s), model/attention.py's short
            window under the preset's window rule       with get_ws(s) (short, long) in 128-token blocks
  batch     Schedule.tokens_at(s) / d                   with get_bs(s), the record's batch sizes over the
                                                        same divisor d (the adapter's --batch-divisor)
Each must be equal at every step, the floats lr and momentum to the bit: a last-bit difference of the
momentum moves bf16 Newton–Schulz's input roundings, hence the update (the preset's momentum_blend
"offset" writes the record's warm-up m₀ + f (m₁ − m₀)). The steps that differ are counted.

Our model and step (build_ours46, Ours46.train_step). The preset at --width (heads of 128, its 12
layers), its weights in their CUDA dtypes (bf16 tables, head and gates), Newton–Schulz in bf16, built by
training/recipe.py (build_optimizer: NorMuon on the hidden matrices, Adam stepped every other step;
record #46's state dtypes). A step takes the record's 8 micro-batches, each as one sequence
inputs[None], targets[None]: our document ids come from its BOS tokens, so each cu_seqlens segment of
the record's aligned loader must start at a BOS (check_segments_start_at_bos). Long window
Schedule.window_at(s) tokens, short as the window rule says; YaRN extended at each long-window change
from step 0's, as the record's loop does; each micro-batch's training loss (the preset's bf16 sum) / 8
backward, as the record's; then the schedule's lr and momentum and one optimizer step.
"""

import dataclasses
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from model import GPT, PRESETS
from model.attention import short_window
from optim import Muon
from tools.parity_table import change, our_weights
from training.recipe import TrainConfig, build_optimizer, parse_config, schedule_of
from training.schedule import Schedule

PRESET = "speedrun"  # record #46's recipe
BLOCK = 128  # the record's block_size: its windows are in blocks
GRAD_ACCUM_STEPS = 8  # the record's 8 ranks' micro-batches, one process


def our_config() -> TrainConfig:
    """The preset's TrainConfig, as `--preset speedrun` parses it."""
    return parse_config(["--preset", PRESET])


@dataclass
class Agreement:
    """One schedule quantity over the steps: where it differs from the record's, and by how much."""

    name: str
    differ: list[int]  # steps with a different value
    worst: float  # the largest relative difference (0 if none)

    def ok(self) -> bool:
        return not self.differ

    def describe(self) -> str:
        if not self.differ:
            return f"{self.name} equal"
        return (f"{self.name} differs at {len(self.differ)} steps (first {self.differ[0]}), by at most "
                f"{self.worst:.1e} relative")


def relative(ours, record) -> float:
    """|ours − record| / |record| over a value or a tuple of values (inf where the record's is 0)."""
    pairs = zip(ours, record, strict=True) if isinstance(record, tuple) else [(ours, record)]
    return max(abs(o - r) / abs(r) if r else (0.0 if o == r else float("inf")) for o, r in pairs)


def our_values(schedule: Schedule, rule: str, batch_divisor: int, step: int) -> dict:
    """Our schedule at `step` in the record's units: lr factor, momentum, (short, long) blocks, batch."""
    now = schedule.at(step)
    short = int(short_window(torch.tensor(now.window), rule))
    return {"lr": now.lr_factor, "momentum": now.momentum,
            "windows": (short // BLOCK, now.window // BLOCK), "batch": now.tokens / batch_divisor}


def record_values(ns: dict, step: int) -> dict:
    """The record's get_lr, get_muon_momentum, get_ws, get_bs at `step` (its namespace `ns`)."""
    return {"lr": ns["get_lr"](step), "momentum": ns["get_muon_momentum"](step),
            "windows": tuple(ns["get_ws"](step)), "batch": ns["get_bs"](step)}


def compare_schedules(ns: dict, cfg: TrainConfig, batch_divisor: int) -> list[Agreement]:
    """Our schedule of `cfg` against the record's functions at every step 0..cfg.max_steps (module
    docstring); `batch_divisor` divides our tokens per step as the adapter divided the record's."""
    schedule, rule = schedule_of(cfg), PRESETS[cfg.model].window_rule
    found = {name: Agreement(name, [], 0.0) for name in ("lr", "momentum", "windows", "batch")}
    for step in range(cfg.max_steps + 1):
        ours, record = our_values(schedule, rule, batch_divisor, step), record_values(ns, step)
        for name, agreement in found.items():
            if ours[name] != record[name]:
                agreement.differ.append(step)
                agreement.worst = max(agreement.worst, relative(ours[name], record[name]))
    return list(found.values())


def schedule_report(ns: dict, cfg: TrainConfig, batch_divisor: int) -> tuple[str, str | None]:
    """One line on the four schedules against the record's, and the one-line error naming the first
    that differs beyond rounding (None if none does)."""
    agreements = compare_schedules(ns, cfg, batch_divisor)
    line = (f"schedules of --preset {PRESET} against the record's at steps 0..{cfg.max_steps}: "
            + "; ".join(a.describe() for a in agreements))
    failed = [a for a in agreements if not a.ok()]
    if not failed:
        return line, None
    return line, (f"error: tools.parity: --preset {PRESET}'s {failed[0].name} schedule is not the "
                  f"record's: {failed[0].describe()} (training/schedule.py, training/recipe.py)")


# ---- our model and step ------------------------------------------------------------------------------


def set_ns_dtype(optimizer: Muon, dtype: torch.dtype) -> None:
    for group in optimizer.param_groups:
        group["ns_dtype"] = dtype


def model_and_optimizer(cfg: TrainConfig, width: int, max_seq_len: int, seed: int) -> tuple[GPT, Muon]:
    """cfg's model at `width` (heads of 128) on SDPA, initialized from `seed`, with its weights in their
    CUDA dtypes (GPT.cast_storage: bf16 tables, head and gates), and cfg's optimizer with Newton–Schulz
    in bf16: both as the run has them on CUDA."""
    model_cfg = dataclasses.replace(PRESETS[cfg.model], dim=width, n_head=width // 128,
                                    max_seq_len=max_seq_len, attention="sdpa")
    torch.manual_seed(seed)
    model = GPT(model_cfg).cast_storage("cuda")
    optimizer = build_optimizer(model, cfg)
    set_ns_dtype(optimizer, torch.bfloat16)
    return model, optimizer


@dataclass
class Ours46:
    model: GPT
    optimizer: Muon
    schedule: Schedule
    yarn_windows: list[int] | None = None  # the long windows YaRN has been extended through

    def fresh_state(self) -> None:
        """The optimizer as built (no state, Adam's step_every counter at 0), no gradients."""
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["pending_steps"] = 0
        self.model.zero_grad(set_to_none=True)

    def follow_yarn(self, step: int) -> None:
        """YaRN extended at each long-window change from step 0's up to `step`, in order (from a reset
        when the path differs from the one applied)."""
        path = [self.schedule.window_at(0)]
        for s in range(1, step + 1):
            if self.schedule.window_at(s) != path[-1]:
                path.append(self.schedule.window_at(s))
        if path != self.yarn_windows:
            self.model.reset_yarn()
            for old, new in pairwise(path):
                self.model.extend_yarn(old, new)
            self.yarn_windows = path

    def train_step(self, micro_batches: list[tuple[Tensor, Tensor, Tensor]],
                   step: int) -> tuple[float, float, dict[str, Tensor]]:
        """(float32 loss, training loss) summed over the micro-batches' tokens before the step, and the
        step's weight change by our names (module docstring)."""
        check_segments_start_at_bos(micro_batches, self.model.config.bos_token, step)
        window = self.schedule.window_at(step)
        self.follow_yarn(step)
        before = our_weights(self.model)
        loss = self.float_loss(micro_batches, window)
        trained = 0.0
        for inputs, targets, _ in micro_batches:
            total = self.model(inputs[None].long(), targets[None], window=window)
            (total / GRAD_ACCUM_STEPS).backward()
            trained += total.item()
        self.schedule.apply(self.optimizer, step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, trained, change(our_weights(self.model), before)

    def gradients(self, micro_batches: list[tuple[Tensor, Tensor, Tensor]], step: int) -> dict[str, Tensor]:
        """Our gradients of step's training loss (each micro-batch's bf16 sum / 8, as train_step), left
        in p.grad and returned by our names; the weights do not move."""
        window = self.schedule.window_at(step)
        self.follow_yarn(step)
        for inputs, targets, _ in micro_batches:
            (self.model(inputs[None].long(), targets[None], window=window) / GRAD_ACCUM_STEPS).backward()
        return {name: p.grad.detach().clone() for name, p in self.model.named_parameters()
                if p.grad is not None}

    def one_step(self, step: int, ns_dtype: torch.dtype) -> dict[str, Tensor]:
        """One optimizer step on the gradients in p.grad from fresh state, each group's step_every
        counter as after `step` steps from 0 (Adam, every other step, steps on an odd one), Newton–Schulz
        in ns_dtype; the weights' change by our names."""
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["pending_steps"] = step % group["step_every"]
        before = our_weights(self.model)
        set_ns_dtype(self.optimizer, ns_dtype)
        self.schedule.apply(self.optimizer, step)
        self.optimizer.step()
        set_ns_dtype(self.optimizer, torch.bfloat16)
        self.optimizer.zero_grad(set_to_none=True)
        return change(our_weights(self.model), before)

    @torch.no_grad()
    def restore(self, weights: dict[str, Tensor]) -> None:
        """Our weights back to `weights` (our names), the optimizer fresh."""
        for name, p in self.model.named_parameters():
            p.copy_(weights[name])
        self.fresh_state()

    @torch.no_grad()
    def float_loss(self, micro_batches: list[tuple[Tensor, Tensor, Tensor]], window: int) -> float:
        """Σ over micro-batches of the eval-mode mean (float32 logits) × its tokens."""
        self.model.eval()
        try:
            return sum(self.model(inputs[None].long(), targets[None], window=window).item() * targets.numel()
                       for inputs, targets, _ in micro_batches)
        finally:
            self.model.train()


def build_ours46(width: int, seed: int) -> Ours46:
    """--preset speedrun at `width` (heads of 128), initialized from `seed` (module docstring)."""
    cfg = our_config()
    return Ours46(*model_and_optimizer(cfg, width, 2048, seed), schedule_of(cfg))


def check_segments_start_at_bos(micro_batches: list[tuple[Tensor, Tensor, Tensor]], bos: int,
                                step: int) -> None:
    """Each cu_seqlens segment (its starts: the entries below the sequence length; the record pads
    with it) must start at a BOS token, where our document ids start a document."""
    for k, (inputs, _, cu_seqlens) in enumerate(micro_batches):
        starts = cu_seqlens[cu_seqlens < len(inputs)].long()
        if not bool((inputs[starts] == bos).all()):
            at = int(starts[inputs[starts] != bos][0])
            raise SystemExit(f"error: tools.parity: step {step}, micro-batch {k}: the record's segment at "
                             f"token {at} does not start at BOS {bos}, so our document ids would not "
                             f"match its cu_seqlens")
