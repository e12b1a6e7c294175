"""Tokenization throughput on CPU: `data.prepare` end to end vs tiktoken's raw batch encoder.

    python -m bench.tokenize [--megabytes 10] [--workers N] [--repeats 5]

Builds a corpus of .txt files (~10 MB) from the demo text, each copy varied, in a temporary folder,
then times on the same text:
  raw      tiktoken's encode_ordinary_batch(texts, num_threads=workers) on strings already in memory
  prepare  data.prepare: read the files, tokenize in `workers` processes, write the shards
and reports the best of `repeats` interleaved runs of each, and prepare's share of raw's throughput
(goal >= 0.8).
"""

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np

from data.prepare import available_cpus, prepare
from data.shards import read_shard
from data.tokenizer import EOT, gpt2_encoding


def write_corpus(directory: Path, megabytes: float) -> list[str]:
    """Write varied copies of the demo topics as .txt files until `megabytes` of text; return the texts."""
    texts: list[str] = []
    size, copy = 0, 0
    while size < megabytes * 1e6:
        for name, text in sorted(topics.items()):
            lines = text.splitlines(keepends=True)
            shift = copy % len(lines)
            # Rotating the lines makes each copy a different document with the same kind of text.
            varied = f"{name}, copy {copy}\n\n" + "".join(lines[shift:] + lines[:shift])
            (directory / f"{copy:03d}_{name}.txt").write_text(varied, encoding="utf-8")
            texts.append(varied)
            size += len(varied.encode())
        copy += 1
    return texts


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tokenize", description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=10.0, help="corpus size (10)")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="processes/threads (all CPUs)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each; the best counts (5)")
    args = parser.parse_args(argv)
    encoding = gpt2_encoding()
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus"
        corpus.mkdir()
        texts = write_corpus(corpus, args.megabytes)
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(texts, num_threads=args.workers))
        raw, prepared = [], []
        # Alternating the two keeps a burst of load from other processes from favouring either.
        for run in range(args.repeats):
            raw.append(timed(partial(encoding.encode_ordinary_batch, texts, num_threads=args.workers)))
            out = Path(scratch) / f"out{run}"
            prepared.append(timed(partial(prepare, [corpus], out, val_fraction=0.01, workers=args.workers)))
        written = sum(np.count_nonzero(read_shard(p) != EOT) for p in Path(scratch, "out0").iterdir())
    if written != tokens:
        raise RuntimeError(f"data.prepare wrote {written:,} text tokens, raw tiktoken made {tokens:,}")
    print(f"corpus: {len(texts)} files, {megabytes:.1f} MB, {tokens:,} tokens; {args.workers} workers")
    print(f"best of {args.repeats} runs each (interleaved):")
    best = {"raw encode_ordinary_batch": min(raw), "data.prepare (end to end)": min(prepared)}
    for name, seconds in best.items():
        rate = f"{megabytes / seconds:.2f} MB/s  {tokens / seconds / 1e6:.2f} M tokens/s"
        print(f"  {name}: {seconds:.2f} s  {rate}")
    print(f"prepare / raw throughput: {min(raw) / min(prepared):.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
