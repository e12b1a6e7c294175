"""The two functions the compiled model runs in: one optimizer step over every micro-batch, and the
validation. train_gpt.py's loop calls them; bench.structure counts the graphs they build.
"""

from collections.abc import Callable

import torch

from model import GPT
from training.runtime import mean_over_ranks
from training.schedule import Schedule
from training.state import RunState


def train_step(run: RunState, forward, schedule: Schedule, grad_accum: int,
               precision: Callable[[], torch.autocast]) -> torch.Tensor:
    """One optimizer step (all micro-batches) at run.step, at its scheduled lr, momentum and window;
    this rank's loss, left on the device."""
    schedule.apply(run.optimizer, run.step)
    window = schedule.window_tensor(run.step)
    train_loss = None
    for micro_step in range(grad_accum):
        x, y = run.loader.next_batch()
        with precision():
            loss = forward(x, y, window=window) / grad_accum
        # Under torchrun the optimizer averages gradients over ranks itself, sending each bucket
        # during the last backward as soon as it is complete (optim/distributed.py).
        with run.optimizer.sync_gradients(enabled=micro_step == grad_accum - 1):
            loss.backward()
        train_loss = loss.detach() if train_loss is None else train_loss + loss.detach()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return train_loss


def evaluate(forward, model: GPT, val_batches, step: int, schedule: Schedule,
             precision: Callable[[], torch.autocast]) -> float:
    """Mean loss over the fixed validation batches at `step`'s window (every rank its share, averaged)."""
    model.eval()
    window, total, count = schedule.window_tensor(step), None, 0
    with torch.no_grad(), precision():
        for x, y in val_batches():
            loss = forward(x, y, window=window).float()
            total = loss if total is None else total + loss
            count += 1
    model.train()
    return mean_over_ranks(total).item() / count
