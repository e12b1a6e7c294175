"""The distributed loader: exact slices of the cyclic stream, world-size invariance, resumption,
document alignment and the validation batches."""

import threading

import numpy as np
import pytest
import torch

from data import loader as loader_module
from data.loader import TokenLoader, validation_batches
from data.shards import ShardError, write_shard
from data.tokenizer import EOT, VOCAB_SIZE

E = EOT


def make_shards(tmp_path, stream, cuts):
    """Write `stream` as shards split at positions `cuts`; return their paths in order."""
    pieces = np.split(np.asarray(stream), cuts)
    return [write_shard(tmp_path / f"t_train_{i:06d}.bin", piece) for i, piece in enumerate(pieces)]


@pytest.fixture
def counting(tmp_path):
    """Four shards (the second empty) whose token at stream position p is p, 357 tokens in all."""
    stream = np.arange(357)
    return stream, make_shards(tmp_path, stream, [100, 100, 157])


def cyclic(stream, start, length):
    return stream[(start + np.arange(length)) % len(stream)]


def test_batches_are_consecutive_slices_of_the_cyclic_stream(counting):
    stream, files = counting
    B, T = 3, 16
    loader = TokenLoader(files, B, T)
    for call in range(20):  # 20 * 48 tokens: straddles every boundary and wraps twice
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (B, T) and y.shape == (B, T)
        expected = cyclic(stream, call * B * T, B * T + 1)
        assert x.flatten().tolist() == expected[:-1].tolist()
        assert y.flatten().tolist() == expected[1:].tolist()


def test_cpu_batches_are_not_pinned(counting):
    x, y = TokenLoader(counting[1], 2, 8).next_batch()
    assert x.device.type == "cpu" and not x.is_pinned() and not y.is_pinned()


def global_batches(files, world_size, calls, **kwargs):
    """Per call, the ranks' x and y concatenated in rank order."""
    loaders = [TokenLoader(files, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    batches = []
    for _ in range(calls):
        parts = [ld.next_batch() for ld in loaders]
        batches.append((torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])))
    return batches


def test_two_calls_on_one_rank_read_what_two_ranks_read_in_one_call(counting):
    files = counting[1]
    one = global_batches(files, 1, 2, batch_size=2, seq_len=8)
    two = global_batches(files, 2, 1, batch_size=2, seq_len=8)
    assert torch.equal(torch.cat([one[0][0], one[1][0]]), two[0][0])
    assert torch.equal(torch.cat([one[0][1], one[1][1]]), two[0][1])


def test_data_per_step_is_the_same_for_any_world_size(counting):
    files = counting[1]
    # A step of 8 sequences: 1 rank x 8 micro-batches, 2 ranks x 4, or 8 ranks x 1 (grad accumulation).
    streams = {}
    for world_size in (1, 2, 8):
        batches = global_batches(files, world_size, 3 * 8 // world_size, batch_size=1, seq_len=10)
        streams[world_size] = torch.cat([x for x, _ in batches])
    assert streams[1].shape == (24, 10)
    assert torch.equal(streams[1], streams[2])
    assert torch.equal(streams[1], streams[8])


def test_restored_position_replays_the_same_batches(counting):
    files = counting[1]
    first = TokenLoader(files, 2, 16, rank=1, world_size=2)
    for _ in range(7):
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(5)]
    resumed = TokenLoader(files, 2, 16, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_next_shard_is_read_by_the_prefetch_thread(counting, monkeypatch):
    readers = []
    real = loader_module.read_shard

    def recording(path):
        readers.append((path.name, threading.current_thread().name))
        return real(path)

    monkeypatch.setattr(loader_module, "read_shard", recording)
    loader = TokenLoader(counting[1], 1, 50)
    loader.next_batch()  # tokens 0..50, all in shard 0
    loader.next_batch()  # tokens 50..100: the end of shard 0 and the first token of shard 2
    assert readers[0] == ("t_train_000000.bin", threading.current_thread().name)
    assert readers[1][0] == "t_train_000002.bin"
    assert readers[1][1].startswith("shard-prefetch")


# Documents: [E 1 2] [E 3 4 5 6 7 8 9] [E 10]; the shard boundary falls inside the long document.
DOCS = [E, 1, 2, E, 3, 4, 5, 6, 7, 8, 9, E, 10]


def test_aligned_rows_start_at_documents_cut_long_ones_and_wrap(tmp_path):
    files = make_shards(tmp_path, DOCS, [6])
    loader = TokenLoader(files, 2, 3, align_to_bos=True)
    x1, y1 = loader.next_batch()
    x2, y2 = loader.next_batch()
    # Row starts: 0; 3 (first EOT at/after 0+3); 11 (the long document's tail is skipped); 16 = 13 + 3
    # (after wrapping, the first EOT at/after 11+3).
    rows = [[E, 1, 2, E], [E, 3, 4, 5], [E, 10, E, 1], [E, 3, 4, 5]]
    assert torch.cat([x1, x2]).tolist() == [row[:-1] for row in rows]
    assert torch.cat([y1, y2]).tolist() == [row[1:] for row in rows]
    assert x1.is_contiguous() and y1.is_contiguous()
    assert loader.state_dict() == {"position": 16 + 3}


def test_aligned_search_wraps_from_the_last_shard_to_the_first(tmp_path):
    files = make_shards(tmp_path, DOCS, [6])
    loader = TokenLoader(files, 1, 1, align_to_bos=True)
    rows = [loader.next_batch()[0].item() for _ in range(4)]
    # Starts 0, 3, 11, then past the last EOT of the last shard: the first EOT of the next lap, 13.
    assert rows == [E, E, E, E]
    assert loader.state_dict() == {"position": 13 + 1}


def random_documents(seed, count, max_len):
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[E], rng.integers(0, E, size=rng.integers(0, max_len))]) for _ in range(count)]
    return np.concatenate(docs)


def test_aligned_batches_are_world_size_invariant_and_start_at_eot(tmp_path):
    files = make_shards(tmp_path, random_documents(0, 60, 40), [300, 700])
    one = global_batches(files, 1, 4, batch_size=4, seq_len=16, align_to_bos=True)
    four = global_batches(files, 4, 1, batch_size=4, seq_len=16, align_to_bos=True)
    x_one = torch.cat([x for x, _ in one])
    assert torch.equal(x_one, four[0][0])
    assert torch.equal(torch.cat([y for _, y in one]), four[0][1])
    assert (x_one[:, 0] == E).all()


def test_aligned_restored_position_replays_the_same_batches(tmp_path):
    files = make_shards(tmp_path, random_documents(1, 50, 30), [400])
    first = TokenLoader(files, 2, 8, align_to_bos=True)
    for _ in range(9):
        first.next_batch()
    resumed = TokenLoader(files, 2, 8, align_to_bos=True)
    resumed.load_state_dict(first.state_dict())
    for _ in range(6):
        assert torch.equal(first.next_batch()[0], resumed.next_batch()[0])


def record_starts(tokens, position, world_size, seq_len):
    """The record's rule, written out: each rank's start is the first EOT at least seq_len past the
    previous rank's start (the first rank: at or after `position`); the next step begins at the first
    EOT at least seq_len past the last rank's start."""
    bos = np.flatnonzero(np.asarray(tokens) == E)
    starts = [int(bos[bos >= position][0])]
    while len(starts) <= world_size:
        starts.append(int(bos[bos >= starts[-1] + seq_len][0]))
    return starts[:-1], starts[-1]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_aligned_rows_of_one_sequence_per_rank_are_the_records_starts(tmp_path, world_size):
    # Documents of 1..8 tokens: an EOT lands exactly seq_len after a start often, so an off-by-one in
    # "at least seq_len apart" changes the rows.
    tokens = random_documents(2, 300, 8)
    files = make_shards(tmp_path, tokens, [500, 1100])
    T, steps = 24, 5
    loaders = [TokenLoader(files, 1, T, rank=r, world_size=world_size, align_to_bos=True)
               for r in range(world_size)]
    position = 0
    for _ in range(steps):  # 5 steps of at most 3 x (24 + 8) tokens stay inside the first lap
        starts, position = record_starts(tokens, position, world_size, T)
        for loader, start in zip(loaders, starts, strict=True):
            x, y = loader.next_batch()
            assert x[0].tolist() == tokens[start : start + T].tolist()
            assert y[0].tolist() == tokens[start + 1 : start + T + 1].tolist()


def test_aligned_resume_mid_stream_on_two_ranks_replays_across_shards_and_the_wrap(tmp_path):
    files = make_shards(tmp_path, random_documents(3, 40, 30), [200, 450])
    kwargs = dict(batch_size=2, seq_len=12, world_size=2, align_to_bos=True)
    first = [TokenLoader(files, rank=r, **kwargs) for r in range(2)]
    for _ in range(5):
        for loader in first:
            loader.next_batch()
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1]  # ranks agree on the stream position without communicating
    resumed = [TokenLoader(files, rank=r, **kwargs) for r in range(2)]
    for loader, state in zip(resumed, states, strict=True):
        loader.load_state_dict(state)
    total = first[0].num_tokens
    for _ in range(12):  # 12 steps of 4 rows of >= 12 tokens: past shard ends and the wrap at `total`
        for a, b in zip(first, resumed, strict=True):
            (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert first[0].state_dict()["position"] > total


@pytest.mark.parametrize("bad_id", [VOCAB_SIZE, 50303, 65535])
def test_ids_outside_the_vocabulary_stop_the_loader_when_built_naming_the_shard(tmp_path, bad_id):
    # The bad id is in the last shard: it is refused before the first batch, not when reached.
    tokens = np.arange(300) % VOCAB_SIZE
    tokens[250] = bad_id
    files = make_shards(tmp_path, tokens, [100, 200])
    expected = (f"^{files[2]}: token id {bad_id} is outside the vocabulary of {VOCAB_SIZE} "
                f"\\(expected ids 0..50256; 1 outside, the first at position 50\\)")
    with pytest.raises(ShardError, match=expected):
        TokenLoader(files, 1, 8)
    with pytest.raises(ShardError, match=expected):
        validation_batches(files, 1, 8, 16)


def test_vocab_size_sets_the_largest_id_accepted(tmp_path):
    files = make_shards(tmp_path, np.arange(100), [])
    assert TokenLoader(files, 1, 8, vocab_size=100).num_tokens == 100
    with pytest.raises(ShardError, match="token id 99 is outside the vocabulary of 99 .*expected ids 0..98"):
        TokenLoader(files, 1, 8, vocab_size=99)


def test_aligned_without_any_eot_says_so(tmp_path):
    files = make_shards(tmp_path, np.arange(1, 50), [20])
    with pytest.raises(ShardError, match="needs EOT \\(50256\\) tokens, found none in 2 shards"):
        TokenLoader(files, 1, 4, align_to_bos=True).next_batch()


def test_validation_batches_cover_the_first_tokens_split_across_ranks(counting):
    stream, files = counting
    B, T, W = 2, 10, 3
    per_rank = [list(validation_batches(files, B, T, 2 * W * B * T, rank=r, world_size=W)) for r in range(W)]
    assert all(len(batches) == 2 for batches in per_rank)
    seen = torch.cat([per_rank[r][step][0].flatten() for step in range(2) for r in range(W)])
    assert seen.tolist() == stream[: 2 * W * B * T].tolist()


def test_validation_is_the_same_every_time(counting):
    first = [x for x, _ in validation_batches(counting[1], 2, 8, 64)]
    again = [x for x, _ in validation_batches(counting[1], 2, 8, 64)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_validation_tokens_must_be_a_multiple_of_the_global_batch(counting):
    with pytest.raises(ValueError, match="max_tokens=100 must be a positive multiple of .*=64; use e.g. 64"):
        validation_batches(counting[1], 2, 8, 100, world_size=4)


def test_validation_needs_enough_tokens(counting):
    with pytest.raises(ShardError, match="holds 357 tokens, fewer than max_tokens=360"):
        validation_batches(counting[1], 2, 10, 360)


def test_loader_rejects_bad_arguments(counting):
    files = counting[1]
    with pytest.raises(ValueError, match="rank must be in \\[0, world_size=2\\), got 2"):
        TokenLoader(files, 1, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-empty list of shard paths"):
        TokenLoader([], 1, 8)
    with pytest.raises(ValueError, match="non-empty list of shard paths"):
        TokenLoader(str(files[0]), 1, 8)


# ---- record #46's packing: documents cut at max_doc_len -----------------------------------------

# Documents A = [E 1 2 3 4 5], B = [E 6], C = [E 7 8 9], D = [E 10 11] at positions 0, 6, 8, 12 (15 in all).
PACKED_DOCS = [E, 1, 2, 3, 4, 5, E, 6, E, 7, 8, 9, E, 10, 11]


def test_packed_rows_cut_documents_at_max_doc_len_and_at_the_rows_end(tmp_path):
    # Rows of seq_len + 1 = 6 tokens, max_doc_len 3, two ranks of one row, two calls; the shard
    # boundary (position 7) falls inside B. By hand, pieces (start, tokens taken):
    #   row 0: A (0, 3 of 6), B (6, 2), C (8, 1: the row is full)        -> E 1 2 E 6 E
    #   row 1: D (12, 3), A (15, 3: after the wrap)                         -> E 10 11 E 1 2
    #   row 2: B (21, 2), C (23, 3 of 4), D (27, 1)                         -> E 6 E 7 8 E
    #   row 3: A (30, 3), B (36, 2), C (38, 1)                              -> E 1 2 E 6 E
    # Row 1 starts at D: C's EOT already ended row 0, and the rest of C is dropped with it.
    files = make_shards(tmp_path, PACKED_DOCS, [7])
    loaders = [TokenLoader(files, 1, 5, rank=r, world_size=2, max_doc_len=3) for r in range(2)]
    rows = [[E, 1, 2, E, 6, E], [E, 10, 11, E, 1, 2], [E, 6, E, 7, 8, E], [E, 1, 2, E, 6, E]]
    for call in range(2):
        for rank, loader in enumerate(loaders):
            x, y = loader.next_batch()
            row = rows[2 * call + rank]
            assert x.tolist() == [row[:-1]] and y.tolist() == [row[1:]], f"call {call}, rank {rank}"
    # The next call starts at D of the third lap: C's piece ended at its successor's start, 42.
    assert [ld.state_dict() for ld in loaders] == [{"position": 42}, {"position": 42}]


def packed_rows_by_document_index(tokens, doc, rows, seq_len, max_doc_len):
    """The packing restated over one lap's document list (as the record indexes its shard's EOTs):
    row after row, document `doc` onward, each cut to max_doc_len and to the room left in the row."""
    starts = np.flatnonzero(np.asarray(tokens) == E)
    ends = np.append(starts[1:], len(tokens))
    out = []
    for _ in range(rows):
        row = []
        while len(row) <= seq_len:
            take = min(ends[doc] - starts[doc], max_doc_len, seq_len + 1 - len(row))
            row.extend(tokens[starts[doc] : starts[doc] + take].tolist())
            doc += 1
        out.append(row)
    return out, doc


@pytest.mark.parametrize("world_size", [1, 3])
def test_packed_rows_follow_the_document_list_and_are_world_size_invariant(tmp_path, world_size):
    # Documents of 1..60 tokens, max_doc_len 16, rows of 33: many documents are cut at the cap and
    # the row ends fall anywhere, an EOT among them.
    tokens = random_documents(4, 200, 60)
    files = make_shards(tmp_path, tokens, [900, 2000])
    T, cap, steps = 32, 16, 4
    batches = global_batches(files, world_size, steps, batch_size=12 // world_size, seq_len=T,
                             max_doc_len=cap)
    expected, _ = packed_rows_by_document_index(tokens, 0, steps * 12, T, cap)
    got = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches])
    assert got.tolist() == expected
    for row in got:
        starts = torch.cat([torch.nonzero(row == E).flatten(), torch.tensor([T + 1])])
        assert starts[0] == 0 and (starts.diff() <= cap).all()


def test_packed_rows_resume_from_the_saved_position(tmp_path):
    files = make_shards(tmp_path, random_documents(5, 60, 40), [500])
    first = TokenLoader(files, 2, 20, max_doc_len=8)
    for _ in range(7):
        first.next_batch()
    resumed = TokenLoader(files, 2, 20, max_doc_len=8)
    resumed.load_state_dict(first.state_dict())
    for _ in range(5):
        assert torch.equal(first.next_batch()[0], resumed.next_batch()[0])


@pytest.mark.parametrize("kwargs", [dict(max_doc_len=0), dict(max_doc_len=8, align_to_bos=True)])
def test_packing_rejects_a_bad_max_doc_len(counting, kwargs):
    with pytest.raises(ValueError, match="max_doc_len must be >= 1 and without align_to_bos"):
        TokenLoader(counting[1], 1, 8, **kwargs)
