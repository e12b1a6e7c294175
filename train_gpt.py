"""Train the speedrun GPT with the modular-duality (Muon) optimizer.

    python train_gpt.py                                   # CPU demo on an offline corpus (the default)
    python train_gpt.py --preset speedrun                 # 124M on FineWeb (needs `make data`)
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset speedrun

Every weight update goes through the duality map of its layer (optim/): Newton-Schulz
orthogonalization for hidden matrices, the embedding map (or Adam) for embeddings, Adam for the
LM head and scalars. The flags, presets and optimizer groups are training/recipe.py, the schedule
training/schedule.py; the state a checkpoint holds is training/state.py. Reads top to bottom: set-up,
data, model, optimizer, then the loop and its parts (a training step, a validation, a checkpoint).
"""

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

# Large CPU tensors (the 50304-wide logits) on transparent huge pages: the CPU demo otherwise spends
# about half its time in the kernel zeroing freshly mapped 4 KiB pages. Read when torch allocates.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# CUDA's caching allocator grows segments in place instead of stranding memory between the
# training (48k-token) and validation (256k-token) shapes, as the record runs. Read by torch's CUDA
# allocator when it starts, so set before torch is imported; a value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from data.durable import write_text_atomic  # noqa: E402
from data.loader import TokenLoader, validation_batches  # noqa: E402
from data.shards import ShardError, fingerprint, list_shards  # noqa: E402
from data.tokenizer import TokenizerUnavailable, gpt2_encoding  # noqa: E402
from model import GPT, PRESETS  # noqa: E402
from training.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from training.compiling import GraphCount, compile_model, graphs_compiled  # noqa: E402
from training.fsdp import shard  # noqa: E402
from training.recipe import (  # noqa: E402
    BatchLayout,
    TrainConfig,
    batch_layout,
    build_optimizer,
    parse_config,
    plan_changes,
)
from training.rundir import claim_out_dir  # noqa: E402
from training.runlog import RunLog, WandbSink, code_listing, environment, peak_flops  # noqa: E402
from training.runtime import (  # noqa: E402
    StopRequest,
    Stopwatch,
    agree,
    autocast_dtype,
    check_writable,
    close_distributed,
    init_distributed,
    peak_memory,
    peak_memory_gib,
    resolve_device,
    shorten_collective_timeout,
    wait_for_all_ranks,
    world_size_from_env,
)
from training.sampling import Sampling, sample  # noqa: E402
from training.schedule import Schedule  # noqa: E402
from training.state import RunState  # noqa: E402
from training.steps import evaluate, train_step  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Set-up, data, model, optimizer


def main(cfg: TrainConfig) -> dict:
    """Train; returns {"val_loss", "train_time_s", "step"}. Collective under torchrun.

    What can be checked before any process group or file exists is checked first, each failure one line.
    """
    layout = batch_layout(cfg, world_size_from_env())
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or f"out/{cfg.preset}")
    check_writable(Path(cfg.out_dir), "--out-dir")
    check_writable(Path(cfg.out_dir) / "checkpoints", "the checkpoint folder of --out-dir")
    device = resolve_device(cfg.device)
    rank, world_size, device = init_distributed(device, group_of_one=cfg.fsdp)
    try:
        return train(cfg, layout, rank, world_size, device)
    finally:
        close_distributed()


class Setup(NamedTuple):
    """What a run builds and checks before it claims its --out-dir."""

    run: RunState
    resume_from: Path | None
    data_dir: Path
    val_batches: Callable
    model_config: dict
    data: str  # the shards' fingerprint (data.shards.fingerprint), saved with every checkpoint
    plan_changes: list[str]  # what --resume-changed-ok let this run change from the checkpoint's plan


def train(cfg: TrainConfig, layout: BatchLayout, rank: int, world_size: int, device: torch.device) -> dict:
    setup = set_up(cfg, layout, rank, world_size, device)
    # Everything is checked and loaded: the run claims its folder (training/rundir.py), and only then
    # writes in it.
    with claim_out_dir(Path(cfg.out_dir), rank, resuming=bool(cfg.resume)):
        return run_training(cfg, layout, setup, rank, world_size, device)


def set_up(cfg: TrainConfig, layout: BatchLayout, rank: int, world_size: int, device: torch.device) -> Setup:
    """The data, the model and its optimizer, loaded from --resume if given; each failure one line."""
    resume_from = resolve_checkpoint(cfg.resume, Path(cfg.out_dir) / "checkpoints") if cfg.resume else None
    torch.manual_seed(cfg.seed)
    if samples(rank, cfg) and cfg.sample_tokens:
        gpt2_encoding()  # fail now, not after training, if the GPT-2 vocabulary cannot be loaded

    data_dir = shard_dir(cfg, rank, world_size)
    train_shards, val_shards = list_shards(data_dir, "train"), list_shards(data_dir, "val")
    loader = TokenLoader(train_shards, layout.micro_batch, cfg.seq_len, rank=rank, world_size=world_size,
                         device=device, align_to_bos=cfg.align_to_bos)
    if world_size * layout.micro_batch * cfg.seq_len >= loader.num_tokens:  # one read, larger than the data
        raise SystemExit(f"error: a micro-batch of {world_size} process(es) x {layout.micro_batch:,} "
                         f"sequences x --seq-len {cfg.seq_len} tokens is more than the {loader.num_tokens:,} "
                         f"train tokens in {data_dir}; lower --batch-size or --tokens-per-step")
    val_batches = partial(validation_batches, val_shards, layout.val_batch, cfg.val_seq_len, cfg.val_tokens,
                          rank=rank, world_size=world_size, device=device)
    val_batches()  # refuses now, not at the first validation, if the val split is too short

    model_cfg = dataclasses.replace(PRESETS[cfg.model], max_seq_len=max(cfg.seq_len, cfg.val_seq_len))
    model = GPT(model_cfg)
    if cfg.fsdp:  # training/fsdp.py: every rank keeps 1/W of each parameter's rows, float32
        shard(model.to(device), device)
    else:
        model.to_device(device)  # on CUDA, the embedding tables in the preset's dtype
    run, changes = RunState(model, build_optimizer(model, cfg), loader), []
    data = fingerprint(train_shards + val_shards)
    if resume_from is not None:
        saved = load_checkpoint(run, resume_from, dataclasses.asdict(model_cfg))
        if run.step > cfg.max_steps:
            raise SystemExit(f"error: --max-steps {cfg.max_steps}: --resume {resume_from} is at step "
                             f"{run.step}, past the end; pass --max-steps {run.step} or more")
        changes = check_plan(cfg, saved, data, resume_from)
    return Setup(run, resume_from, data_dir, val_batches, dataclasses.asdict(model_cfg), data, changes)


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


def run_training(cfg: TrainConfig, layout: BatchLayout, setup: Setup, rank: int, world_size: int,
                 device: torch.device) -> dict:
    """Warm up, train, finish: the run, in its claimed folder."""
    out_dir, run, model = Path(cfg.out_dir), setup.run, setup.run.model
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    forward, graphs = compile_model(model, cfg.compile_backend) if compiled else (model, None)
    autocast = autocast_dtype(model, device)

    log = open_log(cfg, out_dir, rank, resumed=setup.resume_from is not None)
    n_params = sum(p.numel() for p in model.parameters())
    log.print(f"preset {cfg.preset}: model {cfg.model} ({n_params / 1e6:.1f}M parameters), "
              f"data {setup.data_dir}")
    head = "fp8" if model.lm_head.matmul(device) == "fp8" else autocast or model.embed.weight.dtype
    log.print(f"device {device}, compile {cfg.compile_backend if compiled else 'off'}, residual stream "
              f"{model.embed.weight.dtype}, autocast {autocast or 'off'}, LM head matmul {head} in training")
    log.print(f"{cfg.tokens_per_step:,} tokens/step = {world_size} process(es) x {layout.micro_batch} "
              f"sequences x {cfg.seq_len} tokens x {layout.grad_accum} micro-batch(es)")
    if setup.resume_from is not None:
        changed = f", with --resume-changed-ok: {'; '.join(setup.plan_changes)}" if setup.plan_changes else ""
        log.print(f"resumed from {setup.resume_from} at step {run.step}{changed}")
    elif cfg.resume == "auto":
        log.print(f"--resume auto: no checkpoint in {out_dir / 'checkpoints'}; a new run starts at step 0")
    schedule = Schedule.of(cfg, device)
    precision = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=autocast is not None)
    step = partial(train_step, forward=forward, schedule=schedule, grad_accum=layout.grad_accum,
                   precision=precision)
    validate = partial(evaluate, forward, model, setup.val_batches, schedule=schedule, precision=precision)
    save = partial(save_checkpoint, run, out_dir / "checkpoints", model_config=setup.model_config,
                   config=dataclasses.asdict(cfg), data=setup.data)
    throughput = Throughput(cfg.tokens_per_step, world_size,
                            partial(flops_per_token, model, cfg.seq_len, schedule), peak_flops(device))
    val_loss, reached_target, timed_from = warm_up_and_loop(run, step, validate, save, cfg, log, throughput,
                                                            device)
    summary = run_summary(run, timed_from, throughput, graphs, device)
    return finish(run, cfg, log, out_dir, rank, val_loss, reached_target, summary, device)


def shard_dir(cfg: TrainConfig, rank: int, world_size: int) -> Path:
    """--data-dir, or the offline demo corpus (built once, by rank 0; the other ranks then find it)."""
    if cfg.data_dir is not None:
        return Path(cfg.data_dir)
    from data.demo import demo_shards

    if rank == 0:
        demo_shards()
    if world_size > 1:
        torch.distributed.barrier()
    return demo_shards()


def open_log(cfg: TrainConfig, out_dir: Path, rank: int, resumed: bool) -> RunLog:
    """Rank 0's log: a new run's starts with the source and the environment. Always appended to: a run
    that does not resume has a folder without logs (claim_out_dir), and one that resumes keeps them."""
    wandb = None
    if rank == 0 and cfg.wandb:
        wandb = WandbSink(cfg.wandb_project, cfg.run_name or None, dataclasses.asdict(cfg), out_dir)
    log = RunLog(out_dir, enabled=rank == 0, append=True, wandb=wandb)
    if not resumed:
        log.print(code_listing(), console=False)
        log.print(environment(), console=False)
    log.print(f"config {dataclasses.asdict(cfg)}", console=False)
    return log


# ----------------------------------------------------------------------------------------------------
# Training loop


def warm_up_and_loop(run: RunState, step, validate, save, cfg: TrainConfig, log: RunLog,
                     throughput: "Throughput", device: torch.device) -> tuple[float, bool, "TimedRun"]:
    """The warm-up, then the loop: (last val_loss, target reached, where the timed run began).

    One StopRequest covers both, so SIGTERM or Ctrl-C during the warm-up (minutes of compilation) saves
    and exits as it does in the loop. The loop runs with the short collective timeout where nothing is
    left to compile (after a warm-up; on CPU without --compile on); a compiled run without warm-up keeps
    the long one. A run that runs out of memory before its first step puts its log
    files back as they were (RunLog.discard): it never started.
    """
    stop, first = StopRequest(), run.step
    warming_up = bool(cfg.warmup_kernel_steps and run.step < cfg.max_steps)
    try:
        if warming_up and warm_up(run, step, validate, cfg, log, device, stop):
            stop_on_signal(run, save, log, stop, " during the warm-up")
            return float("nan"), False, TimedRun(run.step, run.train_time, graphs_compiled())
        if warming_up or (device.type != "cuda" and cfg.compile != "on"):  # nothing left to compile
            shorten_collective_timeout(cfg.collective_timeout_s)
        timed_from = TimedRun(run.step, run.train_time, graphs_compiled())
        return *loop(run, step, validate, save, cfg, log, throughput, device, stop), timed_from
    except torch.OutOfMemoryError:
        if run.step == first:
            log.discard()
        raise
    finally:
        stop.restore()


def stop_on_signal(run: RunState, save, log: RunLog, stop: StopRequest, when: str = "") -> None:
    log.print(f"{stop.signal_name or 'stop'} received{when}: saving and exiting at step {run.step}")
    checkpoint(run, save, log, "on signal")


def loop(run: RunState, step, validate, save, cfg: TrainConfig, log: RunLog, throughput: "Throughput",
         device: torch.device, stop: StopRequest) -> tuple[float, bool]:
    """Train from run.step to cfg.max_steps, validating on schedule; (last val_loss, target reached).

    Steps run in stretches, each ending at a logged step, a validation, a checkpoint or the end
    (`stretch_ends`). Inside a stretch nothing waits for the device; at its end the clock stops on a
    device sync, and the step's loss and any rank's stop signal are read with one collective and one
    host read. The loss is checked there (Divergence): a NaN or inf loss leaves NaN in the weights, so
    the next check sees it too.
    """
    clock, diverged = Stopwatch(device), Divergence(run.model.config.vocab_size)
    start_step, val_loss = run.step, float("nan")
    while True:
        if validation_due(run.step, cfg):
            val_loss = validate(run.step)
            log.print(f"step {run.step}/{cfg.max_steps} val_loss {val_loss:.4f} "
                      f"train_time {run.train_time:.1f}s")
            log.metrics(step=run.step, val_loss=val_loss, train_time_s=run.train_time)
            if cfg.target_val_loss and val_loss <= cfg.target_val_loss:
                log.print(f"target val_loss {cfg.target_val_loss} reached at step {run.step} after "
                          f"{run.train_time:.2f}s of training")
                return val_loss, True
        if run.step == cfg.max_steps:
            return val_loss, False

        first = run.step
        clock.start()
        while True:
            loss = step(run)
            run.step += 1
            if stretch_ends(run.step, cfg, start_step):
                break
        seconds = clock.stop()
        run.train_time += seconds
        train_loss, stopping = agree(loss, stop.requested)
        diverged(run, log, train_loss)
        if logged(run.step, cfg):
            log_step(run, cfg, log, train_loss, throughput.of(range(first, run.step), seconds))
        if stopping:
            stop_on_signal(run, save, log, stop)
            return val_loss, False
        if cfg.save_every and run.step % cfg.save_every == 0:
            checkpoint(run, save, log, "periodic")
        if cfg.exit_after_steps and run.step - start_step == cfg.exit_after_steps:
            checkpoint(run, save, log, f"--exit-after-steps {cfg.exit_after_steps}")
            log.print(f"exiting after {cfg.exit_after_steps} steps; continue with --resume auto")
            return val_loss, False


def validation_due(step: int, cfg: TrainConfig) -> bool:
    return step == cfg.max_steps or bool(cfg.val_every and step % cfg.val_every == 0)


def logged(step: int, cfg: TrainConfig) -> bool:
    """Whether the train loss of `step` (steps done) is logged: the first of every log_every, and the last."""
    return (step - 1) % cfg.log_every == 0 or step == cfg.max_steps


def stretch_ends(step: int, cfg: TrainConfig, start_step: int) -> bool:
    """Whether the loop stops the clock after `step` steps: to log, validate, save, exit or finish."""
    saving = bool(cfg.save_every and step % cfg.save_every == 0)
    exiting = bool(cfg.exit_after_steps and step - start_step == cfg.exit_after_steps)
    return logged(step, cfg) or validation_due(step, cfg) or saving or exiting


def warm_up(run: RunState, step, validate, cfg: TrainConfig, log: RunLog, device: torch.device,
            stop: StopRequest) -> bool:
    """Compile and warm every graph the run uses, on real steps and a validation at the run's current
    step, then put the whole state back: the timed run starts from exactly the state it would have
    had without warm-up. With the window a tensor, that is one training and one validation graph.

    Returns whether a rank was asked to stop: the ranks agree on it after each warm-up step (one
    all-reduce and one host read each, outside the timed run), and then stop warming up.
    """
    saved = copy.deepcopy(run.state_dict())
    t0, stopping = time.perf_counter(), False
    for _ in range(cfg.warmup_kernel_steps):
        _, stopping = agree(step(run), stop.requested)
        if stopping:
            break
    if not stopping:
        validate(run.step)
    run.load_state_dict(saved)
    wait_for_all_ranks(device)  # the timed run starts together on every rank
    if not stopping:
        log.print(f"warm-up: {cfg.warmup_kernel_steps} steps + 1 validation in "
                  f"{time.perf_counter() - t0:.1f}s (untimed, state restored)")
    return stopping


def checkpoint(run: RunState, save, log: RunLog, tag: str) -> None:
    """Save the run. training/checkpoint.py refuses a state holding NaN/inf on every rank, writing nothing:
    the run stops there and the last good checkpoint stays the latest."""
    try:
        path = save()
    except CheckpointError as error:
        log.print(f"step {run.step}: {error}; stopping")
        raise SystemExit(f"error: {error}") from None
    log.print(f"checkpoint ({tag}): {path}")


class Divergence:
    """Stops a run whose train loss is NaN or inf, or has stayed above FACTOR x ln(vocabulary) at CHECKS
    reads in a row. The loop reads the loss only where it stops the clock (each logged step, and before
    a validation or a checkpoint), so the window is CHECKS reads: up to (CHECKS - 1) x --log-every + 1
    steps. ln(vocabulary), ~10.83 for GPT-2's, is the loss of a uniform guess, where every run starts
    (the LM head is zero-initialized); a loss 50% above it for that long is a divergence, not noise."""

    FACTOR, CHECKS = 1.5, 3

    def __init__(self, vocab_size: int):
        self.limit = self.FACTOR * math.log(vocab_size)
        self.above = 0  # reads in a row above the limit

    def __call__(self, run: RunState, log: RunLog, loss: float) -> None:
        if not math.isfinite(loss):
            stop_diverged(run, log, f"train loss is {loss}", f"non-finite train loss ({loss})")
        self.above = self.above + 1 if loss > self.limit else 0
        if self.above == self.CHECKS:
            what = (f"train loss {loss:.2f} above {self.limit:.2f} ({self.FACTOR} x ln(vocabulary), the loss "
                    f"of a uniform guess) at {self.CHECKS} reads in a row")
            stop_diverged(run, log, what, f"the run diverged: {what}")


def stop_diverged(run: RunState, log: RunLog, what: str, error: str) -> None:
    log.print(f"step {run.step}: {what}; stopping. The last good checkpoint is kept in "
              f"{log.out_dir / 'checkpoints'} (lower the learning rates, or resume with --resume auto)")
    raise SystemExit(f"error: {error} at step {run.step}")


def flops_per_token(model: GPT, seq_len: int, schedule: Schedule, step: int) -> float:
    """Training FLOPs per token of `step`, at its attention window."""
    return model.flops_per_token(seq_len, schedule.at(step).window)


@dataclass(frozen=True)
class Throughput:
    """Tokens/s and MFU (model FLOPs over the devices' dense bf16 peak, where known) of a stretch of steps."""

    tokens_per_step: int
    world_size: int
    flops_per_token: Callable[[int], float]  # of a step
    peak_flops: float | None

    def of(self, steps: range, seconds: float) -> dict:
        tokens_per_s = self.tokens_per_step * len(steps) / seconds
        mfu = None
        if self.peak_flops:
            flops = self.tokens_per_step * sum(self.flops_per_token(s) for s in steps)
            mfu = flops / seconds / (self.peak_flops * self.world_size)
        return dict(step_ms=1000 * seconds / len(steps), tokens_per_s=tokens_per_s,
                    tokens_per_s_per_device=tokens_per_s / self.world_size, mfu=mfu)


def log_step(run: RunState, cfg: TrainConfig, log: RunLog, train_loss: float, speed: dict) -> None:
    factor = Schedule.of(cfg).lr_factor(run.step - 1)
    mfu = f" MFU {100 * speed['mfu']:.1f}%" if speed["mfu"] else ""
    log.print(f"step {run.step}/{cfg.max_steps} train_loss {train_loss:.4f} lr {factor:.3f}x "
              f"step {speed['step_ms']:.0f}ms {speed['tokens_per_s']:,.0f} tok/s "
              f"({speed['tokens_per_s_per_device']:,.0f}/device){mfu}")
    log.metrics(step=run.step, train_loss=train_loss, lr=factor * cfg.lr, **speed,
                tokens=run.step * cfg.tokens_per_step, train_time_s=run.train_time)


class TimedRun(NamedTuple):
    """Where the timed run began: its first step, the train time then, the graphs compiled by then
    (graphs_compiled: the model's and any other compiled function's)."""

    step: int
    train_time: float
    graphs: int


def run_summary(run: RunState, timed_from: TimedRun, throughput: Throughput, graphs: GraphCount | None,
                device: torch.device) -> dict:
    """The timed run's figures: speed over all its steps, peak memory, and the graphs compiled (if any)."""
    summary = dict(step=run.step, train_time_s=run.train_time, peak_memory_gib=peak_memory_gib(device),
                   graphs_in_timed_run=graphs_compiled() - timed_from.graphs)
    if run.step > timed_from.step:
        summary |= throughput.of(range(timed_from.step, run.step), run.train_time - timed_from.train_time)
    if graphs is not None:
        summary |= dict(graphs_training=graphs.training, graphs_validation=graphs.validation)
    return summary


def samples(rank: int, cfg: TrainConfig) -> bool:
    """Whether this rank generates the final sample: rank 0, or every rank under --fsdp, whose forward
    needs all of them (the same seed gives each the same text; rank 0 prints it)."""
    return rank == 0 or cfg.fsdp


def finish(run: RunState, cfg: TrainConfig, log: RunLog, out_dir: Path, rank: int, val_loss: float,
           reached_target: bool, summary: dict, device: torch.device) -> dict:
    """The summary (log lines and, on rank 0, summary.json), a sample and the loss plot (rank 0), and in
    record mode the record log."""
    log.print(f"done: step {run.step}/{cfg.max_steps}, val_loss {val_loss:.4f}, "
              f"training time {run.train_time:.1f}s, peak memory {peak_memory(device)}")
    if "graphs_training" in summary:
        log.print(f"compiled model graphs: training {summary['graphs_training']}, validation "
                  f"{summary['graphs_validation']}")
    log.print(f"graphs compiled in the timed run: {summary['graphs_in_timed_run']}")
    if rank == 0:
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    if samples(rank, cfg) and cfg.sample_tokens and run.step == cfg.max_steps:
        text = sample(run.model.eval(), cfg.sample_prompt, cfg.sample_tokens, Sampling(seed=cfg.seed))
        log.print("sample: " + text)
    if rank == 0 and cfg.plot:
        log.print(loss_plot(out_dir))
    log.close()
    if rank == 0 and cfg.target_val_loss:
        record = Path("records") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset}.txt"
        record.parent.mkdir(exist_ok=True)
        shutil.copyfile(out_dir / "log.txt", record)
        print(f"record log: {record} (target {'reached' if reached_target else 'NOT reached'})")
    return {"val_loss": val_loss, "train_time_s": run.train_time, "step": run.step}


def loss_plot(out_dir: Path) -> str:
    """Write out_dir/loss.png; the line saying where, or the one warning that a missing matplotlib
    costs the plot (never the run: the plot is drawn after training)."""
    from training.plot import plot_runs

    try:
        return f"loss plot: {plot_runs([out_dir], out_dir / 'loss.png')}"
    except ImportError as error:
        return f"warning: no loss plot ({error}); pip install matplotlib, or pass --no-plot"


# Errors whose message says what was wrong and how to fix it, in one line: bad data, no vocabulary,
# a checkpoint that cannot be read or written.
ONE_LINE_ERRORS = (ShardError, TokenizerUnavailable, CheckpointError)


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse the flags, train. A run that cannot start or go on ends with one line on
    stderr and exit code 1: a ONE_LINE_ERRORS error, a SystemExit carrying its message, running out of
    memory, or a collective that failed because another rank died or stopped answering."""
    try:
        main(parse_config(argv, description=__doc__))
    except ONE_LINE_ERRORS as error:
        exit_with(f"error: {error}")
    except (torch.OutOfMemoryError, MemoryError) as error:
        exit_with(f"error: {first_sentences(error, 2)}; lower --batch-size (sequences per micro-batch) or "
                  f"--seq-len")
    except RuntimeError as error:
        if not (isinstance(error, torch.distributed.DistError) or "/gloo/" in str(error)):
            raise
        exit_with(f"error: rank {os.environ.get('RANK', 0)}: a collective failed ({first_sentences(error)}); "
                  f"another process died or stopped answering: its own output, or torchrun's report, says "
                  f"why; continue with --resume auto")
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise
        exit_with(stop.code)


def first_sentences(error: Exception, count: int = 1) -> str:
    """The first `count` sentences of an error's first line, without a "[file.cc:123] " source prefix."""
    line = (str(error).splitlines() or [type(error).__name__])[0]
    return ". ".join(line.split("] ", 1)[-1].split(". ")[:count])[:200]


def exit_with(line: str) -> None:
    # One write of the whole line: under torchrun every rank may say it at once on a shared stderr,
    # and the interpreter's own report of SystemExit(str) writes the message and its newline apart.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    raise SystemExit(1) from None


if __name__ == "__main__":
    cli()
