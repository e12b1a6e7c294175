"""The run as one object: its config, batch layout, process (device and ranks), state, compiled
forward, schedule, precision and log, and the three things a run does with them: a training
step, a validation, a checkpoint.

    setup = set_up(cfg, layout, process)    # data, model, optimizer, --resume; nothing written yet
    log = open_log(cfg, rank, resumed)      # in the claimed --out-dir (training/rundir.py)
    run = Run(cfg, process, setup, log)
    loss = run.train_step()                 # one optimizer step at run.state.step
    val_loss = run.validate()               # the validation loss at run.state.step
    run.checkpoint("periodic")              # save the state (training/checkpoint.py)

train_gpt.py's loop calls these; the schedule (training/schedule.py: lr, momentum, window and tokens
by step, from the config by training/recipe.py's schedule_of) is built with the Run and applied in its
training step: the step's batch shape (`step_shapes`), its lr and momentum, and YaRN (`follow_yarn`:
the model's rotary extended at each long-window change, as record #46 does, before training and
validation alike).
"""

import dataclasses
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

from data.loader import TokenLoader, validation_batches
from data.shards import fingerprint, list_shards
from data.tokenizer import gpt2_encoding
from model import GPT, PRESETS
from model.attention import short_window
from training.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from training.compiling import compile_model
from training.fsdp import shard
from training.recipe import (
    BatchLayout,
    TrainConfig,
    build_optimizer,
    largest_divisor,
    plan_changes,
    schedule_of,
)
from training.runlog import RunLog, WandbSink, code_listing, environment
from training.runtime import Process, autocast_dtype, mean_over_ranks
from training.state import RunState

# ----------------------------------------------------------------------------------------------------
# Set-up: everything checked and loaded before the run writes a file


class StepShape(NamedTuple):
    """One optimizer step's batch on each process: grad_accum micro-batches of rows x seq_len tokens."""

    rows: int
    seq_len: int
    grad_accum: int

    @property
    def micro_tokens(self) -> int:
        """Tokens of one micro-batch on one process, rows x seq_len."""
        return self.rows * self.seq_len


def step_shapes(cfg: TrainConfig, layout: BatchLayout, world_size: int) -> dict[int, StepShape]:
    """The batch shape of each tokens-per-step value N the run uses (--tokens-schedule's, or
    --tokens-per-step): with --max-doc-len as record #46, a fixed A = layout.grad_accum micro-batches
    of one packed row of N / (W A) tokens (the record's rows: 16384, 32768, 49152 tokens on 8 GPUs);
    else N / (W seq_len) rows of seq_len, in the fewest equal micro-batches of at most --batch-size.
    A value that does not split over the W processes is refused in one line."""
    shapes = {}
    for tokens in sorted(set(cfg.tokens_schedule) or {cfg.tokens_per_step}):
        if cfg.max_doc_len:
            unit, what = world_size * layout.grad_accum, f"{layout.grad_accum} micro-batch(es)"
        else:
            unit, what = world_size * cfg.seq_len, f"--seq-len {cfg.seq_len}"
        if tokens % unit:
            raise SystemExit(f"error: --tokens-schedule value {tokens} is not a multiple of {world_size} "
                             f"process(es) x {what} = {unit}; try {max(1, round(tokens / unit)) * unit}")
        if cfg.max_doc_len:
            shapes[tokens] = StepShape(1, tokens // unit, layout.grad_accum)
        else:
            rows = tokens // unit
            micro_batch = largest_divisor(rows, at_most=cfg.batch_size)
            shapes[tokens] = StepShape(micro_batch, cfg.seq_len, rows // micro_batch)
    return shapes


class Setup(NamedTuple):
    """What a run builds and checks before it claims its --out-dir."""

    layout: BatchLayout
    state: RunState
    val_batches: Callable[[], Iterable]  # this rank's share of the fixed validation batches
    data_dir: Path
    model_config: dict
    data: str  # the shards' fingerprint (data.shards.fingerprint), saved with every checkpoint
    resume_from: Path | None
    plan_changes: list[str]  # what --resume-changed-ok let this run change from the checkpoint's plan


def set_up(cfg: TrainConfig, layout: BatchLayout, process: Process) -> Setup:
    """The data, the model and its optimizer, loaded from --resume if given; each failure one line."""
    rank, world_size, device = process
    resume_from = resolve_checkpoint(cfg.resume, Path(cfg.out_dir) / "checkpoints") if cfg.resume else None
    torch.manual_seed(cfg.seed)
    if samples(rank, cfg) and cfg.sample_tokens:
        gpt2_encoding()  # fail now, not after training, if the GPT-2 vocabulary cannot be loaded

    data_dir = shard_dir(cfg, process)
    train_shards, val_shards = list_shards(data_dir, "train"), list_shards(data_dir, "val")
    largest = max(step_shapes(cfg, layout, world_size).values(), key=lambda shape: shape.micro_tokens)
    loader = TokenLoader(train_shards, largest.rows, largest.seq_len, rank=rank, world_size=world_size,
                         device=device, align_to_bos=cfg.align_to_bos, max_doc_len=cfg.max_doc_len or None)
    if world_size * largest.micro_tokens >= loader.num_tokens:  # one read, larger than the data
        raise SystemExit(f"error: a micro-batch of {world_size} process(es) x {largest.rows:,} "
                         f"sequences x {largest.seq_len} tokens (--seq-len, or --max-doc-len's packed rows) "
                         f"is more than the {loader.num_tokens:,} "
                         f"train tokens in {data_dir}; lower --batch-size or --tokens-per-step")
    val_batches = partial(validation_batches, val_shards, layout.val_batch, cfg.val_seq_len, cfg.val_tokens,
                          rank=rank, world_size=world_size, device=device)
    val_batches()  # refuses now, not at the first validation, if the val split is too short

    model_cfg = dataclasses.replace(PRESETS[cfg.model], max_seq_len=max(largest.seq_len, cfg.val_seq_len))
    model = GPT(model_cfg)
    if cfg.fsdp:  # training/fsdp.py: every rank keeps 1/W of each parameter's rows, float32
        shard(model.to(device), device)
    else:
        model.to_device(device)  # on CUDA, the embedding tables in the preset's dtype
    state, changes = RunState(model, build_optimizer(model, cfg), loader), []
    data = fingerprint(train_shards + val_shards)
    if resume_from is not None:
        saved = load_checkpoint(state, resume_from, dataclasses.asdict(model_cfg))
        if state.step > cfg.max_steps:
            raise SystemExit(f"error: --max-steps {cfg.max_steps}: --resume {resume_from} is at step "
                             f"{state.step}, past the end; pass --max-steps {state.step} or more")
        changes = check_plan(cfg, saved, data, resume_from)
    return Setup(layout, state, val_batches, data_dir, dataclasses.asdict(model_cfg), data, resume_from,
                 changes)


def shard_dir(cfg: TrainConfig, process: Process) -> Path:
    """--data-dir, or the offline demo corpus (built once, by rank 0; the other ranks then find it)."""
    if cfg.data_dir is not None:
        return Path(cfg.data_dir)
    from data.demo import demo_shards

    if process.rank == 0:
        demo_shards()
    if process.world_size > 1:
        torch.distributed.barrier()
    return demo_shards()


def check_plan(cfg: TrainConfig, saved: dict, data: str, resume_from: Path) -> list[str]:
    """The changes from the checkpoint's plan (recipe.plan_changes, and the shards' fingerprint): one
    line naming each, unless --resume-changed-ok lets the run go on with them."""
    changes = plan_changes(saved["config"], cfg)
    if saved["data"] not in (None, data):
        changes.append(f"the shards (fingerprint {saved['data']} -> {data})")
    if changes and not cfg.resume_changed_ok:
        raise SystemExit(f"error: --resume {resume_from}: this run changes the checkpoint's plan: "
                         f"{'; '.join(changes)}; pass the checkpoint's values, or --resume-changed-ok to "
                         f"continue with these")
    return changes


def open_log(cfg: TrainConfig, rank: int, resumed: bool) -> RunLog:
    """Rank 0's log in --out-dir: a new run's starts with the source and the environment. Always
    appended to: a run that does not resume has a folder without logs (claim_out_dir), and one that
    resumes keeps them."""
    out_dir = Path(cfg.out_dir)
    wandb = None
    if rank == 0 and cfg.wandb:
        wandb = WandbSink(cfg.wandb_project, cfg.run_name or None, dataclasses.asdict(cfg), out_dir)
    log = RunLog(out_dir, enabled=rank == 0, append=True, wandb=wandb)
    if not resumed:
        log.print(code_listing(), console=False)
        log.print(environment(), console=False)
    log.print(f"config {dataclasses.asdict(cfg)}", console=False)
    return log


def samples(rank: int, cfg: TrainConfig) -> bool:
    """Whether this rank generates the final sample: rank 0, or every rank under --fsdp, whose forward
    needs all of them (the same seed gives each the same text; rank 0 prints it)."""
    return rank == 0 or cfg.fsdp


# ----------------------------------------------------------------------------------------------------
# The run


class Run:
    """A training run's parts (the module docstring) and its step, validation and checkpoint.

    The model runs through `forward`: torch.compile'd (graphs counted by mode in `graphs`) with
    --compile on, or auto on CUDA; else the model itself and `graphs` None. `precision()` is bf16
    autocast where autocast_dtype asks for it (a float32 residual stream on CUDA), else disabled.

    Windows reach the model as 0-dim int32 tensors made once: the schedule's long windows (training),
    each with its short window (validation passes both, so the last validation's --final-val-windows
    run through the same graph).
    """

    def __init__(self, cfg: TrainConfig, process: Process, setup: Setup, log: RunLog):
        self.cfg, self.process, self.log = cfg, process, log
        self.layout, self.state, self.val_batches = setup.layout, setup.state, setup.val_batches
        # saved beside every checkpoint: a resume refuses another model, and names plan changes
        self.checkpoint_meta = dict(model_config=setup.model_config, config=dataclasses.asdict(cfg),
                                    data=setup.data)
        model, device = self.state.model, process.device
        compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
        self.forward, self.graphs = compile_model(model, cfg.compile_backend) if compiled else (model, None)
        self.autocast = autocast_dtype(model, device)
        self.schedule = schedule_of(cfg, device)  # lr, momentum, window by step; window tensors made now
        self.shapes = step_shapes(cfg, self.layout, process.world_size)  # by tokens per step
        self.val_windows = {w: (t, short_window(t, model.config.window_rule))
                            for w, t in self.schedule.window_tensors.items()}
        self.final_windows = tuple(torch.tensor(w, dtype=torch.int32, device=device)
                                   for w in cfg.final_val_windows)
        # the long windows YaRN has extended the rotary through (its state is not saved; a fresh
        # model's base frequencies are those of step 0's window)
        self.yarn_windows, self.yarn_step = [self.schedule.window_at(0)], 0

    def precision(self) -> torch.autocast:
        enabled = self.autocast is not None
        return torch.autocast(self.process.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> torch.Tensor:
        """One optimizer step (all micro-batches) at state.step, at its scheduled lr, momentum, window
        (YaRN followed) and batch shape; this rank's mean loss per token, left on the device. The loop
        advances state.step.

        The gradient is that of L / A summed over the A micro-batches, L the model's training loss of a
        micro-batch, then averaged over the W ranks by the optimizer: record #46's, whose L (train_loss
        "sum_bf16") is the sum over the micro-batch's rows x seq_len tokens. The returned loss is the sum of
        the L / A, divided by those tokens when L is a sum: the mean per token, as val_loss."""
        state = self.state
        self.follow_yarn(state.step)
        now = self.schedule.apply(state.optimizer, state.step)
        shape = self.shapes[now.tokens]
        state.loader.reshape(shape.rows, shape.seq_len)  # from the same stream position
        window = self.schedule.window_tensor(state.step)
        train_loss = None
        for micro_step in range(shape.grad_accum):
            x, y = state.loader.next_batch()
            with self.precision():
                loss = self.forward(x, y, window=window) / shape.grad_accum
            # Under torchrun the optimizer averages gradients over ranks itself, sending each bucket
            # during the last backward as soon as it is complete (optim/distributed.py).
            with state.optimizer.sync_gradients(enabled=micro_step == shape.grad_accum - 1):
                loss.backward()
            loss = loss.detach().float()
            train_loss = loss if train_loss is None else train_loss + loss
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        summed = state.model.config.train_loss == "sum_bf16"
        return train_loss / shape.micro_tokens if summed else train_loss

    def follow_yarn(self, step: int) -> None:
        """The model's YaRN state for `step`, as record #46 keeps it: extend_yarn(old, new) at every change
        of the long window between consecutive steps 0..step. Ahead of the current state it extends
        on; otherwise (after the warm-up, on resume) it resets and replays the extensions, so the
        rotary tables equal an uninterrupted run's. Nothing to do without GPTConfig.yarn, or at a step
        not before the last one followed at the same window (the loop visits every step)."""
        model = self.state.model
        same = step >= self.yarn_step and self.schedule.window_at(step) == self.yarn_windows[-1]
        self.yarn_step = step
        if not model.config.yarn or same:
            return
        path = self.schedule.window_path(step)
        if path[:len(self.yarn_windows)] != self.yarn_windows:
            model.reset_yarn()
            self.yarn_windows = path[:1]
        for old, new in zip(path[len(self.yarn_windows) - 1:], path[len(self.yarn_windows):], strict=False):
            model.extend_yarn(old, new)
        self.yarn_windows = path

    def validation_windows(self, step: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(long, short) window tensors of the validation at `step`: the step's training windows, or at
        --max-steps --final-val-windows where given (record #46: 2560 and 768 tokens). (None, None):
        full causal attention."""
        if step == self.cfg.max_steps and self.final_windows:
            return self.final_windows
        return self.val_windows.get(self.schedule.window_at(step), (None, None))

    def validate(self) -> float:
        """The mean validation loss at state.step's validation windows and YaRN state, over every rank's
        share (record #46 validates with the current step's windows and rotary)."""
        self.follow_yarn(self.state.step)
        window, short = self.validation_windows(self.state.step)
        return validation_loss(self.forward, self.val_batches(), (window, short), self.precision)

    def checkpoint(self, tag: str) -> None:
        """Save the run (collective). training/checkpoint.py refuses a state holding NaN/inf on every rank,
        writing nothing: the run stops there and the last good checkpoint stays the latest."""
        try:
            path = save_checkpoint(self.state, Path(self.cfg.out_dir) / "checkpoints", **self.checkpoint_meta)
        except CheckpointError as error:
            self.log.print(f"step {self.state.step}: {error}; stopping")
            raise SystemExit(f"error: {error}") from None
        self.log.print(f"checkpoint ({tag}): {path}")

    def flops_per_token(self, step: int) -> float:
        """Training FLOPs per token of `step`, at its sequence length and attention window."""
        now = self.schedule.at(step)
        return self.state.model.flops_per_token(self.shapes[now.tokens].seq_len, now.window)


def validation_loss(forward: torch.nn.Module, batches: Iterable, windows: tuple | torch.Tensor | None,
                    precision: Callable[[], torch.autocast]) -> float:
    """Mean loss of `forward` (in eval mode) over `batches` at `windows` (the long window, or (long,
    short) as GPT.forward takes them), averaged over ranks: every rank passes its share of the same
    number of batches. The compiled model's validation graph."""
    window, short = windows if isinstance(windows, tuple) else (windows, None)
    forward.eval()
    total, count = None, 0
    with torch.no_grad(), precision():
        for x, y in batches:
            loss = forward(x, y, window=window, short=short).float()
            total = loss if total is None else total + loss
            count += 1
    forward.train()
    return mean_over_ranks(total).item() / count
