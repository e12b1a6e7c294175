"""What the GPT experiments share: the stdlib corpus over a compact vocabulary, a schedule of the
speedrun's shape, one training run, and a runner that caches finished runs and spreads them over
processes.

Schedule: training/schedule.py's Schedule, the object train_gpt.py runs, with the speedrun preset's
shape (docs/RECIPE.md) but not all its values. Every param group's lr is its base lr times 1 for the
first 55% of the steps, then falls linearly to 0.1× at the last step: the preset's cooldown over the
last 45%, with a floor of 0.1 where the preset's (the 2025-07-12 record's) is 0.05, the value every
recorded run of docs/EXPERIMENTS.md used. The momentum of every group that has Muon's (Newton–Schulz,
embedding, head maps, torch.optim.Muon) warms up linearly from 0.85 to 0.95 over the first 300/1750
of the steps, as the speedrun's over 300 of its 1750.
"""

import json
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import pairwise, takewhile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data.shards import list_shards, read_shard
from data.stdlib_corpus import STDLIB_DIR, stdlib_shards
from data.tokenizer import EOT
from experiments.report import finite_or_none, torch_threads
from model import GPT
from training.schedule import Schedule

COOLDOWN_FRAC = 0.45
LR_FLOOR = 0.1  # the preset's is 0.05; the recorded runs used 0.1 (module docstring)
MOMENTUM_START, MOMENTUM_END = 0.85, 0.95
MOMENTUM_WARMUP_FRAC = 300 / 1750
SPLITS = ("train", "val")
QUICK_DOCUMENTS = 40  # the quick corpus: the first 40 documents of the stdlib corpus order


@dataclass(frozen=True)
class Corpus:
    """The train and val token streams in the compact vocabulary (int64 ids)."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    bos: int  # the compact id of EOT, which starts every document
    coverage: float  # share of the train tokens whose id keeps a row of its own


def stdlib_corpus(quick: bool, vocab_size: int) -> Corpus:
    """The stdlib corpus (data.stdlib_corpus), built on first use; quick: its first QUICK_DOCUMENTS."""
    root = stdlib_shards(STDLIB_DIR.with_name("stdlib-quick"), QUICK_DOCUMENTS) if quick else stdlib_shards()
    return compact_corpus(root, vocab_size)


def compact_corpus(root: Path, vocab_size: int) -> Corpus:
    """The shards under `root` with ids compacted to `vocab_size`.

    The vocab_size − 1 most frequent train ids (ties: the lower id; EOT, the document separator,
    always) map to 0..vocab_size − 2 in id order; every other id maps to vocab_size − 1.
    """
    train, val = (np.concatenate([read_shard(f) for f in list_shards(root, split)]) for split in SPLITS)
    counts = np.bincount(train, minlength=2**16)
    rank = counts.astype(np.float64)
    rank[EOT] = math.inf
    kept = np.sort(np.lexsort((np.arange(2**16), -rank))[: vocab_size - 1])
    lookup = np.full(2**16, vocab_size - 1, dtype=np.int64)
    lookup[kept] = np.arange(vocab_size - 1)
    coverage = counts[kept].sum() / counts.sum()
    compact = [torch.from_numpy(lookup[tokens]) for tokens in (train, val)]
    return Corpus(*compact, vocab_size, int(lookup[EOT]), float(coverage))


def lane_batches(tokens: Tensor, rows: int, seq_len: int, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
    """`steps` batches (x, y) of `rows` sequences from the first rows·steps·seq_len tokens, each once.

    Those tokens are cut into `rows` contiguous lanes, one per row; step s takes the s-th window of
    seq_len tokens of every lane, so each batch mixes `rows` distant parts of the corpus (in this
    corpus a document is a whole module of thousands of tokens) and no input token repeats.
    """
    lane = steps * seq_len
    if rows * lane >= len(tokens):
        raise ValueError(f"{steps} steps of {rows}×{seq_len} tokens would repeat some of the {len(tokens):,} "
                         "train tokens; use fewer steps or a larger corpus")
    window = torch.arange(rows)[:, None] * lane + torch.arange(seq_len + 1)
    chunks = (tokens[window + step * seq_len] for step in range(steps))  # checked above, read lazily
    return ((chunk[:, :-1], chunk[:, 1:]) for chunk in chunks)


def spread_batches(tokens: Tensor, rows: int, seq_len: int, n_tokens: int) -> list[tuple[Tensor, Tensor]]:
    """Validation batches of `rows` sequences: n_tokens/seq_len windows spread evenly over `tokens`."""
    count = n_tokens // seq_len
    if count % rows or count * (seq_len + 1) > len(tokens):
        raise ValueError(f"val_tokens={n_tokens}: expected a multiple of {rows * seq_len} that the "
                         f"{len(tokens):,} val tokens can hold")
    starts = torch.arange(count) * ((len(tokens) - seq_len - 1) // count)
    chunks = tokens[starts[:, None] + torch.arange(seq_len + 1)]
    return [(c[:, :-1], c[:, 1:]) for c in chunks.split(rows)]


def experiment_schedule(steps: int, tokens_per_step: int) -> Schedule:
    """The schedule of a run of `steps` steps (module docstring): lr 1 until 1 − COOLDOWN_FRAC of the
    run, then linear to LR_FLOOR at the last step; momentum MOMENTUM_START → MOMENTUM_END linearly over
    the first MOMENTUM_WARMUP_FRAC of the run; full causal attention."""
    return Schedule(steps, tokens_per_step, cooldown_frac=COOLDOWN_FRAC, lr_floor=LR_FLOOR,
                    momentum=MOMENTUM_END, momentum_start=MOMENTUM_START,
                    momentum_warmup_steps=MOMENTUM_WARMUP_FRAC * steps)


@dataclass
class Optimizers:
    """The optimizers of one run. The schedule sets every group's lr and the momentum of the groups
    that have Muon's (Schedule.apply)."""

    optimizers: list[torch.optim.Optimizer]


def train(model: GPT, optimizers: Optimizers, corpus: Corpus, settings: dict) -> dict:
    """Train for settings["steps"] on lane batches; val loss every settings["eval_every"] steps.

    Returns the val curve [(step, loss or None)], the final val loss (None if the run diverged)
    and the seconds it took. Stops at the first non-finite training loss.
    """
    steps, rows, seq_len = settings["steps"], settings["batch_size"], settings["seq_len"]
    batches = lane_batches(corpus.train, rows, seq_len, steps)
    val = spread_batches(corpus.val, rows, seq_len, settings["val_tokens"])
    schedule = experiment_schedule(steps, rows * seq_len)
    curve = [(0, evaluate(model, val))]
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        for opt in optimizers.optimizers:
            schedule.apply(opt, step)
        loss = model(x, y)
        if not torch.isfinite(loss):
            break
        loss.backward()
        for opt in optimizers.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if (step + 1) % settings["eval_every"] == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate(model, val)))
    diverged = curve[-1][0] != steps or not math.isfinite(curve[-1][1])
    return {"val_curve": [(s, finite_or_none(v)) for s, v in curve],
            "final_val_loss": None if diverged else curve[-1][1], "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: GPT, batches: list) -> float:
    model.eval()
    loss = sum(model(x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def steps_to_reach(curve: list, target: float) -> float | None:
    """First step at which the val curve reaches `target`, interpolating linearly between evaluations.

    None if it never does; a NaN evaluation (None) ends the curve, as divergence ends a run.
    """
    valid = list(takewhile(lambda point: point[1] is not None, curve))
    if valid and valid[0][1] <= target:
        return valid[0][0]
    for (s0, v0), (s1, v1) in pairwise(valid):
        if v1 <= target:
            return s1 - (s1 - s0) * (target - v1) / (v0 - v1)
    return None


def loss_or_inf(run: dict) -> float:
    return math.inf if run["final_val_loss"] is None else run["final_val_loss"]


def sweep_log2(run_at: Callable[[int], Future], center: int, max_extend: int) -> dict[int, dict]:
    """Runs at log2 lr center − 1, center, center + 1 (concurrently), then one point further past
    an edge that holds the best, at most max_extend times; {log2 lr: run}."""
    pending = {k: run_at(k) for k in (center - 1, center, center + 1)}
    runs = {k: f.result() for k, f in pending.items()}
    for _ in range(max_extend):
        best = min(runs, key=lambda k: (loss_or_inf(runs[k]), k))
        if best not in (min(runs), max(runs)):
            break
        k = best - 1 if best == min(runs) else best + 1
        runs[k] = run_at(k).result()
    return dict(sorted(runs.items()))


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (n − 1); None for no values, std 0 for one."""
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


class Runner:
    """Runs specs through `work(spec) -> result`, each distinct spec once.

    Finished runs are appended to `cache` (a JSONL line {"spec", "result"}, flushed and fsynced), so
    an interrupted experiment resumes where it stopped. With workers > 1 the runs go to that many
    processes (spawned, torch on `threads` threads each); with 1 they run here, one at a time.
    """

    def __init__(self, work: Callable[[dict], dict], cache: Path | None, workers: int, threads: int = 1):
        self.work, self.cache = work, cache
        self.lock, self.file_lock = threading.Lock(), threading.Lock()
        self.futures: dict[str, Future] = {}
        for line in cache.read_text().splitlines() if cache and cache.exists() else []:
            record = json.loads(line)
            done: Future = Future()
            done.set_result(record["result"])
            self.futures[_key(record["spec"])] = done
        self.pool = None if workers == 1 else ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
            initargs=(threads,))

    def submit(self, spec: dict) -> Future:
        """The run's future: cached, in flight, or started now."""
        key = _key(spec)
        with self.lock:
            if key in self.futures:
                return self.futures[key]
            if self.pool is None:
                future: Future = Future()
                future.set_result(self.work(spec))
                self._record(spec, future)
            else:
                future = self.pool.submit(self.work, spec)
                future.add_done_callback(lambda f: self._record(spec, f))
            self.futures[key] = future
            return future

    def _record(self, spec: dict, future: Future) -> None:
        if self.cache is None or future.exception() is not None:
            return
        line = json.dumps({"spec": spec, "result": future.result()}) + "\n"
        with self.file_lock, open(self.cache, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def run_alone(run_spec: Callable[[dict], dict], spec: dict, threads: int) -> dict:
    """One run of `spec` in this process (an experiment's --run flag); prints its command and final loss."""
    with torch_threads(threads):
        result = run_spec(spec)
    print(f"{result['command']}: final val loss {result['final_val_loss']}")
    return result


def run_sweep(run_spec: Callable[[dict], dict], cache: Path, workers: int, threads: int,
              sweep: Callable[[Runner], dict]) -> dict:
    """sweep(runner), the runner doing `workers` runs at a time and keeping finished ones in `cache`."""
    runner = Runner(run_spec, cache, workers, threads)
    try:
        with torch_threads(threads):
            return sweep(runner)
    finally:
        runner.close()


def _key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)
