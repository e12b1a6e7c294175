"""The training recipes: the run's config (TrainConfig, every field a flag with its help, choices and
range), the named presets, the flags that set a run's plan, the batch layout over processes, the
optimizer's groups, and the schedule a config sets.

train_gpt.py runs it; bench/ and tools/parity.py build the same config and optimizer from it. The flag
machinery is training/flags.py (`--help` explains each field, a bad value fails at parse time with one
line); the schedule (lr, momentum, window and tokens by step) is training/schedule.py, which knows
numbers only: schedule_of reads them from a config.
"""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from model import GPT, PRESETS
from optim import COEFFICIENTS, EPS_FORMS, LR_SCALES, ROUNDINGS, STEP_ROUNDINGS, WD_FORMS, Muon, param_groups
from training.flags import (
    AT_LEAST_0,
    AT_LEAST_1,
    BELOW_1,
    FRACTION,
    PATH,
    POSITIVE,
    SEED,
    Form,
    option,
    parse_flags,
)
from training.schedule import MOMENTUM_BLENDS, Schedule

DEVICE = Form(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")


PRESETS_TRAIN: dict[str, dict] = {
    # ~3 minutes on 2 CPU cores; validation loss falls from ~10.8 to well under half of that.
    "demo": {},
    # The 124M speedrun on FineWeb: record #46's recipe (2025-11-29, 2.203 min), setting by setting in
    # docs/RECIPE.md (tests/test_recipe.py checks this preset against that table). 2160 steps, the last 40
    # past the 2120 scheduled ones; 131072, 262144 then 393216 tokens a step, on 8 GPUs 1, 2 then 3
    # packed rows of 16384 per rank in one micro-batch, so the bf16 summed loss sums the record's
    # tokens per GPU in every stage and Adam's and Newton-Schulz's eps are the record's (docs/MATH.md
    # 4.8); on fewer GPUs the same step by gradient accumulation.
    "speedrun": dict(
        model="124m-46", data_dir="data/fineweb10B", max_steps=2160, scheduled_steps=2120,
        tokens_per_step=3 * 8 * 2048 * 8, tokens_schedule=(131072, 262144, 393216, 393216), batch_size=3,
        seq_len=2048 * 8, max_doc_len=2048, align_to_bos=False, val_every=250, val_tokens=10_485_760,
        val_seq_len=4 * 64 * 1024, val_batch_size=1, log_every=25, lr=0.023, embed_lr=0.008 * 75,
        head_lr=0.008, scalar_lr=0.008 * 5, embed_map="adam", lr_scale="muon", adam_betas=(0.65, 0.95),
        adam_eps=1e-8, adam_eps_form="raw", adam_weight_decay=0.0, adam_step_every=2,
        adam_state_dtype="bfloat16", step_rounding="stepwise", muon_state_dtype="param", normuon=True,
        normuon_beta2=0.95, weight_decay=1.2, wd_form="in_update", cautious_wd=True,
        ns_coefficients="polar_express_speedrun", ns_eps=1e-6, ns_rounding="fused",
        cooldown_frac=0.55, lr_floor=0.1, lr_levels=(1.0, 1.51, 1.93), lr_level_fracs=(0.33, 0.66),
        momentum_cooldown_steps=50, momentum_blend="offset", window_end=0, window_blocks=(3, 7, 11, 13),
        final_val_windows=(2560, 768), sample_tokens=0, warmup_kernel_steps=10,
    ),
    # The 2025-07-12 record's recipe (#26), kept as it was; its own table and step parity in
    # docs/RECIPE.md. 1750 steps x 393,216 tokens; on 8 GPUs one 48k-token sequence per rank per step.
    "speedrun-2025-07-12": dict(
        model="124m", data_dir="data/fineweb10B", max_steps=1750, tokens_per_step=8 * 48 * 1024,
        batch_size=1, seq_len=48 * 1024, align_to_bos=True, val_every=125, val_tokens=10_485_760,
        val_seq_len=256 * 1024, log_every=25, lr=0.05, embed_lr=0.6, head_lr=0.22, scalar_lr=0.04,
        embed_map="adam", lr_scale="muon", adam_eps=1e-10 / (48 * 1024), adam_eps_form="raw",
        ns_eps=1e-7 / (48 * 1024), ns_rounding="stepwise", cooldown_frac=0.45, lr_floor=0.05,
        window_start=0, window_end=1728, sample_tokens=0, warmup_kernel_steps=10,
    ),
}


@dataclass
class TrainConfig:
    preset: str = option("demo", "a full recipe (model, data, batch, schedule, learning rates); the other "
                         "flags override it", choices=tuple(PRESETS_TRAIN))
    model: str = option("demo", "model shape (model/gpt.py PRESETS)", choices=tuple(PRESETS))
    data_dir: str | None = option(None, "folder of shards *_train_*.bin and *_val_*.bin (default: the "
                                  "offline demo corpus, built on first use)", form=PATH)
    out_dir: str | None = option(None, "run folder: log.txt, metrics.jsonl, loss.png, checkpoints/ "
                                 "(default: out/<preset>)", form=PATH)
    seed: int = option(0, "seed of the weight init and the final sample; the same seed gives bit-identical "
                       "losses on CPU", within=SEED)
    device: str = option("auto", "auto (CUDA if visible, else CPU), cpu, cuda, cuda:N or mps", form=DEVICE)
    compile: str = option("auto", "torch.compile the model (auto: on for CUDA)",
                          choices=("auto", "on", "off"))
    compile_backend: str = option("inductor", "torch.compile backend: inductor (generates kernels), or "
                                  "aot_eager or eager, which trace and count graphs but generate no code "
                                  "(quick checks of the compiled path on a CPU)",
                                  choices=("inductor", "aot_eager", "eager"))
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state over the processes with "
                        "FSDP2 (fully_shard; bf16 compute, fp32 gradient reduction on CUDA); checkpoints "
                        "through torch.distributed.checkpoint")
    # batch: tokens_per_step = processes x batch_size x seq_len x micro-batches (gradient accumulation)
    max_steps: int = option(150, "optimizer steps of the run", within=AT_LEAST_1)
    tokens_per_step: int = option(1024, "tokens per optimizer step, over all processes", within=AT_LEAST_1)
    tokens_schedule: tuple[int, ...] = option((), "tokens per optimizer step by step, a table read as "
                                              "--window-blocks (empty: --tokens-per-step throughout); each "
                                              "value's batch shape as --tokens-per-step's (with "
                                              "--max-doc-len: one packed row per micro-batch), from the same "
                                              "data position", within=AT_LEAST_1)
    max_doc_len: int = option(0, "cut every training document to at most N tokens before packing it into "
                              "rows (record #46: 2048, as its FA3 varlen's max_seq_len); the last one in a "
                              "row ends at the row's end, tails are dropped (0: documents whole)",
                              within=AT_LEAST_0)
    batch_size: int = option(8, "at most N sequences per micro-batch per process: a process's share of a "
                             "step is split into the fewest equal micro-batches of at most N (gradient "
                             "accumulation), validation likewise", within=AT_LEAST_1)
    seq_len: int = option(128, "tokens per training sequence", within=AT_LEAST_1)
    val_batch_size: int = option(0, "at most N sequences per validation micro-batch per process (0: "
                                 "--batch-size)", within=AT_LEAST_0)
    align_to_bos: bool = option(False, "start every training sequence at a document's first token (BOS), "
                                "the next one at least --seq-len after the previous start; validation is "
                                "never aligned")
    val_every: int = option(25, "validate every N steps (0: only at the end)", within=AT_LEAST_0)
    val_tokens: int = option(8192, "validate on the first N tokens of the val split", within=AT_LEAST_1)
    val_seq_len: int = option(128, "tokens per validation sequence", within=AT_LEAST_1)
    log_every: int = option(10, "log the train loss every N steps (and the last step)", within=AT_LEAST_1)
    # learning rates: constant (or stepping up through lr_levels), then a linear cooldown over the last
    # cooldown_frac of the scheduled steps to lr_floor * lr (training/schedule.py)
    lr: float = option(0.05, "learning rate of the hidden matrices (Newton-Schulz)", within=AT_LEAST_0)
    embed_lr: float = option(0.05, "learning rate of the token and value embeddings", within=AT_LEAST_0)
    head_lr: float = option(0.008, "learning rate of the LM head (Adam)", within=AT_LEAST_0)
    scalar_lr: float = option(0.04, "learning rate of gains, lambdas and skip weights (Adam)",
                              within=AT_LEAST_0)
    embed_map: str = option("dual", "embeddings by the embedding duality map, or by Adam",
                            choices=("dual", "adam"))
    lr_scale: str = option("spectral", "scale of a hidden matrix's update: spectral sqrt(d_out/d_in), muon "
                           "sqrt(max(1, d_out/d_in)), rms 0.2 sqrt(max(d_out, d_in))",
                           choices=tuple(LR_SCALES))
    adam_betas: tuple[float, float] = option((0.8, 0.95), "Adam's beta1 beta2", within=BELOW_1)
    adam_eps: float = option(1e-10, "Adam's epsilon", within=POSITIVE)
    adam_eps_form: str = option("corrected", "where Adam adds its epsilon: to the bias-corrected sqrt(v) "
                                "(corrected, torch's AdamW) or to sqrt(v) before the bias correction (raw, "
                                "the Adam paper's efficient form)", choices=EPS_FORMS)
    adam_step_every: int = option(1, "Adam groups step every N optimizer steps, on the sum of the N steps' "
                                  "gradients (record #39: 2, on the odd steps)", within=AT_LEAST_1)
    adam_state_dtype: str = option("float32", "dtype of Adam's moments: float32 (at least the parameter's), "
                                   "or bfloat16 for every Adam parameter, rounded once a step as stored "
                                   "(record #46's DistAdam)", choices=("float32", "bfloat16"))
    step_rounding: str = option("precise", "where the Adam and hidden-matrix steps' arithmetic rounds to the "
                                "dtypes it writes: precise (in the state dtype, each tensor rounded once as "
                                "stored; Adam compiled on CUDA) or stepwise (after every operation, eagerly, "
                                "in record #46's order: its DistAdam on bf16 moments, its NorMuon on Polar "
                                "Express's bf16 result)", choices=STEP_ROUNDINGS)
    muon_state_dtype: str = option("float32", "dtype of the Muon kinds' momentum and NorMuon buffers: "
                                   "float32 (at least the parameter's), or param: the parameter's own, so "
                                   "a bf16 gate (the model's head_gate_dtype, on CUDA) is updated in bf16 "
                                   "(record #46)", choices=("float32", "param"))
    weight_decay: float = option(0.0, "weight decay, of the form --wd-form", within=AT_LEAST_0)
    wd_form: str = option("decoupled", "decoupled: p <- p (1 - lr wd); in_update: the decay lr wd p joins "
                          "the update before its step size, p <- p - step (u + lr wd p) (record #43: the "
                          "decay follows the lr schedule twice)", choices=WD_FORMS)
    cautious_wd: bool = option(False, "decay only the coordinates where the update u has the sign of p "
                               "(u p >= 0) (record #43)")
    adam_weight_decay: float | None = option(None, "the Adam groups' weight decay (default: --weight-decay)",
                                             within=AT_LEAST_0)
    normuon: bool = option(False, "NorMuon on the hidden matrices (records #41-#42): each orthogonalized "
                           "update divided by the root of an EMA of its mean square per row or column, "
                           "then rescaled to its Frobenius norm; attention, MLP and gates in groups of "
                           "their own, each on the record's axis")
    normuon_beta2: float = option(0.95, "NorMuon's EMA coefficient of the second moment", within=BELOW_1)
    warmup_steps: int = option(0, "steps of linear lr warm-up", within=AT_LEAST_0)
    cooldown_frac: float = option(0.4, "final fraction of the scheduled steps (the run's, by default) over "
                                  "which the lr falls linearly to lr-floor x lr", within=FRACTION)
    lr_floor: float = option(0.1, "lr at the end of the cooldown, as a fraction of the lr", within=FRACTION)
    scheduled_steps: int = option(0, "steps over which the lr cooldown and the window and batch tables run; "
                                  "the steps after them, up to --max-steps, keep the final values (0: "
                                  "--max-steps)", within=AT_LEAST_0)
    lr_levels: tuple[float, ...] = option((1.0,), "lr factor before the cooldown, stepping up: the i-th "
                                          "level once step / scheduled steps is past the i-th of "
                                          "--lr-level-fracs; the cooldown starts from the level of its step",
                                          within=AT_LEAST_0)
    lr_level_fracs: tuple[float, ...] = option((), "where --lr-levels step up, as fractions of the "
                                               "scheduled steps, ascending (one fewer than the levels)",
                                               within=FRACTION)
    momentum: float = option(0.95, "Muon momentum after its warm-up", within=BELOW_1)
    momentum_start: float = option(0.85, "Muon momentum at step 0, raised linearly to --momentum",
                                   within=BELOW_1)
    momentum_warmup_steps: int = option(300, "steps of the momentum warm-up", within=AT_LEAST_0)
    momentum_blend: str = option("weighted", "float form of the warm-up's blend: weighted, (1 - f) start + "
                                 "f end (the 2025-07-12 record's), or offset, start + f (end - start) "
                                 "(record #46's): the same number up to its last bit",
                                 choices=MOMENTUM_BLENDS)
    momentum_cooldown_steps: int = option(0, "last steps of the run over which Muon momentum falls "
                                          "linearly back to --momentum-start (0: none)", within=AT_LEAST_0)
    ns_coefficients: str = option("muon", "Newton-Schulz coefficient set",
                                  choices=tuple(sorted(COEFFICIENTS)))
    ns_steps: int = option(5, "Newton-Schulz iterations", within=AT_LEAST_1)
    ns_eps: float | None = option(None, "Newton-Schulz epsilon: the iteration starts from G/(||G||_F + eps) "
                                  "(default: the coefficient set's own, 1e-7 for muon)", within=POSITIVE)
    ns_rounding: str = option("precise", "where Newton-Schulz rounds to its dtype (bf16 on GPUs): precise "
                              "(normalized in float32 and rounded once, then fused matmul-adds; the more "
                              "accurate), stepwise (after every operation, as the 2025-07-12 record) or "
                              "fused (normalized as stepwise, then fused matmul-adds, as record #46's "
                              "kernels)",
                              choices=ROUNDINGS)
    # attention: the long window grows linearly from window_start to window_end, rounded up to a multiple
    # of 128 tokens, at least 128 (window_end 0: full causal attention), or follows window_blocks
    window_start: int = option(0, "long attention window at step 0, in tokens, before rounding up to a "
                               "multiple of 128 (at least 128)", within=AT_LEAST_0)
    window_end: int = option(0, "long attention window at the last step, before rounding up to a multiple "
                             "of 128 (0: full causal attention)", within=AT_LEAST_0)
    window_blocks: tuple[int, ...] = option((), "long attention windows by step, in 128-token blocks, in "
                                            "place of --window-start/--window-end: with n + 1 entries, entry "
                                            "int(n x) at x = step / scheduled steps, the last after them",
                                            within=AT_LEAST_1)
    final_val_windows: tuple[int, ...] = option((), "the last validation's long and short windows in tokens "
                                                "(record #46: 2560 768, with YaRN as at the last step; "
                                                "empty: the last step's windows)", within=AT_LEAST_1)
    # end of run
    sample_tokens: int = option(64, "tokens sampled after the last step (0: no sample)", within=AT_LEAST_0)
    sample_prompt: str = option("The", "prompt of that sample")
    plot: bool = option(True, "write loss.png at the end")
    # checkpoints: <out-dir>/checkpoints/step_XXXXXX/
    save_every: int = option(0, "checkpoint every N steps (0: only on SIGTERM/SIGINT or --exit-after-steps)",
                             within=AT_LEAST_0)
    resume: str = option("", "continue from a checkpoint: a step folder, a checkpoints/ folder, or auto "
                         "(this --out-dir's latest; a new run if it has none)")
    resume_changed_ok: bool = option(False, "let --resume continue with flags that change the run's plan "
                                     "(learning rates, schedule, batch, data: PLAN_FIELDS) from the "
                                     "checkpoint's; without it such a resume is refused, naming each change")
    exit_after_steps: int = option(0, "save and exit after N steps of this invocation (for jobs with a "
                                   "wall-clock limit; 0: off)", within=AT_LEAST_0)
    # record mode: stop at the first validation at or below the target; timing excludes warm-up
    target_val_loss: float = option(0.0, "record mode: stop at the first validation at or below this loss "
                                    "and copy the log to records/ (0: off)", within=AT_LEAST_0)
    collective_timeout_s: float = option(300.0, "under torchrun, once the warm-up is done (or with nothing "
                                         "to compile), a rank that waits longer than this in a collective "
                                         "ends with one line: a peer died or stopped answering (30 minutes "
                                         "before, while graphs compile)", within=POSITIVE)
    warmup_kernel_steps: int = option(0, "untimed steps first (compile, autotune), whose effects are then "
                                      "undone", within=AT_LEAST_0)
    # wandb (rank 0, opt-in); WANDB_MODE=offline|disabled and WANDB_DIR are honoured
    wandb: bool = option(False, "log to Weights & Biases (rank 0)")
    wandb_project: str = option("modular-duality-speedrun", "wandb project")
    run_name: str = option("", "wandb run name (default: wandb's)")


# The flags that set a run's trajectory: a resume that changes one of them continues another run than
# the checkpoint's (a longer --max-steps moves the cooldown, new shards another data order), so it is
# refused unless --resume-changed-ok. The model's shape is checked apart (training/state.py).
PLAN_FIELDS = ("max_steps", "tokens_per_step", "seq_len", "max_doc_len", "align_to_bos", "data_dir", "lr",
               "embed_lr", "head_lr", "scalar_lr", "embed_map", "lr_scale", "adam_betas", "adam_eps",
               "adam_eps_form", "adam_step_every", "adam_state_dtype", "step_rounding", "muon_state_dtype",
               "weight_decay", "wd_form", "cautious_wd",
               "adam_weight_decay", "normuon", "normuon_beta2", "warmup_steps", "cooldown_frac", "lr_floor",
               "momentum", "momentum_start", "momentum_warmup_steps", "momentum_blend", "ns_coefficients",
               "ns_steps", "ns_eps", "ns_rounding", "window_start", "window_end", "scheduled_steps",
               "lr_levels", "lr_level_fracs", "momentum_cooldown_steps", "window_blocks", "tokens_schedule",
               "final_val_windows")


def plan_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """`--flag saved -> now` for each PLAN_FIELDS flag whose value differs from the `saved` config's
    (a field the saved config lacks is not compared; data folders are compared as resolved paths)."""
    def value(name: str, v):
        return str(Path(v).resolve()) if name == "data_dir" and v is not None else v

    return [f"--{name.replace('_', '-')} {saved[name]} -> {getattr(cfg, name)}" for name in PLAN_FIELDS
            if name in saved and value(name, saved[name]) != value(name, getattr(cfg, name))]


def parse_config(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """Flags override the preset, which overrides TrainConfig's defaults; every value is checked
    (training/flags.py), then the schedule's flags together (schedule_problem)."""
    return parse_flags(TrainConfig, PRESETS_TRAIN, argv, description, validate=schedule_problem)


def schedule_problem(cfg: TrainConfig) -> str | None:
    """Why flags that go together do not: the schedule's (training/schedule.py), the two ways of
    packing training rows (--max-doc-len, --align-to-bos), or --fsdp's (sharding_problem); or None."""
    if cfg.window_start and not cfg.window_end:
        return (f"--window-start {cfg.window_start} without --window-end: the window grows from start to "
                f"end, and --window-end 0 means full causal attention; pass --window-end too")
    if cfg.window_end and cfg.window_start > cfg.window_end:
        return (f"--window-start {cfg.window_start} is past --window-end {cfg.window_end}; the window "
                f"grows from start to end")
    if cfg.window_blocks and cfg.window_end:
        return (f"--window-blocks {' '.join(map(str, cfg.window_blocks))} replaces --window-end "
                f"{cfg.window_end}; pass --window-end 0 with it")
    if cfg.max_doc_len and cfg.align_to_bos:
        return (f"--max-doc-len {cfg.max_doc_len} packs rows from whole documents, each from its BOS; "
                f"--align-to-bos is the other packing; pass --no-align-to-bos with it")
    if len(cfg.final_val_windows) not in (0, 2):
        return (f"--final-val-windows has {len(cfg.final_val_windows)} values; expected two, the long and "
                f"the short window in tokens")
    if cfg.scheduled_steps > cfg.max_steps:
        return f"--scheduled-steps {cfg.scheduled_steps} is past --max-steps {cfg.max_steps}"
    if len(cfg.lr_levels) != len(cfg.lr_level_fracs) + 1:
        return (f"--lr-levels has {len(cfg.lr_levels)} values for the {len(cfg.lr_level_fracs)} of "
                f"--lr-level-fracs; expected one more level than fracs")
    if list(cfg.lr_level_fracs) != sorted(cfg.lr_level_fracs):
        return f"--lr-level-fracs {' '.join(map(str, cfg.lr_level_fracs))}: expected ascending fractions"
    return sharding_problem(cfg)


def sharding_problem(cfg: TrainConfig) -> str | None:
    """--fsdp with an optimizer option fully_shard's optimizer refuses (optim.Muon: each needs whole
    matrices, or gradients kept across steps, where fully_shard leaves rows averaged at every backward)."""
    refused = [(f"--adam-step-every {cfg.adam_step_every}", "--adam-step-every 1", cfg.adam_step_every > 1),
               ("--normuon", "--no-normuon", cfg.normuon),
               ("--step-rounding stepwise", "--step-rounding precise", cfg.step_rounding == "stepwise"),
               (f"--wd-form {cfg.wd_form}", "--wd-form decoupled", cfg.wd_form != "decoupled")]
    given = [(flag, fix) for flag, fix, on in refused if on]
    if cfg.fsdp and given:
        return (f"--fsdp with {', '.join(flag for flag, _ in given)}: fully_shard averages each gradient at "
                f"every backward and steps each process's rows apart, which these need whole (docs/MATH.md "
                f"section 4.7); pass {', '.join(fix for _, fix in given)}, or leave out --fsdp")
    return None


def schedule_of(cfg: TrainConfig, device: torch.device | None = None) -> Schedule:
    """The run's Schedule from cfg's fields of the same names; on `device`, with its window tensors."""
    names = [f.name for f in dataclasses.fields(Schedule) if f.init and f.name != "device"]
    return Schedule(**{name: getattr(cfg, name) for name in names}, device=device)


class BatchLayout(NamedTuple):
    """How a step's tokens split over processes and micro-batches (gradient accumulation)."""

    micro_batch: int  # sequences per micro-batch per process
    grad_accum: int  # micro-batches per optimizer step
    val_batch: int  # sequences per validation batch per process


def batch_layout(cfg: TrainConfig, world_size: int) -> BatchLayout:
    """Each process takes tokens_per_step / (world_size x seq_len) sequences a step, in the fewest equal
    micro-batches of at most --batch-size sequences; validation likewise, with val_tokens, val_seq_len
    and at most --val-batch-size (or --batch-size) sequences.

    Where the token counts do not split over the processes, a one-line SystemExit names each flag that
    does not fit and the nearest values that do.
    """
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    problems, fixes = [], []
    splits = (("--tokens-per-step", cfg.tokens_per_step, "--seq-len", cfg.seq_len),
              ("--val-tokens", cfg.val_tokens, "--val-seq-len", cfg.val_seq_len))
    for flag, tokens, seq_flag, seq_len in splits:
        if tokens % (world_size * seq_len):
            problems.append(f"{flag} {tokens} is not a multiple of {processes} x {seq_flag} {seq_len} = "
                            f"{world_size * seq_len}")
            fixes.append(f"{flag} {max(1, round(tokens / (world_size * seq_len))) * world_size * seq_len}")
    if problems:
        raise SystemExit(f"error: {'; '.join(problems)}; try {' '.join(fixes)}")
    rows = cfg.tokens_per_step // (world_size * cfg.seq_len)
    micro_batch = largest_divisor(rows, at_most=cfg.batch_size)
    val_rows = cfg.val_tokens // (world_size * cfg.val_seq_len)
    val_batch = largest_divisor(val_rows, at_most=cfg.val_batch_size or cfg.batch_size)
    return BatchLayout(micro_batch, rows // micro_batch, val_batch)


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is at most `at_most`: divisors come in pairs (d, n / d) with
    d <= sqrt(n), so sqrt(n) trials whatever the flags (10^5 for n = 10^10)."""
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            best = max([best] + [c for c in (d, n // d) if c <= at_most])
    return best


# NorMuon's axis for each family of hidden matrices (optim.Muon normuon), record #46's on our (d_out, d_in)
# layout (docs/MATH.md 4.7): the record picks the larger side of its stored shape, which is wide (d, 4d)
# for attention (four (d, d) views) and the MLP (its c_fc transposed), so the attention's square
# matrices take one second moment per column, and "auto" (the larger side) gives the MLP and gates its.
NORMUON_FAMILIES = {"attn": "column", "mlp": "auto", "gates": "auto"}


def hidden_family(name: str) -> str:
    """A GPT hidden matrix's family by its parameter name: gates (smear and attention gates), attn
    (q, k, v, o) or mlp (fc, proj); ValueError for any other."""
    if name.endswith("gate.weight"):
        return "gates"
    for family in ("attn", "mlp"):
        if f".{family}." in name:
            return family
    raise ValueError(f"--normuon: no NorMuon axis for the hidden matrix {name}; expected an attention, MLP "
                     f"or gate weight of model/gpt.py")


def optimizer_groups(model: GPT, cfg: TrainConfig) -> list[dict]:
    """Every parameter routed to the duality map of its layer kind, by its role (optim.param_groups),
    at cfg's lr for that role.

    hidden matrices (attention q/k/v/o, MLP fc/proj, gates) -> Newton-Schulz, with --normuon one group
    per family (NORMUON_FAMILIES: its axis, beta2 = --normuon-beta2); token and value embeddings -> the
    embedding dual map (or Adam); LM head -> Adam; gains, lambdas, skip weights -> Adam. Adam groups
    step every --adam-step-every steps and decay by --adam-weight-decay; their state is in
    --adam-state-dtype, every other group's in --muon-state-dtype; the Adam and hidden groups step with
    the arithmetic of --step-rounding (optim.Muon's state_dtype and step_rounding; the embedding map
    has only the precise one).
    """
    groups = param_groups(model, embed="embed" if cfg.embed_map == "dual" else "adam", head="adam",
                          lrs=dict(hidden=cfg.lr, embed=cfg.embed_lr, head=cfg.head_lr, scalar=cfg.scalar_lr))
    adam_wd = cfg.weight_decay if cfg.adam_weight_decay is None else cfg.adam_weight_decay
    routed = []
    for group in groups:
        if group["kind"] == "adam":
            routed.append(group | dict(step_every=cfg.adam_step_every, weight_decay=adam_wd,
                                       state_dtype=cfg.adam_state_dtype, step_rounding=cfg.step_rounding))
        elif group["kind"] == "hidden":
            hidden = group | dict(state_dtype=cfg.muon_state_dtype, step_rounding=cfg.step_rounding)
            routed += normuon_groups(hidden, cfg.normuon_beta2) if cfg.normuon else [hidden]
        else:
            routed.append(group | dict(state_dtype=cfg.muon_state_dtype))
    return routed


def normuon_groups(group: dict, beta2: float) -> list[dict]:
    """The hidden group split by hidden_family, in NORMUON_FAMILIES' order, each with its NorMuon axis."""
    families: dict[str, list] = {}
    for name, p in group["params"]:
        families.setdefault(hidden_family(name), []).append((name, p))
    return [group | dict(params=families[family], normuon=axis, beta2=beta2)
            for family, axis in NORMUON_FAMILIES.items() if family in families]


def build_optimizer(model: GPT, cfg: TrainConfig) -> Muon:
    """Muon over optimizer_groups(model, cfg), with muon_options(cfg); has-a-gradient flags across ranks
    only where the model has unused parameters (unused_parameters)."""
    return Muon(optimizer_groups(model, cfg), **muon_options(cfg), unused_parameters=unused_parameters(model))


def muon_options(cfg: TrainConfig) -> dict:
    """Muon's keyword arguments from cfg: lr, momentum, decay, Newton-Schulz and Adam settings."""
    return dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, wd_form=cfg.wd_form,
                cautious_wd=cfg.cautious_wd, ns_steps=cfg.ns_steps,
                ns_coefficients=cfg.ns_coefficients, ns_eps=cfg.ns_eps, ns_rounding=cfg.ns_rounding,
                lr_scale=cfg.lr_scale, adam_betas=cfg.adam_betas, adam_eps=cfg.adam_eps,
                adam_eps_form=cfg.adam_eps_form)


def unused_parameters(model: GPT) -> bool:
    """Whether a training step leaves some parameter of `model` without a gradient: the value lambdas of
    an attention block with no value embedding, on the generic architecture (value_lambda_all_layers
    off: the demo's). Muon(unused_parameters=True) then sends has-a-gradient flags across ranks; the
    record's architecture (the speedrun's) uses every parameter, and its step sends none."""
    blocks = zip(model.blocks, model.value_embedding_layers(), strict=True)
    return not model.config.value_lambda_all_layers and any(
        block.attn is not None and table is None for block, table in blocks)
