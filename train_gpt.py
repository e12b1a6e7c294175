"""Train the speedrun GPT with the modular-duality (Muon) optimizer.

    python train_gpt.py                                   # CPU demo on an offline corpus (the default)
    python train_gpt.py --preset speedrun                 # 124M on FineWeb (needs `make data`)
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset speedrun

Every weight update goes through the duality map of its layer (optim/): Newton-Schulz
orthogonalization for hidden matrices, the embedding map (or Adam) for embeddings, Adam for the
LM head and scalars. The flags, presets, schedules and optimizer groups are training/recipe.py; the
state a checkpoint holds is training/state.py. Reads top to bottom: set-up, data, model, optimizer,
then the loop and its parts (a training step, a validation, a checkpoint).
"""

import copy
import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# Large CPU tensors (the 50304-wide logits) on transparent huge pages: the CPU demo otherwise spends
# about half its time in the kernel zeroing freshly mapped 4 KiB pages. Read when torch allocates.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from data.loader import TokenLoader, validation_batches  # noqa: E402
from data.shards import ShardError, list_shards  # noqa: E402
from data.tokenizer import TokenizerUnavailable, gpt2_encoding  # noqa: E402
from model import GPT, PRESETS  # noqa: E402
from tools.checkpoint import CheckpointError, resolve_checkpoint  # noqa: E402
from tools.runlog import RunLog, WandbSink, code_listing, environment, peak_flops  # noqa: E402
from tools.sample import sample  # noqa: E402
from training.fsdp import shard  # noqa: E402
from training.recipe import (  # noqa: E402
    BatchLayout,
    TrainConfig,
    batch_layout,
    build_optimizer,
    lr_factor,
    parse_config,
    schedule,
    window_at,
)
from training.runtime import (  # noqa: E402
    StopRequest,
    check_writable,
    close_distributed,
    init_distributed,
    mean_over_ranks,
    peak_memory,
    resolve_device,
    world_size_from_env,
)
from training.state import RunState, load_run, save_run  # noqa: E402

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


def train(cfg: TrainConfig, layout: BatchLayout, rank: int, world_size: int, device: torch.device) -> dict:
    out_dir = Path(cfg.out_dir)
    resume_from = resolve_checkpoint(cfg.resume, out_dir / "checkpoints") if cfg.resume else None
    torch.manual_seed(cfg.seed)
    if samples(rank, cfg) and cfg.sample_tokens:
        gpt2_encoding()  # fail now, not after training, if the GPT-2 vocabulary cannot be loaded

    data_dir = shard_dir(cfg, rank, world_size)
    loader = TokenLoader(list_shards(data_dir, "train"), layout.micro_batch, cfg.seq_len, rank=rank,
                         world_size=world_size, device=device)
    val_batches = partial(validation_batches, list_shards(data_dir, "val"), layout.val_batch, cfg.val_seq_len,
                          cfg.val_tokens, rank=rank, world_size=world_size, device=device)
    val_batches()  # refuses now, not at the first validation, if the val split is too short

    model_cfg = dataclasses.replace(PRESETS[cfg.model], max_seq_len=max(cfg.seq_len, cfg.val_seq_len))
    model = GPT(model_cfg).to(device)
    if cfg.fsdp:
        shard(model, device)  # training/fsdp.py: every rank keeps 1/W of each parameter's rows
    run = RunState(model, build_optimizer(model, cfg), loader)
    if resume_from is not None:
        load_run(run, resume_from, rank, world_size, dataclasses.asdict(model_cfg))
        if run.step > cfg.max_steps:
            raise SystemExit(f"error: --max-steps {cfg.max_steps}: --resume {resume_from} is at step "
                             f"{run.step}, past the end; pass --max-steps {run.step} or more")
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    forward = torch.compile(model, dynamic=False) if compiled else model

    # Everything is checked and loaded: the run starts, and only now writes its log.
    log = open_log(cfg, out_dir, rank, resumed=resume_from is not None)
    n_params = sum(p.numel() for p in model.parameters())
    log.print(f"preset {cfg.preset}: model {cfg.model} ({n_params / 1e6:.1f}M parameters), data {data_dir}")
    log.print(f"device {device}, compile {compiled}, {cfg.tokens_per_step:,} tokens/step = {world_size} "
              f"process(es) x {layout.micro_batch} sequences x {cfg.seq_len} tokens x {layout.grad_accum} "
              f"micro-batch(es)")
    if resume_from is not None:
        log.print(f"resumed from {resume_from} at step {run.step}")
    elif cfg.resume == "auto":
        log.print(f"--resume auto: no checkpoint in {out_dir / 'checkpoints'}; a new run starts at step 0")
    step = partial(train_step, forward=forward, cfg=cfg, grad_accum=layout.grad_accum, device=device)
    validate = partial(evaluate, forward, model, val_batches, device=device)
    if cfg.warmup_kernel_steps and run.step == 0:
        warm_up(run, step, validate, cfg, log)
    save = partial(save_run, run, out_dir / "checkpoints", rank, model_config=dataclasses.asdict(model_cfg),
                   config=dataclasses.asdict(cfg))
    flops_per_token = model.flops_per_token(cfg.seq_len, cfg.window_end or None)
    throughput = Throughput(cfg.tokens_per_step, world_size, flops_per_token, peak_flops(device))
    val_loss, reached_target = loop(run, step, validate, save, cfg, log, throughput, device)
    return finish(run, cfg, log, out_dir, rank, val_loss, reached_target, device)


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
    """Rank 0's log: a new run's starts with the source and the environment; a resumed run appends."""
    wandb = None
    if rank == 0 and cfg.wandb:
        wandb = WandbSink(cfg.wandb_project, cfg.run_name or None, dataclasses.asdict(cfg), out_dir)
    log = RunLog(out_dir, enabled=rank == 0, append=resumed, wandb=wandb)
    if not resumed:
        log.print(code_listing(), console=False)
        log.print(environment(), console=False)
    log.print(f"config {dataclasses.asdict(cfg)}", console=False)
    return log


# ----------------------------------------------------------------------------------------------------
# Training loop


def loop(run: RunState, step, validate, save, cfg: TrainConfig, log: RunLog, throughput: "Throughput",
         device: torch.device) -> tuple[float, bool]:
    """Train from run.step to cfg.max_steps, validating on schedule; (last val_loss, target reached)."""
    stop = StopRequest()
    start_step, val_loss = run.step, float("nan")
    try:
        while run.step <= cfg.max_steps:
            if stop.agreed(device):
                log.print(f"{stop.signal_name or 'stop'} received: saving and exiting at step {run.step}")
                checkpoint(run, save, log, "on signal")
                return val_loss, False
            if run.step == cfg.max_steps or (cfg.val_every and run.step % cfg.val_every == 0):
                val_loss = validate(window_at(run.step, cfg))
                log.print(f"step {run.step}/{cfg.max_steps} val_loss {val_loss:.4f} "
                          f"train_time {run.train_time:.1f}s")
                log.metrics(step=run.step, val_loss=val_loss, train_time_s=run.train_time)
                if cfg.target_val_loss and val_loss <= cfg.target_val_loss:
                    log.print(f"target val_loss {cfg.target_val_loss} reached at step {run.step} after "
                              f"{run.train_time:.2f}s of training")
                    return val_loss, True
            if run.step == cfg.max_steps:
                return val_loss, False

            train_loss, step_s = timed(step, run, device)
            run.step, run.train_time = run.step + 1, run.train_time + step_s
            if not math.isfinite(train_loss):
                stop_diverged(run, log, f"train loss is {train_loss}",
                              f"non-finite train loss ({train_loss})")
            if (run.step - 1) % cfg.log_every == 0 or run.step == cfg.max_steps:
                log_step(run, cfg, log, train_loss, throughput.of(step_s))
            if cfg.save_every and run.step % cfg.save_every == 0:
                checkpoint(run, save, log, "periodic")
            if cfg.exit_after_steps and run.step - start_step == cfg.exit_after_steps:
                checkpoint(run, save, log, f"--exit-after-steps {cfg.exit_after_steps}")
                log.print(f"exiting after {cfg.exit_after_steps} steps; continue with --resume auto")
                return val_loss, False
        return val_loss, False
    finally:
        stop.restore()


def train_step(run: RunState, forward, cfg: TrainConfig, grad_accum: int,
               device: torch.device) -> torch.Tensor:
    """One optimizer step (all micro-batches) at run.step; the loss averaged over ranks and micro-batches."""
    schedule(run.optimizer, run.step, cfg)
    window = window_at(run.step, cfg)
    train_loss = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        x, y = run.loader.next_batch()
        with mixed_precision(device):
            loss = forward(x, y, window=window) / grad_accum
        # Under torchrun the optimizer averages gradients over ranks itself, sending each bucket
        # during the last backward as soon as it is complete (optim/distributed.py).
        with run.optimizer.sync_gradients(enabled=micro_step == grad_accum - 1):
            loss.backward()
        train_loss += loss.detach()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return mean_over_ranks(train_loss)


def timed(step, run: RunState, device: torch.device) -> tuple[float, float]:
    """(train loss, seconds) of one training step; the clock covers only the step's work on the device."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_loss = step(run).item()  # also a host sync: the step is finished on the device
    return train_loss, time.perf_counter() - t0


def evaluate(forward, model: GPT, val_batches, window: int | None, device: torch.device) -> float:
    """Mean loss over the fixed validation batches (every rank its share, averaged over ranks)."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    with torch.no_grad(), mixed_precision(device):
        for x, y in val_batches():
            total += forward(x, y, window=window).float()
            count += 1
    model.train()
    return mean_over_ranks(total).item() / count


def mixed_precision(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def warm_up(run: RunState, step, validate, cfg: TrainConfig, log: RunLog) -> None:
    """Compile and warm the kernels on real steps and a validation, then put the whole state back:
    the timed run starts from exactly the state it would have had without warm-up."""
    saved = copy.deepcopy(run.state_dict())
    t0 = time.perf_counter()
    for _ in range(cfg.warmup_kernel_steps):
        step(run)
        run.step += 1
    validate(window_at(0, cfg))
    run.load_state_dict(saved)
    log.print(f"warm-up: {cfg.warmup_kernel_steps} steps + 1 validation in "
              f"{time.perf_counter() - t0:.1f}s (untimed, state restored)")


def checkpoint(run: RunState, save, log: RunLog, tag: str) -> None:
    """Save the run. tools/checkpoint.py refuses a state holding NaN/inf on every rank, writing nothing:
    the run stops there and the last good checkpoint stays the latest."""
    try:
        path = save()
    except CheckpointError as error:
        log.print(f"step {run.step}: {error}; stopping")
        raise SystemExit(f"error: {error}") from None
    log.print(f"checkpoint ({tag}): {path}")


def stop_diverged(run: RunState, log: RunLog, what: str, error: str) -> None:
    log.print(f"step {run.step}: {what}; stopping. The last good checkpoint is kept in "
              f"{log.out_dir / 'checkpoints'} (lower the learning rates, or resume with --resume auto)")
    raise SystemExit(f"error: {error} at step {run.step}")


@dataclass(frozen=True)
class Throughput:
    """Tokens/s and MFU (model FLOPs over the devices' dense bf16 peak, where known) of a step."""

    tokens_per_step: int
    world_size: int
    flops_per_token: float
    peak_flops: float | None

    def of(self, step_s: float) -> dict:
        tokens_per_s = self.tokens_per_step / step_s
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)
        return dict(step_ms=1000 * step_s, tokens_per_s=tokens_per_s,
                    tokens_per_s_per_device=tokens_per_s / self.world_size, mfu=mfu)


def log_step(run: RunState, cfg: TrainConfig, log: RunLog, train_loss: float, speed: dict) -> None:
    factor = lr_factor(run.step - 1, cfg)
    mfu = f" MFU {100 * speed['mfu']:.1f}%" if speed["mfu"] else ""
    log.print(f"step {run.step}/{cfg.max_steps} train_loss {train_loss:.4f} lr {factor:.3f}x "
              f"step {speed['step_ms']:.0f}ms {speed['tokens_per_s']:,.0f} tok/s "
              f"({speed['tokens_per_s_per_device']:,.0f}/device){mfu}")
    log.metrics(step=run.step, train_loss=train_loss, lr=factor * cfg.lr, **speed,
                tokens=run.step * cfg.tokens_per_step, train_time_s=run.train_time)


def samples(rank: int, cfg: TrainConfig) -> bool:
    """Whether this rank generates the final sample: rank 0, or every rank under --fsdp, whose forward
    needs all of them (the same seed gives each the same text; rank 0 prints it)."""
    return rank == 0 or cfg.fsdp


def finish(run: RunState, cfg: TrainConfig, log: RunLog, out_dir: Path, rank: int, val_loss: float,
           reached_target: bool, device: torch.device) -> dict:
    """The summary line, a sample and the loss plot (rank 0), and in record mode the record log."""
    log.print(f"done: step {run.step}/{cfg.max_steps}, val_loss {val_loss:.4f}, "
              f"training time {run.train_time:.1f}s, peak memory {peak_memory(device)}")
    if samples(rank, cfg) and cfg.sample_tokens and run.step == cfg.max_steps:
        log.print("sample: " + sample(run.model.eval(), cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed))
    if rank == 0 and cfg.plot:
        from tools.plot import plot_runs

        log.print(f"loss plot: {plot_runs([out_dir], out_dir / 'loss.png')}")
    log.close()
    if rank == 0 and cfg.target_val_loss:
        record = Path("records") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset}.txt"
        record.parent.mkdir(exist_ok=True)
        shutil.copyfile(out_dir / "log.txt", record)
        print(f"record log: {record} (target {'reached' if reached_target else 'NOT reached'})")
    return {"val_loss": val_loss, "train_time_s": run.train_time, "step": run.step}


# Errors whose message says what was wrong and how to fix it, in one line: bad data, no vocabulary,
# a checkpoint that cannot be read or written.
ONE_LINE_ERRORS = (ShardError, TokenizerUnavailable, CheckpointError)


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse the flags, train. A run that cannot start or go on ends with one line on
    stderr and exit code 1 (a ONE_LINE_ERRORS error, or a SystemExit carrying its message)."""
    try:
        main(parse_config(argv, description=__doc__))
    except ONE_LINE_ERRORS as error:
        exit_with(f"error: {error}")
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise
        exit_with(stop.code)


def exit_with(line: str) -> None:
    # One write of the whole line: under torchrun every rank may say it at once on a shared stderr,
    # and the interpreter's own report of SystemExit(str) writes the message and its newline apart.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    raise SystemExit(1) from None


if __name__ == "__main__":
    cli()
