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
Windows and batch sizes must be equal. lr and momentum are floats: equal, or a difference of rounding
alone, at most ROUNDING relative (ours and the record may write the same line in a different order:
our momentum warm-up (1 − f) m₀ + f m₁, record #46's m₀ + f (m₁ − m₀)); such steps are counted.
"""

from dataclasses import dataclass

import torch

from model import PRESETS
from model.attention import short_window
from training.recipe import TrainConfig, parse_config
from training.schedule import Schedule

PRESET = "speedrun"  # record #46's recipe
ROUNDING = 4 * torch.finfo(torch.float64).eps  # relative: a few roundings of a float64 expression
BLOCK = 128  # the record's block_size: its windows are in blocks


def our_config() -> TrainConfig:
    """The preset's TrainConfig, as `--preset speedrun` parses it."""
    return parse_config(["--preset", PRESET])


@dataclass
class Agreement:
    """One schedule quantity over the steps: where it differs from the record's, and by how much."""

    name: str
    exact: bool  # held to equality (windows, batch) or to rounding (lr, momentum)
    differ: list[int]  # steps with a different value
    worst: float  # the largest relative difference (0 if none)

    def ok(self) -> bool:
        return not self.differ or (not self.exact and self.worst <= ROUNDING)

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
    schedule, rule = Schedule.of(cfg), PRESETS[cfg.model].window_rule
    found = {name: Agreement(name, name in ("windows", "batch"), [], 0.0)
             for name in ("lr", "momentum", "windows", "batch")}
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
