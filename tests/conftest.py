"""Shared fixtures: a tiny GPT saved as a checkpoint directory (training/checkpoint.py's format); one
small run of README's torchrun line, 2 gloo processes, which several tests read (each run costs ~10 s);
the suite process's freed heap handed back to the kernel after each test."""

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

# As train_gpt.py sets it, before torch loads MKL: CPU GEMMs bitwise reproducible from process to process
# (the bitwise resume, distributed and bundle tests compare processes), inherited by every subprocess.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

from model import GPT, GPTConfig
from training.checkpoint import write_step
from training.runtime import keep_freed_host_memory

# As train_gpt.py does: within a test, an in-process run's large temporaries reuse the heap.
HEAP_KEPT = keep_freed_host_memory()


def release_freed_host_memory() -> None:
    """glibc's malloc_trim(0): every whole free page of the heap goes back to the kernel."""
    if HEAP_KEPT:
        ctypes.CDLL(None).malloc_trim(0)


@pytest.fixture(autouse=True)
def freed_heap_released_after_each_test():
    """What a test freed is not held into the next one. Held, the heap stays at the largest in-process
    run's peak (4.5 GB after the #46 parity test), and on the 2-core CI VM every later subprocess run
    then spent most of its time in the kernel zeroing pages: README's 3-process torchrun test measured
    29 s with 28 s system time, 15 s with 3.6 s once the heap was released (docs/BENCHMARKS.md)."""
    yield
    release_freed_host_memory()


# GPT-2's padded vocabulary, so that sampled ids decode as text; everything else tiny.
TINY_GPT2 = GPTConfig(vocab_size=50304, n_layer=2, n_head=2, head_dim=8, dim=16, max_seq_len=64,
                      value_embeds=1)


def random_gpt(cfg: GPTConfig, seed: int = 0, scale: float = 0.5) -> GPT:
    """A GPT whose zero-initialized weights (head, output projections) are random too: N(0, scale²)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(checkpoint directory holding `latest`, the saved model)."""
    model = random_gpt(TINY_GPT2)
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    shared = dict(model=model.state_dict(), model_config=dataclasses.asdict(TINY_GPT2), config={}, step=7,
                  loader={})
    write_step(directory, 7, shared, {})
    return directory, model


ROOT = Path(__file__).resolve().parents[1]
# README's torchrun line in small form: 2 gloo processes, 4 steps, Adam every other step (so a checkpoint
# after step 3 holds the gradients its groups rested on), a validation at step 3 and at the end.
GLOO_PAIR_FLAGS = ["--batch-size", "4", "--max-steps", "4", "--adam-step-every", "2", "--val-every", "3",
                   "--log-every", "1", "--val-tokens", "2048", "--sample-tokens", "0", "--no-plot"]
# train_gpt.py as torchrun starts it, then each rank's live threads to threads.rank<R>.json beside the run.
THREADS_AFTER_MAIN = """
import json, os, runpy, sys
from pathlib import Path

sys.path.insert(0, {root!r})
runpy.run_path(os.path.join({root!r}, "train_gpt.py"), run_name="__main__")
threads = sorted(Path(task, "comm").read_text().strip() for task in Path("/proc/self/task").iterdir())
Path({report_dir!r}, "threads.rank" + os.environ["RANK"] + ".json").write_text(json.dumps(threads))
"""


def torchrun(processes: int, script: str, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=PROCESSES SCRIPT ARGS` from the repo root, each process on
    one thread (the tests share 2 cores); the module behind the torchrun command, so the venv's."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               script, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def torchrun_pair(out_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """train_gpt.py under torchrun, 2 processes, with GLOO_PAIR_FLAGS and `flags`; each rank's threads
    alive after main() in out_dir.parent. Asserts exit 0."""
    script = out_dir.parent / "threads_after_main.py"
    script.write_text(THREADS_AFTER_MAIN.format(root=str(ROOT), report_dir=str(out_dir.parent)))
    done = torchrun(2, str(script), "--out-dir", str(out_dir), *GLOO_PAIR_FLAGS, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


class GlooPairRun(NamedTuple):
    out_dir: Path
    stdout: str
    threads: list[list[str]]  # per rank, the names of its threads alive after main() returned


@pytest.fixture(scope="session")
def gloo_pair_run(tmp_path_factory) -> GlooPairRun:
    """One straight torchrun_pair run, read by the README, resume and thread tests."""
    out_dir = tmp_path_factory.mktemp("gloo_pair") / "straight"
    done = torchrun_pair(out_dir)
    threads = [json.loads((out_dir.parent / f"threads.rank{rank}.json").read_text()) for rank in (0, 1)]
    return GlooPairRun(out_dir, done.stdout, threads)
