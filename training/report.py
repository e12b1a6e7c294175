"""What a run says, beside its log (training/runlog.py: log.txt, metrics.jsonl, wandb): the opening lines,
a line and a metrics record per logged step and per validation, and the summary at the end.

    step 20/150 train_loss 6.1234 lr 1.000x step 412ms 2,485 tok/s (2,485/device)
    step 150/150 val_loss 5.3210 train_time 61.8s
    done: step 150/150, val_loss 5.3210, training time 61.8s, peak memory 1.23 GiB resident (process)

A step's lr is read from the optimizer (Schedule.applied_lr): the hidden matrices' group lr as its last
step applied it, and its factor lr / initial_lr (the schedule's multiplier on the group's base lr).
"""

import json
from pathlib import Path
from typing import NamedTuple

from data.durable import write_text_atomic
from training.compiling import graphs_compiled
from training.run import Run, Setup
from training.runlog import peak_flops
from training.runtime import peak_memory, peak_memory_gib


def announce(run: Run, setup: Setup) -> None:
    """The run's opening lines: model, data, device and precision, batch layout, where it starts."""
    cfg, log, model = run.cfg, run.log, run.state.model
    device, world_size = run.process.device, run.process.world_size
    n_params = sum(p.numel() for p in model.parameters())
    log.print(f"preset {cfg.preset}: model {cfg.model} ({n_params / 1e6:.1f}M parameters), "
              f"data {setup.data_dir}")
    head = "fp8" if model.lm_head.matmul(device) == "fp8" else run.autocast or model.embed.weight.dtype
    compiled = cfg.compile_backend if run.graphs is not None else "off"
    log.print(f"device {device}, compile {compiled}, residual stream {model.embed.weight.dtype}, autocast "
              f"{run.autocast or 'off'}, LM head matmul {head} in training")
    for tokens, shape in run.shapes.items():
        log.print(f"{tokens:,} tokens/step = {world_size} process(es) x {shape.rows} sequences x "
                  f"{shape.seq_len} tokens x {shape.grad_accum} micro-batch(es)")
    if setup.resume_from is not None:
        changed = f", with --resume-changed-ok: {'; '.join(setup.plan_changes)}" if setup.plan_changes else ""
        log.print(f"resumed from {setup.resume_from} at step {run.state.step}{changed}")
    elif cfg.resume == "auto":
        log.print(f"--resume auto: no checkpoint in {Path(cfg.out_dir) / 'checkpoints'}; a new run starts "
                  f"at step 0")


class Throughput:
    """Tokens/s and MFU (model FLOPs over the devices' dense bf16 peak, where known) of a stretch of a
    run's steps."""

    def __init__(self, run: Run):
        self.tokens_at, self.world_size = run.schedule.tokens_at, run.process.world_size
        self.flops_per_token = run.flops_per_token  # of a step
        self.peak_flops = peak_flops(run.process.device)

    def of(self, steps: range, seconds: float) -> dict:
        """Over `steps`, each at its own tokens per step (the schedule's)."""
        tokens_per_s = sum(self.tokens_at(s) for s in steps) / seconds
        mfu = None
        if self.peak_flops:
            flops = sum(self.tokens_at(s) * self.flops_per_token(s) for s in steps)
            mfu = flops / seconds / (self.peak_flops * self.world_size)
        return dict(step_ms=1000 * seconds / len(steps), tokens_per_s=tokens_per_s,
                    tokens_per_s_per_device=tokens_per_s / self.world_size, mfu=mfu)


def log_step(run: Run, train_loss: float, speed: dict) -> None:
    """The line and metrics record of the step just done (run.state.step steps done)."""
    cfg, step = run.cfg, run.state.step
    lr, factor = run.schedule.applied_lr(run.state.optimizer)
    mfu = f" MFU {100 * speed['mfu']:.1f}%" if speed["mfu"] else ""
    run.log.print(f"step {step}/{cfg.max_steps} train_loss {train_loss:.4f} lr {factor:.3f}x "
                  f"step {speed['step_ms']:.0f}ms {speed['tokens_per_s']:,.0f} tok/s "
                  f"({speed['tokens_per_s_per_device']:,.0f}/device){mfu}")
    run.log.metrics(step=step, train_loss=train_loss, lr=lr, **speed, tokens=run.schedule.tokens_before(step),
                    train_time_s=run.state.train_time)


def log_validation(run: Run, val_loss: float) -> None:
    state = run.state
    run.log.print(f"step {state.step}/{run.cfg.max_steps} val_loss {val_loss:.4f} "
                  f"train_time {state.train_time:.1f}s")
    run.log.metrics(step=state.step, val_loss=val_loss, train_time_s=state.train_time)


class TimedRun(NamedTuple):
    """Where the timed run began: its first step, the train time then, the graphs compiled by then
    (graphs_compiled: the model's and any other compiled function's)."""

    step: int
    train_time: float
    graphs: int

    @classmethod
    def starting(cls, run: Run) -> "TimedRun":
        return cls(run.state.step, run.state.train_time, graphs_compiled())


def run_summary(run: Run, timed_from: TimedRun) -> dict:
    """The timed run's figures: speed over all its steps, peak memory, and the graphs compiled (if any)."""
    state, device = run.state, run.process.device
    summary = dict(step=state.step, train_time_s=state.train_time, peak_memory_gib=peak_memory_gib(device),
                   graphs_in_timed_run=graphs_compiled() - timed_from.graphs)
    if state.step > timed_from.step:
        seconds = state.train_time - timed_from.train_time
        summary |= Throughput(run).of(range(timed_from.step, state.step), seconds)
    if run.graphs is not None:
        summary |= dict(graphs_training=run.graphs.training, graphs_validation=run.graphs.validation)
    return summary


def log_summary(run: Run, val_loss: float, summary: dict) -> None:
    """The summary's lines, and on rank 0 <out-dir>/summary.json."""
    state, log = run.state, run.log
    log.print(f"done: step {state.step}/{run.cfg.max_steps}, val_loss {val_loss:.4f}, "
              f"training time {state.train_time:.1f}s, peak memory {peak_memory(run.process.device)}")
    if "graphs_training" in summary:
        log.print(f"compiled model graphs: training {summary['graphs_training']}, validation "
                  f"{summary['graphs_validation']}")
    log.print(f"graphs compiled in the timed run: {summary['graphs_in_timed_run']}")
    if run.process.rank == 0:
        write_text_atomic(Path(run.cfg.out_dir) / "summary.json", json.dumps(summary, indent=2))
