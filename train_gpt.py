"""Train the speedrun GPT with the modular-duality (Muon) optimizer.

    python train_gpt.py                                   # CPU demo on an offline corpus (the default)
    python train_gpt.py --preset speedrun                 # 124M on FineWeb (needs `make data`)
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset speedrun

Every weight update goes through the duality map of its layer (optim/): Newton-Schulz
orthogonalization for hidden matrices, the embedding map (or Adam) for embeddings, Adam for the
LM head and scalars. Reads top to bottom: config, set-up, data, model, optimizer, training loop.
"""

import argparse
import copy
import dataclasses
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
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
from optim import Muon  # noqa: E402
from tools.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint  # noqa: E402
from tools.runlog import RunLog, WandbSink, code_listing, environment, peak_flops  # noqa: E402
from tools.sample import sample  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    preset: str = "demo"
    model: str = "demo"  # a model/gpt.py preset
    data_dir: str | None = None  # shards *_train_*.bin / *_val_*.bin; None: the offline demo corpus
    out_dir: str | None = None  # default: out/<preset>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: str = "auto"  # auto (on for CUDA) | on | off
    # batch: tokens_per_step = world_size * batch_size * seq_len * grad_accum_steps
    max_steps: int = 150
    tokens_per_step: int = 1024
    batch_size: int = 8  # sequences per micro-batch per rank
    seq_len: int = 128
    val_every: int = 25  # 0: validate only at the end
    val_tokens: int = 8192
    val_seq_len: int = 128
    log_every: int = 10
    # learning rates: constant, then a linear cooldown over the last cooldown_frac to lr_floor * lr
    lr: float = 0.05  # hidden matrices (Newton-Schulz)
    embed_lr: float = 0.05  # token + value embeddings (dual map; Adam if embed_map == "adam")
    head_lr: float = 0.008  # LM head (Adam)
    scalar_lr: float = 0.04  # gains, lambdas, skip weights (Adam)
    embed_map: str = "dual"  # dual | adam
    lr_scale: str = "spectral"  # spectral sqrt(d_out/d_in) | muon sqrt(max(1, d_out/d_in)) | rms
    adam_betas: tuple[float, float] = (0.8, 0.95)
    adam_eps: float = 1e-10
    weight_decay: float = 0.0
    warmup_steps: int = 0
    cooldown_frac: float = 0.4
    lr_floor: float = 0.1
    momentum: float = 0.95
    momentum_start: float = 0.85  # warmed up linearly to `momentum` over momentum_warmup_steps
    momentum_warmup_steps: int = 300
    ns_coefficients: str = "muon"
    ns_steps: int = 5
    # attention: long window grows linearly from window_start to window_end (0: full causal attention)
    window_start: int = 0
    window_end: int = 0
    # end of run
    sample_tokens: int = 64
    sample_prompt: str = "The"
    plot: bool = True
    # checkpoints: <out-dir>/checkpoints/step_XXXXXX/; resume "auto" continues the run in --out-dir
    save_every: int = 0
    resume: str = ""
    exit_after_steps: int = 0  # save and exit after this many steps of this invocation
    # record mode: stop at the first validation at or below the target; timing excludes warm-up
    target_val_loss: float = 0.0
    warmup_kernel_steps: int = 0  # untimed steps (compile, autotune) whose effects are then undone
    # wandb (rank 0, opt-in); WANDB_MODE=offline|disabled is honoured
    wandb: bool = False
    wandb_project: str = "modular-duality-speedrun"
    run_name: str = ""


PRESETS_TRAIN: dict[str, dict] = {
    # ~3 minutes on 2 CPU cores; validation loss falls from ~10.8 to well under half of that.
    "demo": {},
    # The 124M speedrun on FineWeb (REFERENCE §4): 1750 steps x 393,216 tokens; on 8 GPUs one
    # 48k-token sequence per rank per step, on fewer GPUs the same step by gradient accumulation.
    "speedrun": dict(
        model="124m", data_dir="data/fineweb10B", max_steps=1750, tokens_per_step=8 * 48 * 1024,
        batch_size=1, seq_len=48 * 1024, val_every=125, val_tokens=10_485_760, val_seq_len=256 * 1024,
        log_every=1, lr=0.05, embed_lr=0.6, head_lr=0.22, scalar_lr=0.04, embed_map="adam",
        lr_scale="muon", cooldown_frac=0.45, window_start=128, window_end=1792, sample_tokens=0,
        warmup_kernel_steps=10,
    ),
}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags override the preset, which overrides TrainConfig's defaults."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS_TRAIN),
                        help="training recipe (default: demo)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "adam_betas":
            parser.add_argument(flag, type=float, nargs=2, default=None)
        else:
            parser.add_argument(flag, type=f.type if f.type in (int, float) else str, default=None)
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset") or "demo"
    if args["adam_betas"] is not None:
        args["adam_betas"] = tuple(args["adam_betas"])
    values = {**PRESETS_TRAIN[preset], **{k: v for k, v in args.items() if v is not None}}
    cfg = TrainConfig(preset=preset, **values)
    if cfg.model not in PRESETS:
        parser.error(f"--model must be one of {sorted(PRESETS)}, got {cfg.model!r}")
    return cfg


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on every group's base lr: linear warm-up, constant, linear cooldown to lr_floor."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = step / cfg.max_steps
    if progress < 1 - cfg.cooldown_frac:
        return 1.0
    w = (1 - progress) / cfg.cooldown_frac
    return w + (1 - w) * cfg.lr_floor


def momentum_at(step: int, cfg: TrainConfig) -> float:
    frac = min(step / cfg.momentum_warmup_steps, 1.0) if cfg.momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.momentum_start + frac * cfg.momentum


def window_at(step: int, cfg: TrainConfig) -> int | None:
    """Long attention window for this step, grown in multiples of 128 tokens (None: full causal)."""
    if not cfg.window_end:
        return None
    size = cfg.window_start + (cfg.window_end - cfg.window_start) * step / cfg.max_steps
    return int(128 * math.ceil(size / 128))


def build_optimizer(model: GPT, cfg: TrainConfig) -> Muon:
    """Route every parameter to the duality map of its layer kind.

    hidden matrices (attention q/k/v/o, MLP fc/proj) -> Newton-Schulz; token and value embeddings ->
    the embedding dual map (or Adam); LM head -> Adam; gains, lambdas, skip weights -> Adam.
    """
    hidden = [p for p in model.blocks.parameters() if p.ndim == 2]
    embeds = [model.embed.weight, *(t.weight for t in model.value_embeds)]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        dict(params=hidden, kind="hidden", lr=cfg.lr),
        dict(params=embeds, kind="embed" if cfg.embed_map == "dual" else "adam", lr=cfg.embed_lr),
        dict(params=[model.lm_head.weight], kind="adam", lr=cfg.head_lr),
        dict(params=scalars, kind="adam", lr=cfg.scalar_lr),
    ]
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters()), "a parameter is missing from the groups"
    return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                ns_steps=cfg.ns_steps, ns_coefficients=cfg.ns_coefficients, lr_scale=cfg.lr_scale,
                adam_betas=cfg.adam_betas, adam_eps=cfg.adam_eps)


# ----------------------------------------------------------------------------------------------------
# Set-up


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible (use --device cpu)")
    return device


# A rank that waits longer than this in a collective raises instead of hanging. torchrun already ends
# the job when a rank exits; this covers a peer that is stuck, or gone where this node's torchrun
# cannot see it. Long enough for the first step's torch.compile and a checkpoint write on rank 0.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; one process if not under torchrun.

    NCCL on GPUs, gloo on CPU processes: the same code either way, one node or many (torchrun's c10d
    rendezvous flags). The optimizer then owns gradient synchronization (optim/distributed.py).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def main(cfg: TrainConfig) -> dict:
    """Train; returns {"val_loss", "train_time_s", "step"}. Collective under torchrun."""
    device = resolve_device(cfg.device)
    rank, world_size, device = init_distributed(device)
    try:
        return train(cfg, rank, world_size, device)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal_name = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (ranks must leave the loop together)."""
        flag = torch.tensor(float(self.signal_name is not None), device=device)
        if world_size > 1:
            dist.all_reduce(flag)
        return flag.item() > 0

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated (CUDA)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process)"


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
    except (ShardError, TokenizerUnavailable, CheckpointError) as error:  # one line, no traceback
        raise SystemExit(f"error: {error}") from None
