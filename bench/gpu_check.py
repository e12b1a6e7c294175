"""The first GPU run in one command: the 2025-07-12 speedrun preset, compressed, with its compile, speed
and memory.

    python -m bench.gpu_check --out-dir DIR [--smoke]     (or: make gpu-check ARGS="--out-dir DIR")

It needs no internet, no wandb and no data: it writes its own token shards under DIR/shards
(synthetic documents, each a BOS then an arithmetic sequence of ids with 10% of them replaced by
random ids, so the loss can fall well below ln(vocabulary)), then runs `train_gpt.py --preset
speedrun-2025-07-12` as a separate process on them, changing only the run's length and data:
  300 steps of one 48k-token sequence (the record's per-GPU micro-batch; no gradient accumulation),
  so the long window crosses all 14 of its values (128 ... 1792) within the run; validation every 50
  steps on 4 sequences of 256k tokens (the record's validation shape); the preset's 10 warm-up steps.
Everything else is the preset's: the 124M record architecture, bf16 tables, compiled model with the
window as a tensor, BOS-aligned batches, the optimizer and its schedules (over 300 steps).

Planned from the FLOP count (model.flops_per_token: about 0.8 GFLOP per training token at T = 49,152):
300 steps x 49,152 tokens is ~12 PFLOP, about 30 s at 400 TFLOP/s (40% of an H100/H200's dense
bf16 peak); 7 validations of 1,048,576 tokens (forward only, a third of that per token) about 2 PFLOP
more. Compilation (the training and validation graphs, and Newton-Schulz per matrix shape) comes on
top and is not timed; the whole check should finish well within 8 minutes.

Writes DIR/gpu_check.json and DIR/gpu_check.md (the run's own log and metrics are in DIR/run/):
graphs compiled for training and validation and inside the timed run, ms/step, tokens/s, MFU, peak
memory, the validation losses and whether they fell. Exits 1 if a check fails: not exactly one graph
per mode, any graph compiled inside the timed run, fewer than 14 windows crossed, a validation loss
that did not fall by half. --smoke runs the same on a CPU (the demo model, 64-token sequences, 14
steps, the "eager" compile backend: Dynamo traces and counts graphs, no code is generated), where
the loss is only checked to be finite.
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
from training.recipe import TrainConfig, parse_config
from training.schedule import Schedule

REPO = Path(__file__).resolve().parents[1]
VOCAB_USED = 4096  # ids the synthetic documents use; the model's vocabulary stays 50304
STRIDE = 7  # each clean id is the previous one + STRIDE (mod VOCAB_USED)
NOISE = 0.1  # share of ids replaced by uniform random ones
WINDOWS = 14  # the speedrun's long windows: 128, 256, ..., 1792
# The 2025-07-12 record's recipe: its 14 windows and 48k-token micro-batch are what this check crosses.
PRESET = "speedrun-2025-07-12"
TIMEOUT_S = 540  # under the 600 s a device session's command may run, so this one reports why

# train_gpt.py flags over --preset speedrun-2025-07-12 (PRESET); the data and output flags are added by `run`.
FULL = ("--max-steps", "300", "--tokens-per-step", str(48 * 1024), "--val-every", "50",
        "--val-tokens", str(4 * 256 * 1024), "--log-every", "25", "--device", "cuda")
SMOKE = ("--model", "demo", "--max-steps", "14", "--seq-len", "64", "--val-seq-len", "64",
         "--tokens-per-step", "64", "--val-every", "7", "--val-tokens", "128", "--log-every", "5",
         "--warmup-kernel-steps", "1", "--device", "cpu", "--compile", "on", "--compile-backend", "eager")


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
    """train_gpt.py --preset speedrun on the synthetic shards in a separate process; (its metrics
    records, its summary.json, wall seconds). Its console output is written to out_dir/train_gpt.out as
    it comes, so a run that fails or is stopped at TIMEOUT_S leaves what it printed; either ends this
    with the output's last lines. `cfg` is what the flags make of the preset."""
    shards = write_shards(out_dir / "shards", cfg)
    command = [sys.executable, str(REPO / "train_gpt.py"), "--preset", PRESET, *flags,
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


def summarize(records: list[dict], summary: dict, cfg: TrainConfig, smoke: bool) -> dict:
    """The run's figures and the checks on them."""
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    windows = Schedule.of(cfg).windows()
    checks = {
        "one training graph": summary.get("graphs_training") == 1,
        "one validation graph": summary.get("graphs_validation") == 1,
        "nothing compiled in the timed run": summary["graphs_in_timed_run"] == 0,
        f"all {WINDOWS} windows crossed": len(windows) == WINDOWS,
    }
    if smoke:  # 14 steps of the demo model at the 124M's learning rates: the loss need not fall yet
        checks["validation loss finite"] = all(math.isfinite(loss) for _, loss in val)
    else:
        checks["validation loss fell by half"] = val[-1][1] < 0.5 * val[0][1]
    figures = {k: summary.get(k) for k in ("step", "train_time_s", "step_ms", "tokens_per_s", "mfu",
                                             "peak_memory_gib", "graphs_training", "graphs_validation",
                                             "graphs_in_timed_run")}
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    return dict(figures=figures, windows=windows, val_loss=val, train_loss=train, checks=checks,
                passed=all(checks.values()))


def markdown(report: dict) -> str:
    f = report["figures"]
    mfu = f"{f['mfu']:.1%}" if f["mfu"] else "n/a (peak unknown)"
    lines = [f"### GPU check: {report['machine']['device']}, torch {report['machine']['torch']}, "
             f"{report['date'][:10]}{' (smoke)' if report['smoke'] else ''}",
             "",
             f"`train_gpt.py --preset {PRESET} {' '.join(report['flags'])}` on synthetic shards; "
             f"{report['wall_s']:.0f} s wall in all, compilation included.",
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
    parser.add_argument("--smoke", action="store_true", help="the demo model at toy sizes on a CPU (seconds)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; --smoke runs the check on a CPU")
    flags = SMOKE if args.smoke else FULL
    cfg = parse_config(["--preset", PRESET, *flags])  # the run's config, as train_gpt.py will read it
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
