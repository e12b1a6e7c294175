"""Train the speedrun GPT with the modular-duality (Muon) optimizer.

    python train_gpt.py                                   # CPU demo on an offline corpus (the default)
    python train_gpt.py --preset speedrun                 # 124M on FineWeb (needs `make data`)
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset speedrun

Every weight update goes through the duality map of its layer (optim/): Newton-Schulz
orthogonalization for hidden matrices, the embedding map (or Adam) for embeddings, Adam for the
LM head and scalars. Reads top to bottom: config, set-up, data, model, optimizer, training loop.
"""

import copy
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path

# Large CPU tensors (the 50304-wide logits) on transparent huge pages: the CPU demo otherwise spends
# about half its time in the kernel zeroing freshly mapped 4 KiB pages. Read when torch allocates.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from data.loader import TokenLoader, validation_batches  # noqa: E402
from data.shards import ShardError, list_shards  # noqa: E402
from data.tokenizer import TokenizerUnavailable, gpt2_encoding  # noqa: E402
from model import GPT, PRESETS  # noqa: E402
from tools.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint  # noqa: E402
from tools.runlog import RunLog, WandbSink, code_listing, environment, peak_flops  # noqa: E402
from tools.sample import sample  # noqa: E402
from training.recipe import TrainConfig, build_optimizer, lr_factor, momentum_at, parse_config, window_at  # noqa: E402
from training.runtime import StopRequest, init_distributed, peak_memory, resolve_device  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Set-up


def main(cfg: TrainConfig) -> dict:
    """Train; returns {"val_loss", "train_time_s", "step"}. Collective under torchrun."""
    device = resolve_device(cfg.device)
    rank, world_size, device = init_distributed(device)
    try:
        return train(cfg, rank, world_size, device)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> dict:
    master = rank == 0
    out_dir = Path(cfg.out_dir or f"out/{cfg.preset}")
    checkpoint_dir = out_dir / "checkpoints"
    resume_from = resolve_checkpoint(cfg.resume, checkpoint_dir) if cfg.resume else None
    wandb = None
    if master and cfg.wandb:
        wandb = WandbSink(cfg.wandb_project, cfg.run_name or None, dataclasses.asdict(cfg), out_dir)
    log = RunLog(out_dir, enabled=master, append=resume_from is not None, wandb=wandb)
    torch.manual_seed(cfg.seed)

    if master and cfg.sample_tokens:
        gpt2_encoding()  # fail now, not after training, if the GPT-2 vocabulary cannot be loaded

    micro_tokens = world_size * cfg.batch_size * cfg.seq_len
    if cfg.tokens_per_step % micro_tokens:
        raise SystemExit(f"--tokens-per-step {cfg.tokens_per_step} must be a multiple of world_size x "
                         f"--batch-size x --seq-len = {world_size} x {cfg.batch_size} x {cfg.seq_len}")
    grad_accum = cfg.tokens_per_step // micro_tokens
    val_micro_tokens = world_size * cfg.batch_size * cfg.val_seq_len
    if cfg.val_tokens % val_micro_tokens:
        raise SystemExit(f"--val-tokens {cfg.val_tokens} must be a multiple of world_size x --batch-size x "
                         f"--val-seq-len = {world_size} x {cfg.batch_size} x {cfg.val_seq_len}")

    # ------------------------------------------------------------------------------------------------
    # Data

    if cfg.data_dir is None:
        from data.demo import demo_shards

        if master:
            demo_shards()  # built once, by rank 0; the other ranks then find it complete
        if world_size > 1:
            dist.barrier()
        data_dir = demo_shards()
    else:
        data_dir = Path(cfg.data_dir)
    train_files, val_files = list_shards(data_dir, "train"), list_shards(data_dir, "val")
    loader = TokenLoader(train_files, cfg.batch_size, cfg.seq_len, rank=rank, world_size=world_size,
                         device=device)
    validation_batches(val_files, cfg.batch_size, cfg.val_seq_len, cfg.val_tokens, rank=rank,
                       world_size=world_size)  # refuses now, not at the first validation, if too short

    # ------------------------------------------------------------------------------------------------
    # Model and optimizer

    model_cfg = dataclasses.replace(PRESETS[cfg.model], max_seq_len=max(cfg.seq_len, cfg.val_seq_len))
    model = GPT(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    forward = torch.compile(model, dynamic=False) if use_compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    progress = {"step": 0, "train_time": 0.0}  # steps done, seconds spent in training steps
    if resume_from is not None:
        shared, own = load_checkpoint(resume_from, rank, world_size)
        if shared["model_config"] != dataclasses.asdict(model_cfg):
            raise SystemExit(f"--resume {resume_from}: saved for model {shared['model_config']}, but this "
                             f"run builds {dataclasses.asdict(model_cfg)}; use the run's original flags")
        model.load_state_dict(shared["model"])
        optimizer.load_state_dict(own["optimizer"])
        loader.load_state_dict(shared["loader"])
        torch.set_rng_state(own["rng"])
        progress = {"step": shared["step"], "train_time": shared["train_time"]}

    def save(tag: str) -> None:
        shared = dict(model=model.state_dict(), model_config=dataclasses.asdict(model_cfg),
                      config=dataclasses.asdict(cfg), loader=loader.state_dict(), **progress)
        own = dict(optimizer=optimizer.state_dict(), rng=torch.get_rng_state())
        path = save_checkpoint(checkpoint_dir, progress["step"], shared, own, rank)
        log.print(f"checkpoint ({tag}): {path}")

    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.flops_per_token(cfg.seq_len, cfg.window_end or None)
    peak = peak_flops(device)
    if resume_from is None:
        log.print(code_listing(), console=False)
        log.print(environment(), console=False)
    log.print(f"config {dataclasses.asdict(cfg)}", console=False)
    log.print(f"preset {cfg.preset}: model {cfg.model} ({n_params / 1e6:.1f}M parameters), data {data_dir}")
    log.print(f"device {device}, world size {world_size}, grad accumulation {grad_accum}, "
              f"{cfg.tokens_per_step:,} tokens/step, compile {use_compile}")
    if resume_from is not None:
        log.print(f"resumed from {resume_from} at step {progress['step']}")

    def evaluate(window: int | None) -> float:
        model.eval()
        total, count = torch.zeros((), device=device), 0
        with torch.no_grad(), autocast:
            for x, y in validation_batches(val_files, cfg.batch_size, cfg.val_seq_len, cfg.val_tokens,
                                           rank=rank, world_size=world_size, device=device):
                total += forward(x, y, window=window).float()
                count += 1
        if world_size > 1:
            dist.all_reduce(total)
            total /= world_size
        model.train()
        return total.item() / count

    def train_step(step: int) -> torch.Tensor:
        """One optimizer step (all micro-batches); returns the loss averaged over ranks and micro-batches."""
        factor = lr_factor(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
            if group["kind"] != "adam":
                group["momentum"] = momentum_at(step, cfg)
        window = window_at(step, cfg)
        train_loss = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            x, y = loader.next_batch()
            with autocast:
                loss = forward(x, y, window=window) / grad_accum
            # Under torchrun the optimizer averages gradients over ranks itself, sending each bucket
            # during the last backward as soon as it is complete (optim/distributed.py).
            with optimizer.sync_gradients(enabled=micro_step == grad_accum - 1):
                loss.backward()
            train_loss += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world_size > 1:
            dist.all_reduce(train_loss)
            train_loss /= world_size
        return train_loss

    if cfg.warmup_kernel_steps and progress["step"] == 0:
        # Compile and warm the kernels on real steps, then put everything back: the timed run starts
        # from exactly the state it would have had without warm-up.
        saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), loader.state_dict(),
                               torch.get_rng_state()))
        t0 = time.perf_counter()
        for step in range(cfg.warmup_kernel_steps):
            train_step(step)
        evaluate(window_at(0, cfg))
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        loader.load_state_dict(saved[2])
        torch.set_rng_state(saved[3])
        log.print(f"warm-up: {cfg.warmup_kernel_steps} steps + 1 validation in "
                  f"{time.perf_counter() - t0:.1f}s (untimed, state restored)")

    # ------------------------------------------------------------------------------------------------
    # Training loop

    stop = StopRequest()
    start_step = progress["step"]
    val_loss = float("nan")
    reached_target = False
    for step in range(start_step, cfg.max_steps + 1):
        progress["step"] = step
        if stop.agreed(world_size, device):
            log.print(f"{stop.signal_name or 'stop'} received: saving and exiting at step {step}")
            save("on signal")
            break
        last = step == cfg.max_steps
        if last or (cfg.val_every and step % cfg.val_every == 0):
            val_loss = evaluate(window_at(step, cfg))
            log.print(f"step {step}/{cfg.max_steps} val_loss {val_loss:.4f} "
                      f"train_time {progress['train_time']:.1f}s")
            log.metrics(step=step, val_loss=val_loss, train_time_s=progress["train_time"])
            if cfg.target_val_loss and val_loss <= cfg.target_val_loss:
                reached_target = True
                log.print(f"target val_loss {cfg.target_val_loss} reached at step {step} after "
                          f"{progress['train_time']:.2f}s of training")
                break
        if last:
            break

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_loss = train_step(step).item()  # also a host sync: the step is finished on the device
        step_s = time.perf_counter() - t0
        progress["train_time"] += step_s
        progress["step"] = step + 1
        if not math.isfinite(train_loss):
            log.print(f"step {step + 1}: train loss is {train_loss}; stopping. The last good checkpoint is "
                      f"kept in {checkpoint_dir} (lower --lr or resume with --resume auto)")
            raise SystemExit(f"error: non-finite train loss ({train_loss}) at step {step + 1}")

        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            tokens_per_s = cfg.tokens_per_step / step_s
            mfu = flops_per_token * tokens_per_s / (peak * world_size) if peak else None
            mfu_text = f" MFU {100 * mfu:.1f}%" if mfu else ""
            log.print(f"step {step + 1}/{cfg.max_steps} train_loss {train_loss:.4f} "
                      f"lr {lr_factor(step, cfg):.3f}x step {1000 * step_s:.0f}ms {tokens_per_s:,.0f} tok/s "
                      f"({tokens_per_s / world_size:,.0f}/device){mfu_text}")
            log.metrics(step=step + 1, train_loss=train_loss, lr=lr_factor(step, cfg) * cfg.lr,
                        step_ms=1000 * step_s, tokens_per_s=tokens_per_s,
                        tokens_per_s_per_device=tokens_per_s / world_size, mfu=mfu,
                        tokens=(step + 1) * cfg.tokens_per_step, train_time_s=progress["train_time"])
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save("periodic")
        if cfg.exit_after_steps and step + 1 - start_step == cfg.exit_after_steps:
            save(f"--exit-after-steps {cfg.exit_after_steps}")
            log.print(f"exiting after {cfg.exit_after_steps} steps; continue with --resume auto")
            break
    stop.restore()

    log.print(f"done: step {progress['step']}/{cfg.max_steps}, val_loss {val_loss:.4f}, "
              f"training time {progress['train_time']:.1f}s, peak memory {peak_memory(device)}")
    if master and cfg.sample_tokens and progress["step"] == cfg.max_steps:
        log.print("sample: " + sample(model.eval(), cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed))
    if master and cfg.plot:
        from tools.plot import plot_runs

        log.print(f"loss plot: {plot_runs([out_dir], out_dir / 'loss.png')}")
    log.close()
    if master and cfg.target_val_loss:
        record = Path("records") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset}.txt"
        record.parent.mkdir(exist_ok=True)
        shutil.copyfile(out_dir / "log.txt", record)
        print(f"record log: {record} (target {'reached' if reached_target else 'NOT reached'})")
    return {"val_loss": val_loss, "train_time_s": progress["train_time"], "step": progress["step"]}


if __name__ == "__main__":
    try:
        main(parse_config())
    except (ShardError, TokenizerUnavailable) as error:  # bad data or no vocabulary: one line, no traceback
        raise SystemExit(f"error: {error}") from None
