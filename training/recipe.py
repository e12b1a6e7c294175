"""The training recipe: the run's config, the named presets, the schedules, the optimizer's groups.

train_gpt.py runs it; bench/ and experiments/ build the same optimizer and schedules from it.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass

from model import GPT, PRESETS
from optim import Muon


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
    for group in groups:
        group["initial_lr"] = group["lr"]  # the base that schedule() multiplies by lr_factor
    return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                ns_steps=cfg.ns_steps, ns_coefficients=cfg.ns_coefficients, lr_scale=cfg.lr_scale,
                adam_betas=cfg.adam_betas, adam_eps=cfg.adam_eps)


def schedule(optimizer: Muon, step: int, cfg: TrainConfig) -> None:
    """Set this step's lr in every group (its initial_lr × lr_factor) and momentum in the Muon groups."""
    factor = lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
        if group["kind"] != "adam":
            group["momentum"] = momentum_at(step, cfg)
