"""The speedrun path of train_gpt.py on a CPU: one compiled graph per mode over the whole window
schedule, nothing compiled inside timed steps, one host read per logged step, the record's dtypes."""

import dataclasses
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from test_distributed import counting_host_reads

import train_gpt
from data.loader import TokenLoader, validation_batches
from data.shards import list_shards, write_shard
from data.tokenizer import EOT
from model import GPT, PRESETS
from training import recipe
from training.run import Run, Setup
from training.runlog import RunLog
from training.runtime import Process, autocast_dtype
from training.state import RunState

ROOT = Path(__file__).resolve().parents[1]
# Two 64-token sequences a step, one batch of two to validate: the demo model's 50304-wide head is
# most of a step's cost.
SHORT = ["--seq-len", "64", "--val-seq-len", "64", "--tokens-per-step", "128", "--val-tokens", "128",
         "--sample-tokens", "0", "--no-plot"]


def documents(n_tokens: int, seed: int) -> np.ndarray:
    """Random GPT-2 ids with an EOT (document start) every 40 tokens on average."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, EOT, n_tokens)
    tokens[rng.random(n_tokens) < 1 / 40] = EOT
    tokens[0] = EOT
    return tokens


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shard(folder / "t_val_000000.bin", documents(4096, seed=1))
    write_shard(folder / "t_train_000001.bin", documents(16384, seed=2))
    return folder


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir: Path) -> list[float]:
    return [r.get("train_loss", r.get("val_loss")) for r in metrics(out_dir)]


def train(out_dir: Path, *flags: str) -> dict:
    return train_gpt.main(train_gpt.parse_config(["--out-dir", str(out_dir), *SHORT, *flags]))


def test_the_speedrun_window_schedule_compiles_one_graph_per_mode(shards):
    # The Run's own step and validation, the 2025-07-12 preset's schedule (1750 steps, the record's
    # windows), the compiled 124M architecture shrunk to width 32: one step and one validation at
    # the first step of each window. A graph per window (an int window) would be 14 graphs per mode,
    # past Dynamo's limit of 8, after which the model runs eagerly.
    cfg = recipe.parse_config(["--preset", "speedrun-2025-07-12", "--data-dir", str(shards),
                               "--seq-len", "64", "--val-seq-len", "64", "--tokens-per-step", "64",
                               "--val-tokens", "64", "--compile", "on", "--compile-backend", "eager"])
    firsts = recipe.schedule_of(cfg).first_steps()
    assert len(firsts) == 14  # 128, 256, ..., 1792
    model = GPT(dataclasses.replace(PRESETS["124m"], dim=32, n_head=2, head_dim=16, max_seq_len=64,
                                    attention="sdpa"))  # Flex compiles no backward on a CPU
    torch._dynamo.reset()  # no graphs or recompile budget left over from other tests
    loader = TokenLoader(list_shards(shards, "train"), 1, 64, align_to_bos=True)
    state = RunState(model, recipe.build_optimizer(model, cfg), loader)
    val_batches = partial(validation_batches, list_shards(shards, "val"), 1, 64, 64)
    setup = Setup(recipe.BatchLayout(1, 1, 1), state, val_batches, shards, {}, "", None, [])
    run = Run(cfg, Process(0, 1, torch.device("cpu")), setup, RunLog(shards, enabled=False))
    for first in firsts:
        state.step = first
        run.train_step()
        run.validate()
    assert (run.graphs.training, run.graphs.validation) == (1, 1)


def test_warm_up_compiles_every_graph_so_the_timed_run_compiles_none(tmp_path, shards):
    # 5 steps cross 6 windows (128 ... 1792); a validation at steps 0, 3 and 5.
    schedule = ["--data-dir", str(shards), "--max-steps", "5", "--val-every", "3", "--log-every", "1",
                "--window-end", "1728"]
    torch._dynamo.reset()
    train(tmp_path / "warm", *schedule, "--compile", "on", "--compile-backend", "eager",
          "--warmup-kernel-steps", "2")
    summary = json.loads((tmp_path / "warm" / "summary.json").read_text())
    graphs = summary["graphs_training"], summary["graphs_validation"], summary["graphs_in_timed_run"]
    assert graphs == (1, 1, 0)
    train(tmp_path / "plain", *schedule, "--compile", "off")
    assert losses(tmp_path / "warm") == losses(tmp_path / "plain")  # warm-up restored every state


def test_the_loop_reads_the_host_once_per_logged_step_and_once_per_validation(tmp_path, monkeypatch):
    # 6 steps, logged at steps 1, 4 and 6, one validation at the end: 3 + 1 reads. A read per step
    # (a loss or a stop flag checked every step) would make it 7 or more.
    reads, loop = [], train_gpt.loop

    def counted_loop(*args, **kwargs):
        with counting_host_reads(reads):
            return loop(*args, **kwargs)

    monkeypatch.setattr(train_gpt, "loop", counted_loop)
    result = train(tmp_path, "--max-steps", "6", "--log-every", "3", "--val-every", "0")
    assert result["step"] == 6
    assert [r["step"] for r in metrics(tmp_path) if "train_loss" in r] == [1, 4, 6]
    assert reads == ["item"] * 4


def test_autocast_only_for_a_float32_stream_on_cuda():
    model = GPT(dataclasses.replace(PRESETS["demo"], n_layer=2))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype(model, cuda) == torch.bfloat16 and autocast_dtype(model, cpu) is None
    model.cast_embeddings(torch.bfloat16)  # what GPT.to_device does on CUDA for the record's presets
    assert autocast_dtype(model, cuda) is None


def test_window_tensors_are_made_once_per_distinct_window():
    cfg = recipe.parse_config(["--preset", "speedrun-2025-07-12"])
    schedule = recipe.schedule_of(cfg, torch.device("cpu"))
    windows, tensors = schedule.window_tensor, schedule.window_tensors
    assert sorted(tensors) == [128 * k for k in range(1, 15)]
    assert windows(0) is windows(1) and windows(0).dtype == torch.int32
    assert windows(cfg.max_steps) is tensors[1792] and int(windows(875)) == schedule.window_at(875)
    demo = recipe.schedule_of(recipe.parse_config([]), torch.device("cpu"))
    assert demo.window_tensor(3) is None  # the demo: full causal attention


@pytest.mark.parametrize("given, expected", [(None, "expandable_segments:True"), ("max_split_size_mb:64",
                                                                                     "max_split_size_mb:64")])
def test_cuda_allocator_grows_segments_unless_the_user_says_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if given:
        env["PYTORCH_CUDA_ALLOC_CONF"] = given
    probe = "import os, sys, train_gpt; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == expected


# ---- record #46's whole schedule through the Run: batch sizes, windows, YaRN, the final validation ----

# The speedrun preset's 124m-46 at width 32; 8 steps, the tables over the first 6 (stages at steps 0, 2,
# 4, 6): 128, 256, 384, 384 tokens a step in A = 2 micro-batches (384 = 6 rows of 64, 3 per micro-batch)
# of one packed row of 64, 128, 192 tokens; windows 384, 896, 1408, 1664 (YaRN at each change); the
# last validation at 320 and 128 tokens.
RECORD_46_TINY = ["--preset", "speedrun", "--max-steps", "8", "--scheduled-steps", "6", "--tokens-per-step",
                  "384", "--tokens-schedule", "128", "256", "384", "384", "--seq-len", "64", "--max-doc-len",
                  "48", "--val-seq-len", "64", "--val-tokens", "128", "--val-every", "3", "--log-every", "1",
                  "--final-val-windows", "320", "128", "--warmup-kernel-steps", "0", "--no-plot"]
TINY_46 = dataclasses.replace(PRESETS["124m-46"], dim=32, n_head=2, head_dim=16,
                              attention="sdpa")  # Flex compiles no backward on a CPU


def train_46(out_dir: Path, shards: Path, *flags: str) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "124m-46", TINY_46)
        argv = ["--out-dir", str(out_dir), "--data-dir", str(shards), *RECORD_46_TINY, *flags]
        return train_gpt.main(train_gpt.parse_config(argv))


@pytest.fixture(scope="module")
def straight_46(shards, tmp_path_factory) -> Path:
    """The tiny #46 schedule, uncompiled, without warm-up or interruption."""
    out_dir = tmp_path_factory.mktemp("straight46")
    train_46(out_dir, shards, "--compile", "off")
    return out_dir


def test_the_46_schedule_runs_each_stages_batch_and_counts_its_tokens(straight_46):
    log = (straight_46 / "log.txt").read_text()
    for tokens, row in ((128, 64), (256, 128), (384, 192)):
        shape = f"1 process(es) x 1 sequences x {row} tokens x 2 micro-batch(es)"
        assert f"{tokens:,} tokens/step = {shape}" in log
    tokens = {r["step"]: r["tokens"] for r in metrics(straight_46) if "tokens" in r}
    assert tokens[1] == 128 and tokens[3] == 2 * 128 + 256 and tokens[8] == 2 * (128 + 256) + 4 * 384


def test_warm_up_compiles_every_graph_of_the_46_schedule_so_the_timed_run_compiles_none(tmp_path, shards,
                                                                                        straight_46):
    # The warm-up steps at 0, 2, 4, 6 (Schedule.first_steps: 3 batch shapes, 4 windows and YaRN states)
    # and validates at 0 and 8 (the final windows): one graph per batch shape in training, one
    # validation graph, none in the timed run; and it restores everything, YaRN's tables included.
    torch._dynamo.reset()
    train_46(tmp_path, shards, "--compile", "on", "--compile-backend", "eager", "--warmup-kernel-steps", "1")
    summary = json.loads((tmp_path / "summary.json").read_text())
    graphs = summary["graphs_training"], summary["graphs_validation"], summary["graphs_in_timed_run"]
    assert graphs == (3, 1, 0)
    assert losses(tmp_path) == losses(straight_46)


def test_a_checkpoint_mid_46_schedule_resumes_bitwise(tmp_path, shards, straight_46):
    # Saved after 2 steps, resumed with a warm-up step at steps 2, 4 and 6: an odd number, after which
    # the Adam groups (--adam-step-every 2) rest holding the warm-up's gradient, which putting the state
    # back must drop. Saved again after 5 steps (at 128, 256 and 384 tokens, windows 384, 896 and 1408),
    # resumed at step 5 (384 tokens, window 1408: two YaRN extensions to replay): the loader keeps its
    # position across the batch changes, and the Adam groups rest at step 4: the checkpoint holds the
    # gradient they accumulated there, which their update at step 5 adds to.
    train_46(tmp_path, shards, "--compile", "off", "--exit-after-steps", "2")
    train_46(tmp_path, shards, "--compile", "off", "--resume", "auto", "--warmup-kernel-steps", "1",
             "--exit-after-steps", "3")
    train_46(tmp_path, shards, "--compile", "off", "--resume", "auto")
    assert losses(tmp_path) == losses(straight_46)


def first_step(cfg: recipe.TrainConfig, shards: Path, train_loss: str) -> tuple[float, torch.Tensor]:
    """Run.train_step's loss at step 0 of the tiny 124m-46 with `train_loss`, and the LM head's gradient
    its optimizer step received."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(TINY_46, train_loss=train_loss, max_seq_len=64))
    loader = TokenLoader(list_shards(shards, "train"), 1, 64, max_doc_len=2048)
    state = RunState(model, recipe.build_optimizer(model, cfg), loader)
    val_batches = partial(validation_batches, list_shards(shards, "val"), 1, 64, 64)
    setup = Setup(recipe.batch_layout(cfg, 1), state, val_batches, shards, {}, "", None, [])
    run = Run(cfg, Process(0, 1, torch.device("cpu")), setup, RunLog(shards, enabled=False))
    grads, step = [], state.optimizer.step
    state.optimizer.step = lambda: (grads.append(model.lm_head.weight.grad.clone()), step())
    return run.train_step().item(), grads[0]


def test_the_summed_bf16_loss_gives_the_records_gradient_and_logs_the_mean_per_token(shards):
    # Record #46: (loss / A).backward() per micro-batch, loss the bf16 sum over its tokens; so the
    # gradient is the micro-batch's token count (64) times that of the fp32 mean loss, and the step's
    # logged loss is the mean per token (~10.8 here, not its sum ~693), as the mean loss's. A = 2
    # micro-batches of one 64-token row.
    cfg = recipe.parse_config(["--preset", "speedrun", "--data-dir", str(shards), "--seq-len", "64",
                               "--tokens-per-step", "128", "--tokens-schedule", "128", "--batch-size", "1",
                               "--val-seq-len", "64", "--val-tokens", "64", "--compile", "off"])
    assert recipe.batch_layout(cfg, 1).grad_accum == 2
    summed_loss, summed_grad = first_step(cfg, shards, "sum_bf16")
    mean_loss, mean_grad = first_step(cfg, shards, "mean_fp32")
    assert summed_loss == pytest.approx(mean_loss, rel=2e-2)  # bf16 logits and sums: ~1%
    assert torch.linalg.norm(summed_grad - 64 * mean_grad) < 2e-2 * torch.linalg.norm(64 * mean_grad)
