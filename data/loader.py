"""Distributed, deterministic batches from token shards.

The global token stream is the concatenation of a split's shards, read cyclically (after the last
shard it wraps to the first). Each `next_batch` call consumes world_size * B * T tokens of it and
rank r takes the r-th slice, so the data of a step does not depend on how many ranks share it:
one rank making two calls reads exactly what two ranks read in one. No communication is needed.
"""

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data.shards import ShardError, check_shard, read_shard
from data.tokenizer import EOT, VOCAB_SIZE


class _Shard(NamedTuple):
    tokens: np.ndarray  # in RAM
    bos: np.ndarray | None  # sorted positions of EOT tokens, when document alignment needs them


class _Stream:
    """The cyclic token stream over `files`, addressed by unbounded stream positions.

    Holds one shard in RAM and loads the next one in a background thread, so reading forward
    never waits on the disk once the first shard is in. Every shard is validated, token ids
    included, when the stream is opened.
    """

    def __init__(self, files: Sequence[str | Path], find_bos: bool, vocab_size: int):
        if isinstance(files, str | Path) or not files:
            raise ValueError(
                f"expected a non-empty list of shard paths, got {files!r}; see data.shards.list_shards"
            )
        self.files = [Path(f) for f in files]
        self.find_bos = find_bos
        counts = [check_shard(f, vocab_size) for f in self.files]
        self.starts = [0, *np.cumsum(counts).tolist()]  # shard i covers [starts[i], starts[i+1])
        self.total = self.starts[-1]
        if self.total == 0:
            raise ShardError(
                f"{self.files[0].parent}: the shards hold no tokens; expected at least one token"
            )
        nonempty = [i for i, count in enumerate(counts) if count]
        self._next = {i: nonempty[(k + 1) % len(nonempty)] for k, i in enumerate(nonempty)}
        self._loaded: dict[int, _Shard] = {}
        self._pending: dict[int, Future] = {}
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens at stream positions [start, start + length), wrapping around the end."""
        out = np.empty(length, dtype=np.uint16)
        done = 0
        while done < length:
            offset = (start + done) % self.total
            i = bisect_right(self.starts, offset) - 1
            tokens = self._shard(i).tokens
            local = offset - self.starts[i]
            take = min(length - done, len(tokens) - local)
            out[done : done + take] = tokens[local : local + take]
            done += take
        return out

    def next_bos(self, position: int) -> int:
        """The smallest stream position >= `position` that holds an EOT (document start)."""
        lap = position - position % self.total
        offset = position % self.total
        i = bisect_right(self.starts, offset) - 1
        # Visiting every shard once, then the first again (its part before `offset`), finds any EOT.
        for _ in range(len(self._next) + 1):
            bos = self._shard(i).bos
            j = int(np.searchsorted(bos, offset - self.starts[i]))
            if j < len(bos):
                return lap + self.starts[i] + int(bos[j])
            if self._next[i] <= i:
                lap += self.total
            i = self._next[i]
            offset = self.starts[i]
        raise ShardError(
            f"{self.files[0].parent}: document alignment needs EOT ({EOT}) tokens, found none in "
            f"{len(self.files)} shards; use align_to_bos=False"
        )

    def _shard(self, i: int) -> _Shard:
        if i not in self._loaded:
            future = self._pending.pop(i, None)
            shard = future.result() if future else self._load(i)
            # Reads only move forward, so earlier shards are not needed until the stream wraps.
            self._loaded = {i: shard}
            following = self._next[i]
            if following != i and following not in self._pending:
                self._pending[following] = self._prefetcher.submit(self._load, following)
        return self._loaded[i]

    def _load(self, i: int) -> _Shard:
        tokens = np.array(read_shard(self.files[i]))
        return _Shard(tokens, np.flatnonzero(tokens == EOT) if self.find_bos else None)


class TokenLoader:
    """Batches (x, y) of int64 token ids, shape (batch_size, seq_len), y being x shifted by one.

    The stream is cut into rows of seq_len + 1 tokens, in order; a call takes the next
    world_size * batch_size rows and rank r keeps rows r * batch_size ... (r + 1) * batch_size - 1.
    Unaligned, row k is the stream's positions [k * seq_len, (k + 1) * seq_len]. With `align_to_bos`
    (the speedrun record's training batches) every row starts at a document's EOT: row k + 1 starts at
    the first EOT at or after row k's start + seq_len, so rows are at least seq_len apart, in order,
    and skip the fewest tokens that allows; a document that runs past its row's end loses its tail.
    With batch_size 1 (the speedrun preset) these are exactly the record's starts for its ranks.

    Either way the row sequence depends only on the shards and seq_len, so a step's data is the same
    for every split of it into world_size x batch_size x micro-batches. Unlike the record, rows run
    across shard boundaries (the record drops the end of a shard too short for one more step's rows)
    and the stream wraps after the last shard (the record stops there).

    Alignment skips the tail of the document at each row's end, so it suits sequences much longer
    than the documents. Measured on the demo corpus (74 documents, mean 1,738 tokens): 93.5% of the
    tokens skipped at seq_len 128, 77% at 1,024, 23.5% at 16,384, 4.6% at 49,152.

    With `max_doc_len` (record #46's training batches, its train_max_seq_len; exclusive with
    align_to_bos) rows are packed from documents instead: a row's seq_len + 1 tokens are the next
    documents in stream order, each from its EOT, each cut to at most max_doc_len tokens (its tail
    dropped), the last one cut where the row is full (its rest dropped too); the next row starts at
    the document after it. So every row starts at an EOT and every document in it (EOT to next EOT) is
    one of the record's varlen segments, at most max_doc_len long. With batch_size 1 these are the
    record's rows for its ranks (its BOSFinder.next_batch), except at shard ends, as above.

    Every shard's ids are checked below `vocab_size` (default GPT-2's 50,257) when the loader is
    built, so a bad shard stops the run before any step, naming the file.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        align_to_bos: bool = False,
        max_doc_len: int | None = None,
        vocab_size: int = VOCAB_SIZE,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if max_doc_len is not None and (max_doc_len < 1 or align_to_bos):
            raise ValueError(f"max_doc_len must be >= 1 and without align_to_bos (it packs documents "
                             f"itself), got max_doc_len={max_doc_len}, align_to_bos={align_to_bos}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.align_to_bos, self.max_doc_len = align_to_bos, max_doc_len
        self.position = 0  # stream position where the next call's global batch starts
        self._stream = _Stream(files, find_bos=align_to_bos or max_doc_len is not None, vocab_size=vocab_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch of world_size * batch_size sequences."""
        if self.align_to_bos or self.max_doc_len is not None:
            rows = self._to_device(self._aligned_rows() if self.align_to_bos else self._packed_rows())
            return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        size = self.batch_size * self.seq_len
        tokens = self._stream.read(self.position + self.rank * size, size + 1)
        self.position += self.world_size * size
        tokens = self._to_device(tokens)
        return tokens[:-1].view(self.batch_size, self.seq_len), tokens[1:].view(self.batch_size, self.seq_len)

    def reshape(self, batch_size: int, seq_len: int) -> None:
        """Read the following batches as batch_size rows of seq_len (+ 1) tokens each, from the same
        stream position: a batch-size schedule changes a run's rows without skipping or repeating data
        (the position is where the next row starts, a document start when rows are aligned or packed)."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.batch_size, self.seq_len = batch_size, seq_len

    @property
    def num_tokens(self) -> int:
        """Tokens in one pass over the shards (one epoch of the stream)."""
        return self._stream.total

    def state_dict(self) -> dict[str, int]:
        """The stream position; restoring it on the same shard list replays the same batches."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def _aligned_rows(self) -> np.ndarray:
        # Every rank walks all world_size * batch_size row starts (they depend on each other) in
        # stream order, reading only its own rows; that keeps the batches world-size invariant.
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.uint16)
        first = self.rank * self.batch_size
        cursor = self.position
        for k in range(self.world_size * self.batch_size):
            start = self._stream.next_bos(cursor)
            if first <= k < first + self.batch_size:
                rows[k - first] = self._stream.read(start, self.seq_len + 1)
            cursor = start + self.seq_len
        self.position = cursor
        return rows

    def _packed_rows(self) -> np.ndarray:
        # As _aligned_rows, every rank walks all rows (a row's documents depend on the rows before).
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.uint16)
        first = self.rank * self.batch_size
        cursor = self.position
        for k in range(self.world_size * self.batch_size):
            mine = first <= k < first + self.batch_size
            pieces, filled = [], 0
            while filled <= self.seq_len:
                start = self._stream.next_bos(cursor)
                cursor = self._stream.next_bos(start + 1)  # the document's end: the next one's start
                take = min(cursor - start, self.max_doc_len, self.seq_len + 1 - filled)
                if mine:
                    pieces.append(self._stream.read(start, take))
                filled += take
            if mine:
                rows[k - first] = np.concatenate(pieces)
        self.position = cursor
        return rows

    def _to_device(self, tokens: np.ndarray) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned host memory makes the copy asynchronous; widening to int64 happens on the GPU.
            host = torch.from_numpy(tokens.astype(np.int32)).pin_memory()
            return host.to(self.device, non_blocking=True).long()
        return torch.from_numpy(tokens.astype(np.int64)).to(self.device)


def validation_batches(
    files: Sequence[str | Path],
    batch_size: int,
    seq_len: int,
    max_tokens: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    vocab_size: int = VOCAB_SIZE,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed batches covering the first `max_tokens` tokens of the val stream, split across ranks.

    Never aligned to documents, so every validation token is scored; the shards' ids are checked
    below `vocab_size` here, when the batches are made.
    """
    step = world_size * batch_size * seq_len
    if max_tokens <= 0 or max_tokens % step:
        raise ValueError(
            f"max_tokens={max_tokens} must be a positive multiple of world_size*batch_size*seq_len={step}; "
            f"use e.g. {max(1, max_tokens // step) * step}"
        )
    loader = TokenLoader(files, batch_size, seq_len, rank=rank, world_size=world_size, device=device,
                         vocab_size=vocab_size)
    if loader.num_tokens < max_tokens:
        raise ShardError(
            f"{Path(files[0]).parent}: the val split holds {loader.num_tokens:,} tokens, fewer than "
            f"max_tokens={max_tokens:,}; validate on fewer tokens or add val shards"
        )
    return (loader.next_batch() for _ in range(max_tokens // step))
