"""Tokenize a text corpus into .bin shards with the GPT-2 encoding, in parallel processes.

    python -m data.prepare INPUT... --out DIR [--val-fraction F] [--shard-tokens N] [--prefix NAME]
                           [--jsonl-field text] [--workers K] [--overwrite]

INPUT is a text file (one document), a .jsonl file (one JSON object per line, its --jsonl-field
being a document; blank lines skipped) or a directory (every *.txt below it, in sorted order).
Every document is preceded by EOT. Documents 0, 1/F, 2/F, ... (counted over all inputs in order)
form the validation split, so any F > 0 puts at least one document there. Shards are named like
FineWeb's: {prefix}_val_000000.bin, ..., {prefix}_train_000001.bin, ...; each holds N tokens (the
last one fewer) and documents straddle shard boundaries. The same input gives byte-identical output,
whatever the number of workers.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data.durable import fsync_dir
from data.shards import ShardError, write_shard
from data.tokenizer import TokenizerUnavailable, encode_documents, gpt2_encoding

CHUNK_BYTES = 1 << 18  # input per worker task: enough to amortize the inter-process overhead
SPLIT_FIRST_INDEX = {"val": 0, "train": 1}  # FineWeb's numbering


class PrepareError(ValueError):
    """A problem with the inputs or flags that the user can fix; the message is one line."""


class Doc(NamedTuple):
    path: str
    line: int  # 0 for a whole text file, else the JSONL line holding the document
    raw: bytes | None  # the JSONL line; None for a text file, which the worker reads itself
    size: int  # bytes of input


class Chunk(NamedTuple):
    first_index: int  # corpus-wide index of the first document
    docs: list[Doc]
    jsonl_field: str
    val_fraction: float


@dataclass
class Summary:
    documents: int = 0
    bytes: int = 0
    shards: dict[str, list[Path]] = field(default_factory=lambda: {"train": [], "val": []})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})


def is_val(index: int, val_fraction: float) -> bool:
    """Document `index` is in the val split when it is the first past a multiple of 1/val_fraction."""
    return math.ceil((index + 1) * val_fraction) > math.ceil(index * val_fraction)


def find_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The input files in corpus order: each input in turn, a directory's *.txt files sorted."""
    files = []
    for given in map(Path, inputs):
        if given.is_dir():
            found = sorted((p for p in given.rglob("*.txt") if p.is_file()), key=lambda p: p.parts)
            if not found:
                raise PrepareError(
                    f"{given}: no .txt files in this directory; expected text files to tokenize"
                )
            files += found
        elif given.is_file():
            files.append(given)
        else:
            raise PrepareError(f"{given}: no such file or directory; check the INPUT path")
    return files


def read_docs(files: Iterable[Path]) -> Iterator[Doc]:
    """The documents of `files` in order; only JSONL lines are read here, text files by the workers."""
    for path in files:
        if path.suffix.lower() != ".jsonl":
            yield Doc(str(path), 0, None, path.stat().st_size)
            continue
        with path.open("rb") as f:  # bytes: lines split at \n only, and decoded in the workers
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield Doc(str(path), number, line, len(line))


def make_chunks(docs: Iterable[Doc], jsonl_field: str, val_fraction: float) -> Iterator[Chunk]:
    batch: list[Doc] = []
    size = first = 0
    for index, doc in enumerate(docs):
        if not batch:
            first = index
        batch.append(doc)
        size += doc.size
        if size >= CHUNK_BYTES:
            yield Chunk(first, batch, jsonl_field, val_fraction)
            batch, size = [], 0
    if batch:
        yield Chunk(first, batch, jsonl_field, val_fraction)


def document_text(doc: Doc, jsonl_field: str) -> str:
    where = f"{doc.path}:{doc.line}" if doc.line else doc.path
    try:
        # Decoding bytes ourselves keeps the text exactly as stored (no newline translation).
        text = (Path(doc.path).read_bytes() if doc.raw is None else doc.raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise PrepareError(f"{where}: not UTF-8 text ({err.reason}); convert it to UTF-8") from err
    if not doc.line:
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise PrepareError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno}); fix or remove the line"
        ) from err
    text = record.get(jsonl_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise PrepareError(
            f"{where}: expected a JSON object with a string field {jsonl_field!r}; "
            "fix the line or name the field with --jsonl-field"
        )
    return text


def tokenize_chunk(chunk: Chunk) -> dict[str, np.ndarray]:
    """The chunk's tokens of each split (runs in a worker process)."""
    texts: dict[str, list[str]] = {"train": [], "val": []}
    for index, doc in enumerate(chunk.docs, start=chunk.first_index):
        texts["val" if is_val(index, chunk.val_fraction) else "train"].append(
            document_text(doc, chunk.jsonl_field)
        )
    return {split: encode_documents(split_texts) for split, split_texts in texts.items()}


def tokenize_in_order(chunks: Iterable[Chunk], workers: int) -> Iterator[tuple[Chunk, dict[str, np.ndarray]]]:
    """Tokenize chunks in `workers` processes, yielding results in input order."""
    if workers == 1:
        yield from ((chunk, tokenize_chunk(chunk)) for chunk in chunks)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(tokenize_chunk, chunk)))
            # A bounded queue keeps memory flat however large the corpus is.
            if len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


class ShardWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` tokens (the last fewer)."""

    def __init__(self, out: Path, prefix: str, split: str, shard_tokens: int):
        self.out, self.prefix, self.split, self.shard_tokens = out, prefix, split, shard_tokens
        self.index = SPLIT_FIRST_INDEX[split]
        self.pending: list[np.ndarray] = []
        self.filled = 0
        self.written: list[Path] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.pending.append(tokens[:take])
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        path = self.out / f"{self.prefix}_{self.split}_{self.index:06d}.bin"
        self.written.append(write_shard(path, np.concatenate(self.pending)))
        self.index += 1
        self.pending, self.filled = [], 0


class Progress:
    """One status line on stderr: rewritten in place on a terminal, every 10 s in a log."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, summary: Summary, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10)):
            return
        self.last = now
        megabytes = summary.bytes / 1e6
        tokens = sum(summary.tokens.values())
        line = (
            f"{summary.documents:,} documents, {megabytes:,.1f} MB -> {tokens:,} tokens "
            f"({megabytes / max(now - self.start, 1e-9):.2f} MB/s)"
        )
        print(f"\r{line}" if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr)


def available_cpus() -> int:
    # The CPUs this process may run on (a container or taskset may allow fewer than the machine has).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_options(out: Path, prefix: str, val_fraction: float, shard_tokens: int, workers: int) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", prefix):
        raise PrepareError(f"--prefix {prefix!r}: expected letters, digits, '_', '.' or '-' (e.g. 'corpus')")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val-fraction {val_fraction}: expected a fraction in [0, 1), e.g. 0.05")
    if shard_tokens < 1:
        raise PrepareError(f"--shard-tokens {shard_tokens}: expected a positive token count, e.g. 100000000")
    if workers < 1:
        raise PrepareError(f"--workers {workers}: expected at least 1")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: is a file; expected a directory")


def old_shards(out: Path, prefix: str, overwrite: bool) -> list[Path]:
    """The shards of `prefix` already in `out`, which --overwrite replaces; refused without it."""
    old = sorted(p for split in SPLIT_FIRST_INDEX for p in out.glob(f"{prefix}_{split}_*.bin"))
    if old and not overwrite:
        raise PrepareError(
            f"--out {out}: already holds {len(old)} {prefix}_* shards; pass --overwrite to replace them, "
            "or choose another --out or --prefix"
        )
    return old


def prepare(
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    val_fraction: float = 0.05,
    shard_tokens: int = 10**8,
    prefix: str = "corpus",
    jsonl_field: str = "text",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Summary:
    """Tokenize `inputs` into shards under `out`; see the module docstring for the rules.

    The shards are written into a hidden staging folder in `out` and moved in only once every input
    has been read and tokenized: a bad input, a crash or --overwrite's failure leaves `out` as it was.
    """
    inputs, out = list(inputs), Path(out)
    workers = workers or available_cpus()
    check_options(out, prefix, val_fraction, shard_tokens, workers)
    files = find_files(inputs)
    gpt2_encoding()  # fail on a missing vocabulary before any work starts
    out.mkdir(parents=True, exist_ok=True)
    old = old_shards(out, prefix, overwrite)
    staging = out / f".{prefix}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of a run that was killed
    staging.mkdir()
    try:
        summary = tokenize_into(staging, inputs, files, prefix, shard_tokens, jsonl_field, val_fraction,
                                workers, progress)
        for path in old:
            path.unlink()
        summary.shards = {split: move_into(out, paths) for split, paths in summary.shards.items()}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def move_into(out: Path, paths: list[Path]) -> list[Path]:
    """Rename each of `paths` into `out` (same filesystem: atomic), durably; the new paths."""
    for path in paths:
        os.replace(path, out / path.name)
    fsync_dir(out)
    return [out / path.name for path in paths]


def tokenize_into(folder: Path, inputs: list, files: list[Path], prefix: str, shard_tokens: int,
                  jsonl_field: str, val_fraction: float, workers: int, progress: bool) -> Summary:
    """Tokenize `files` into shards in `folder`; a PrepareError if no document, or none for train."""
    writers = {split: ShardWriter(folder, prefix, split, shard_tokens) for split in SPLIT_FIRST_INDEX}
    summary, status = Summary(), Progress(progress)
    chunks = make_chunks(read_docs(files), jsonl_field, val_fraction)
    for chunk, tokens in tokenize_in_order(chunks, workers):
        summary.documents += len(chunk.docs)
        summary.bytes += sum(doc.size for doc in chunk.docs)
        for split, writer in writers.items():
            writer.add(tokens[split])
            summary.tokens[split] += len(tokens[split])
        status.update(summary)
    for split, writer in writers.items():
        writer.flush()
        summary.shards[split] = writer.written
    status.update(summary, final=True)
    if not summary.documents:
        raise PrepareError(f"{', '.join(map(str, inputs))}: no documents found; expected text or JSONL lines")
    if not summary.tokens["train"]:
        raise PrepareError(
            f"{folder.parent}: no document left for the train split ({summary.documents} documents in all); "
            "give more documents or lower --val-fraction"
        )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="text file, .jsonl file, or directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for the shards")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for val (0.05)")
    parser.add_argument("--shard-tokens", type=int, default=10**8, help="tokens per shard (100000000)")
    parser.add_argument("--prefix", default="corpus", help="shard file name prefix (corpus)")
    parser.add_argument("--jsonl-field", default="text", help="the JSONL field holding the text (text)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (all CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of this prefix")
    args = parser.parse_args(argv)
    try:
        summary = prepare(
            args.inputs,
            args.out,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            prefix=args.prefix,
            jsonl_field=args.jsonl_field,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=True,
        )
    except (PrepareError, ShardError, TokenizerUnavailable, OSError) as err:
        sys.exit(f"error: {err}")
    for split in ("train", "val"):
        print(f"{split}: {summary.tokens[split]:,} tokens in {len(summary.shards[split])} shards")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
