"""The first GPU run in one command: a speedrun preset, compressed, with its compile, speed and memory.

    python -m bench.gpu_check --out-dir DIR [--preset P] [--smoke]   (or: make gpu-check ARGS="...")

It needs no internet, no wandb and no data: it writes its own token shards under DIR/shards
(synthetic documents, each a BOS then an arithmetic sequence of ids with 10% of them replaced by
random ids, so the loss can fall well below ln(vocabulary)), then runs `train_gpt.py --preset P` as a
separate process on them, changing only the run's length, its per-GPU batch and its data (CHECKS):
  speedrun (record #46, the default): 240 steps scheduled over 212, so its whole schedule in
  miniature: one GPU's share of each stage, 1, 2, then 3 rows of 16,384 tokens (16,384, 32,768,
  49,152 tokens a step, one micro-batch each, as the record's per-GPU batch), each stage at its long
  window (3, 7, 11 blocks; short half), then the final stage's 13 (short 6) from step 212; momentum
  warm-up 30 steps, so its 50-step cooldown runs too; validation every 60 steps on 4 rows of 256k.
  speedrun-2025-07-12 (the proven one): 300 steps of one 48k-token sequence (the record's per-GPU
  micro-batch; no gradient accumulation), so the long window crosses all 14 of its values
  (128 ... 1792); validation every 50 steps on 4 sequences of 256k tokens.
Everything else is the preset's: its 124M architecture, bf16 tables, compiled model with the window
as a tensor, its batches, the optimizer and its schedules (over the compressed run), 10 warm-up steps.

Planned from the FLOP count (planned_compute_s: model.flops_per_token at each step's tokens and window,
x3 for training, x1 for validation, at 400 TFLOP/s, 40% of an H100/H200's dense bf16 peak): #46's
8.4M training tokens and 5 validations of 1M take about 20 s; 2025-07-12's 14.7M and 7 validations
about 35 s. Compilation (one training graph per batch shape, one validation graph, Newton-Schulz per
matrix shape) comes on top and is not timed; the whole check should finish well within 8 minutes.

Writes DIR/gpu_check.json and DIR/gpu_check.md (the run's own log and metrics are in DIR/run/):
graphs compiled for training and validation and inside the timed run, ms/step, tokens/s, MFU, peak
memory, the validation losses and whether they fell. Exits 1 if a check fails: not one training graph
per batch shape of the schedule or not one validation graph, any graph compiled inside the timed run,
fewer windows in the schedule than the preset's (4 or 14), a validation loss that did not fall by
half. Record #46's final validation windows (short 768, long 2560 tokens) and its YaRN steps are the
training loop's to run; this check sees only what the run's summary reports. --smoke runs the same
on a CPU (the demo model, 64-token rows, 14 steps, the "eager" compile backend: Dynamo traces and
counts graphs, no code is generated), where the loss is only checked to be finite.
"""

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.optim import machine
from data.durable import write_text_atomic
from data.shards import write_shard
from data.tokenizer import EOT
from model import GPT, PRESETS
from training.recipe import TrainConfig, parse_config, schedule_of
from training.schedule import Schedule

REPO = Path(__file__).resolve().parents[1]
VOCAB_USED = 4096  # ids the synthetic documents use; the model's vocabulary stays 50304
STRIDE = 7  # each clean id is the previous one + STRIDE (mod VOCAB_USED)
NOISE = 0.1  # share of ids replaced by uniform random ones
TIMEOUT_S = 540  # under the 600 s a device session's command may run, so this one reports why
PEAK_USED = 400e12  # FLOP/s the plan assumes: 40% of an H100's dense bf16 peak

# Per preset: train_gpt.py flags over --preset P for one GPU (full) and a CPU (smoke), and the number
# of distinct long windows its compressed schedule must cross. The data and output flags are added by
# `run`.
CHECKS = {
    "speedrun": dict(
        windows=4,
        full=("--max-steps", "240", "--scheduled-steps", "212", "--tokens-per-step", "49152",
              "--tokens-schedule", "16384", "32768", "49152", "49152", "--momentum-warmup-steps", "30",
              "--val-every", "60", "--val-tokens", str(4 * 256 * 1024), "--log-every", "20",
              "--device", "cuda"),
        smoke=("--model", "demo", "--max-steps", "14", "--scheduled-steps", "12", "--seq-len", "64",
               "--max-doc-len", "32", "--tokens-per-step", "192", "--tokens-schedule", "64", "128", "192",
               "192", "--momentum-warmup-steps", "2", "--momentum-cooldown-steps", "4", "--val-seq-len",
               "64", "--val-every", "7", "--val-tokens", "128", "--log-every", "5",
               "--warmup-kernel-steps", "1", "--device", "cpu", "--compile", "on", "--compile-backend",
               "eager")),
    "speedrun-2025-07-12": dict(
        windows=14,
        full=("--max-steps", "300", "--tokens-per-step", str(48 * 1024), "--val-every", "50",
              "--val-tokens", str(4 * 256 * 1024), "--log-every", "25", "--device", "cuda"),
        smoke=("--model", "demo", "--max-steps", "14", "--seq-len", "64", "--val-seq-len", "64",
               "--tokens-per-step", "64", "--val-every", "7", "--val-tokens", "128", "--log-every", "5",
               "--warmup-kernel-steps", "1", "--device", "cpu", "--compile", "on", "--compile-backend",
               "eager")),
}


def synthetic_tokens(n: int, mean_document: int, seed: int) -> np.ndarray:
    """n ids: documents of geometric length (mean `mean_document`), each starting with EOT (the BOS),
    then start + STRIDE * position (mod VOCAB_USED) from a random start, NOISE of them random."""
    rng = np.random.default_rng(seed)
    bos = rng.random(n) < 1 / mean_document
    bos[0] = True
    document = np.cumsum(bos) - 1
    starts = np.flatnonzero(bos)
    position = np.arange(n) - starts[document]
    tokens = (rng.integers(0, VOCAB_USED, len(starts))[document] + STRIDE * position) % VOCAB_USED
    noisy = rng.random(n) < NOISE
    tokens[noisy] = rng.integers(0, VOCAB_USED, int(noisy.sum()))
    tokens[bos] = EOT
    return tokens.astype(np.uint16)


def write_shards(folder: Path, cfg: TrainConfig) -> Path:
    """A val shard of exactly what validation reads (+1 target) and a train shard of 4 steps' worth
    of sequences (the loader wraps around it); documents a tenth of a training sequence long."""
    folder.mkdir(parents=True, exist_ok=True)
    mean_document = max(16, cfg.seq_len // 10)
    write_shard(folder / "synthetic_val_000000.bin", synthetic_tokens(cfg.val_tokens + 1, mean_document, 0))
    train_tokens = 4 * max(cfg.tokens_per_step, 8 * cfg.seq_len)
    write_shard(folder / "synthetic_train_000001.bin", synthetic_tokens(train_tokens, mean_document, 1))
    return folder


def run(out_dir: Path, flags: tuple[str, ...], cfg: TrainConfig) -> tuple[list[dict], dict, float]:
    """train_gpt.py --preset cfg.preset on the synthetic shards in a separate process; (its metrics
    records, its summary.json, wall seconds). Its console output is written to out_dir/train_gpt.out as
    it comes, so a run that fails or is stopped at TIMEOUT_S leaves what it printed; either ends this
    with the output's last lines. `cfg` is what the flags make of the preset."""
    shards = write_shards(out_dir / "shards", cfg)
    command = [sys.executable, str(REPO / "train_gpt.py"), "--preset", cfg.preset, *flags,
               "--data-dir", str(shards), "--out-dir", str(out_dir / "run"), "--sample-tokens", "0",
               "--no-plot", "--no-wandb"]
    console = out_dir / "train_gpt.out"
    start = time.perf_counter()
    with open(console, "w") as out:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {TIMEOUT_S} s"
    wall_s = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(console.read_text().splitlines()[-20:])
        raise SystemExit(f"error: train_gpt.py ended with {code} (all of its output: {console}):\n{tail}")
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((out_dir / "run" / "summary.json").read_text()), wall_s


def batch_shapes(schedule: Schedule) -> int:
    """The distinct tokens per step of the schedule: one training graph each."""
    return len({schedule.at(step).tokens for step in schedule.first_steps()})


def validations(cfg: TrainConfig) -> int:
    """How many validations the run makes: every val_every steps from step 0, and at the last step."""
    steps = set(range(0, cfg.max_steps + 1, cfg.val_every)) if cfg.val_every else set()
    return len(steps | {cfg.max_steps})


def planned_compute_s(cfg: TrainConfig) -> float:
    """Seconds of model FLOPs at PEAK_USED: the sum over steps of tokens x flops_per_token(seq_len,
    window) (forward and backward), plus each validation's val_tokens x a third of flops_per_token
    (forward only) at the last window. Compilation comes on top."""
    with torch.device("meta"):
        model = GPT(PRESETS[cfg.model])
    schedule = schedule_of(cfg)
    train = sum(schedule.at(step).tokens * model.flops_per_token(cfg.seq_len, schedule.window_at(step))
                for step in range(cfg.max_steps))
    per_val = cfg.val_tokens * model.flops_per_token(cfg.val_seq_len, schedule.window_at(cfg.max_steps)) / 3
    return (train + validations(cfg) * per_val) / PEAK_USED


def summarize(records: list[dict], summary: dict, cfg: TrainConfig, smoke: bool) -> dict:
    """The run's figures and the checks on them."""
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    schedule = schedule_of(cfg)
    windows, shapes, expected = schedule.windows(), batch_shapes(schedule), CHECKS[cfg.preset]["windows"]
    checks = {
        f"one training graph per batch shape ({shapes})": summary.get("graphs_training") == shapes,
        "one validation graph": summary.get("graphs_validation") == 1,
        "nothing compiled in the timed run": summary["graphs_in_timed_run"] == 0,
        f"all {expected} windows crossed": len(windows) == expected,
    }
    if smoke:  # 14 steps of the demo model at the 124M's learning rates: the loss need not fall yet
        checks["validation loss finite"] = all(math.isfinite(loss) for _, loss in val)
    else:
        checks["validation loss fell by half"] = val[-1][1] < 0.5 * val[0][1]
    figures = {k: summary.get(k) for k in ("step", "train_time_s", "step_ms", "tokens_per_s", "mfu",
                                             "peak_memory_gib", "graphs_training", "graphs_validation",
                                             "graphs_in_timed_run")}
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    return dict(preset=cfg.preset, planned_compute_s=planned_compute_s(cfg), figures=figures,
                windows=windows, val_loss=val, train_loss=train, checks=checks, passed=all(checks.values()))


def markdown(report: dict) -> str:
    f = report["figures"]
    mfu = f"{f['mfu']:.1%}" if f["mfu"] else "n/a (peak unknown)"
    lines = [f"### GPU check: {report['machine']['device']}, torch {report['machine']['torch']}, "
             f"{report['date'][:10]}{' (smoke)' if report['smoke'] else ''}",
             "",
             f"`train_gpt.py --preset {report['preset']} {' '.join(report['flags'])}` on synthetic shards; "
             f"{report['wall_s']:.0f} s wall in all, compilation included (planned: "
             f"{report['planned_compute_s']:.0f} s of model FLOPs at {PEAK_USED / 1e12:.0f} TFLOP/s).",
             "",
             "| steps | step ms | tokens/s | MFU | peak GiB | graphs train / val / in timed run | val loss |",
             "|---|---|---|---|---|---|---|",
             f"| {f['step']} | {f['step_ms']:.1f} | {f['tokens_per_s']:,.0f} | {mfu} | "
             f"{f['peak_memory_gib']:.2f} | "
             f"{f['graphs_training']} / {f['graphs_validation']} / {f['graphs_in_timed_run']} | "
             f"{report['val_loss'][0][1]:.3f} → {report['val_loss'][-1][1]:.3f} |",
             ""]
    lines += [f"- {'ok' if ok else 'FAILED'}: {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the shards, the run, and "
                        "gpu_check.json / gpu_check.md")
    parser.add_argument("--preset", choices=tuple(CHECKS), default="speedrun", help="the preset to check: "
                        "speedrun (record #46, every stage of its schedule) or speedrun-2025-07-12 (the "
                        "proven one, its 14 windows)")
    parser.add_argument("--smoke", action="store_true", help="the demo model at toy sizes on a CPU (seconds)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; --smoke runs the check on a CPU")
    flags = CHECKS[args.preset]["smoke" if args.smoke else "full"]
    cfg = parse_config(["--preset", args.preset, *flags])  # the run's config, as train_gpt.py will read it
    device = torch.device("cpu" if args.smoke else "cuda")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    records, summary, wall_s = run(args.out_dir, flags, cfg)
    report = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), smoke=args.smoke,
                  machine={**machine(device), "cuda": torch.version.cuda}, flags=list(flags), wall_s=wall_s,
                  **summarize(records, summary, cfg, args.smoke))
    write_text_atomic(args.out_dir / "gpu_check.json", json.dumps(report, indent=2))
    table = markdown(report)
    write_text_atomic(args.out_dir / "gpu_check.md", table)
    print(table)
    print(f"wrote {args.out_dir / 'gpu_check.json'} and {args.out_dir / 'gpu_check.md'}")
    if not report["passed"]:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
