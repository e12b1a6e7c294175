"""The run's schedule: what changes with the step, in one object queried by step.

At step s (0-based) of a run of T = max_steps steps, whose schedule runs over its first
S = scheduled_steps (0: all T; the steps after S keep the final values), with x = s/S, it sets:
  lr factor   (s + 1)/warmup_steps during the warm-up; then the level L = lr_levels[i], i the number of
              lr_level_fracs below x (x > f); over the last cooldown_frac of S, L w + (1 - w) lr_floor
              with w = min(max((1 - x)/cooldown_frac, 0), 1): linear from L to lr_floor at s = S, then
              lr_floor. Every param group's lr is its base lr (group["initial_lr"]) times the factor.
  momentum    Muon's mu: (1 - f) momentum_start + f momentum, f = min(s/momentum_warmup_steps, 1), or
              momentum_start + f (momentum - momentum_start) with momentum_blend "offset" (the same
              number in other float operations: each record's own, a last-bit difference that bf16
              Newton-Schulz can turn into another update);
              in the last momentum_cooldown_steps (s > T - C, after the warm-up) momentum - f'
              (momentum - momentum_start), f' = (s - (T - C))/C: back down to momentum_start at s = T.
  window      the long attention window in tokens. From a table window_blocks = (b_0, ..., b_n) of
              128-token blocks: 128 b_i with i = int(n x) before S, 128 b_n from S on. Without one,
              128 ceil(size/128) and at least 128, where size grows linearly from window_start at s = 0
              to window_end at s = T (window_end 0: None, full causal attention).
  tokens      tokens per optimizer step: tokens_per_step, or from a table tokens_schedule indexed as
              window_blocks.

Schedule.at(step) answers all four as one StepSettings; Schedule.apply(optimizer, step) writes the lr
and the momentum into the optimizer's groups, and applied_lr(optimizer) reads back the lr a step used;
window_path(step) lists the window changes YaRN follows up to a step, tokens_before(step) the tokens
trained on before it. On a device, the schedule also holds one 0-dim int32 tensor per distinct window,
all made when it is built: the compiled model reads the window from the device, so every window runs
through one graph and no step copies a window from the host.

The 2025-07-12 record's schedule (the speedrun preset) has no tables, levels or momentum cooldown. Record
#46's (2025-11-29): S = 2120 of T = 2160, levels (1, 1.51, 1.93) above x = 0.33 and 0.66 (steps 700 and
1400), cooldown_frac 0.55 (from step 954) to 0.1, momentum cooldown 50 (after step 2110), window_blocks
(3, 7, 11, 13) and tokens_schedule (131072, 262144, 393216, 393216), switching at steps 707, 1414, 2120.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

# The float form of the momentum warm-up's blend (module docstring): "weighted" the 2025-07-12 record's,
# "offset" record #46's.
MOMENTUM_BLENDS = ("weighted", "offset")


class StepSettings(NamedTuple):
    """What the schedule sets at one step."""

    lr_factor: float  # times every group's base lr (initial_lr)
    momentum: float  # Muon's momentum, in every group that has one (not Adam's beta1)
    window: int | None  # long attention window in tokens (None: full causal attention)
    tokens: int  # tokens per optimizer step, over all processes


@dataclass
class Schedule:
    """The schedule of one run of max_steps steps (module docstring); built from the numbers alone
    (training/recipe.py's schedule_of reads them from a config)."""

    max_steps: int
    tokens_per_step: int
    warmup_steps: int = 0
    cooldown_frac: float = 0.0
    lr_floor: float = 0.0
    momentum: float = 0.95
    momentum_start: float = 0.95
    momentum_warmup_steps: float = 0  # may be fractional: a share of a run of any length
    momentum_blend: str = "weighted"  # the warm-up's float form (MOMENTUM_BLENDS)
    window_start: int = 0
    window_end: int = 0
    scheduled_steps: int = 0
    lr_levels: tuple[float, ...] = (1.0,)
    lr_level_fracs: tuple[float, ...] = ()
    momentum_cooldown_steps: int = 0
    window_blocks: tuple[int, ...] = ()
    tokens_schedule: tuple[int, ...] = ()
    device: torch.device | None = None  # where the window tensors live (None: no tensors)
    window_tensors: dict[int, Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        on = self.device is not None
        self.window_tensors = {w: torch.tensor(w, dtype=torch.int32, device=self.device)
                               for w in (self.windows() if on else ())}

    def at(self, step: int) -> StepSettings:
        return StepSettings(self.lr_factor(step), self.momentum_at(step), self.window_at(step),
                            self.tokens_at(step))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> StepSettings:
        """Set step's lr in every group (its initial_lr x the lr factor) and its momentum in every group
        whose momentum is Muon's: one with a "momentum" key and a kind other than "adam" (an adam
        group's momentum is its beta1, which the schedule leaves). A group's base lr, initial_lr (the
        key torch's schedulers use, saved with the optimizer's state), is its lr when first applied."""
        now = self.at(step)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * now.lr_factor
            if "momentum" in group and group.get("kind") != "adam":
                group["momentum"] = now.momentum
        return now

    @staticmethod
    def applied_lr(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
        """(lr, lr / initial_lr) of the hidden matrices' group: the lr the optimizer's last step used, and
        the factor the schedule applied to its base lr."""
        group = next(g for g in optimizer.param_groups if g["role"] == "hidden")
        return group["lr"], group["lr"] / group["initial_lr"]

    def window_tensor(self, step: int) -> Tensor | None:
        """The step's window as the 0-dim int32 device tensor made for it (None: full causal)."""
        window = self.window_at(step)
        return None if window is None else self.window_tensors[window]

    def windows(self) -> list[int]:
        """The distinct long windows of steps 0..max_steps, ascending (none for full causal attention)."""
        return sorted({self.window_at(step) for step in range(self.max_steps + 1)} - {None})

    def first_steps(self) -> list[int]:
        """The first step of each distinct (window, tokens per step) of steps 0..max_steps: the steps
        that show the compiled model every shape and window it will see."""
        firsts: dict = {}
        for step in range(self.max_steps + 1):
            now = self.at(step)
            firsts.setdefault((now.window, now.tokens), step)
        return list(firsts.values())

    def window_path(self, step: int) -> list[int | None]:
        """The long windows of steps 0..step in order, each repeat of the one before dropped: the
        changes YaRN follows (record #46: 384, 896, 1408, 1664 tokens)."""
        path = [self.window_at(0)]
        for s in range(1, step + 1):
            if self.window_at(s) != path[-1]:
                path.append(self.window_at(s))
        return path

    def tokens_before(self, step: int) -> int:
        """Tokens trained on over all processes in steps 0..step-1."""
        return sum(self.tokens_at(s) for s in range(step))

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        x = step / (self.scheduled_steps or self.max_steps)
        level = self.lr_levels[sum(x > f for f in self.lr_level_fracs)]
        if not self.cooldown_frac:
            return level
        w = min(max((1 - x) / self.cooldown_frac, 0.0), 1.0)
        return level * w + (1 - w) * self.lr_floor

    def momentum_at(self, step: int) -> float:
        cooldown_start = self.max_steps - self.momentum_cooldown_steps
        if self.momentum_cooldown_steps and step > cooldown_start and step >= self.momentum_warmup_steps:
            frac = (step - cooldown_start) / self.momentum_cooldown_steps
            return self.momentum - frac * (self.momentum - self.momentum_start)
        if not self.momentum_warmup_steps or step >= self.momentum_warmup_steps:
            return self.momentum
        frac = step / self.momentum_warmup_steps
        if self.momentum_blend == "offset":
            return self.momentum_start + frac * (self.momentum - self.momentum_start)
        return (1 - frac) * self.momentum_start + frac * self.momentum

    def window_at(self, step: int) -> int | None:
        """Without window_blocks, the speedrun's start 0 and end 1728 give the 2025-07-12 record's
        128 ceil(1728 (s/1750)/128): 128 at step 0, 1792 at the end, 14 values."""
        if self.window_blocks:
            return 128 * self.entry(self.window_blocks, step)
        if not self.window_end:
            return None
        size = self.window_start + (self.window_end - self.window_start) * (step / self.max_steps)
        return 128 * max(1, math.ceil(size / 128))

    def tokens_at(self, step: int) -> int:
        return self.entry(self.tokens_schedule, step) if self.tokens_schedule else self.tokens_per_step

    def entry(self, table: tuple[int, ...], step: int) -> int:
        """table[int(n x)] of a table of n + 1 entries before the scheduled steps end, table[n] after."""
        scheduled = self.scheduled_steps or self.max_steps
        n = len(table) - 1
        return table[n] if step >= scheduled else table[int(n * (step / scheduled))]
