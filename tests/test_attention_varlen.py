"""Record #46's attention (FlashAttention-3 varlen) as block masks: the "varlen" window rule.

The record packs documents into one sequence per rank, hands the kernel their boundaries
(cu_seqlens, padded with empty segments) and calls it with causal=True, window_size=(w, 0), so query
i sees key j iff both lie in one segment and 0 <= i - j <= w: w + 1 keys, token-exact. Here the
reference is written from that statement, on segments given as cu_seqlens; the model gets the same
tokens (a BOS at each segment start) and builds its masks from document ids. Segments come packed as
the record's loader packs them in training (documents cut at max_doc_len, the last one cut at the
row's end) or as its unaligned validation stream cuts them (a leading piece without a BOS).
"""

import pytest
import torch
from test_attention_masks import assert_same_block_mask, keys_per_query
from torch.nn.attention.flex_attention import create_block_mask

from model import gpt as gpt_module
from model.attention import (
    BLOCK,
    dense_mask,
    document_ids,
    flex_attention,
    flex_block_mask,
    sdpa_attention,
    short_window,
)
from model.gpt import GPT, GPTConfig, mean_context

BOS = 0


def packed_lengths(length: int, max_doc_len: int, g: torch.Generator) -> list[int]:
    """Segment lengths filling `length` tokens as the record's training loader does: raw document
    lengths (1 to 3000 tokens), each cut to max_doc_len, the last one cut to what is left."""
    lengths, filled = [], 0
    while filled < length:
        longest = 3000 if torch.rand(1, generator=g) < 0.3 else 300
        raw = int(torch.randint(1, longest, (1,), generator=g))
        take = min(raw, max_doc_len, length - filled)
        lengths.append(take)
        filled += take
    return lengths


def validation_lengths(length: int, g: torch.Generator) -> list[int]:
    """Segment lengths of an unaligned validation slice: documents of any length, the slice starting
    inside one (the first segment has no BOS) and ending inside another."""
    return packed_lengths(length, length, g)


def cu_seqlens(lengths: list[int], padded_to: int) -> torch.Tensor:
    """The record's cu_seqlens: 0, the cumulative lengths, then the total repeated (empty segments)."""
    ends = torch.tensor(lengths).cumsum(0)
    padded = torch.full((padded_to,), int(ends[-1]))
    padded[0] = 0
    padded[1:len(lengths) + 1] = ends
    return padded


def tokens_for(lengths: list[int], leading_bos: bool, g: torch.Generator) -> torch.Tensor:
    """(1, T) tokens: a BOS at each segment start (but the first when leading_bos is False), other ids
    never BOS."""
    idx = torch.randint(1, 50, (1, sum(lengths)), generator=g)
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    idx[0, starts if leading_bos else starts[1:]] = BOS
    return idx


def varlen_reference(cu: torch.Tensor, length: int, window: int) -> torch.Tensor:
    """(1, T, T): query i sees key j iff one segment of cu_seqlens holds both and 0 <= i - j <= window."""
    i = torch.arange(length)
    segment = torch.searchsorted(cu, i, right=True)  # empty segments (repeated bounds) hold no position
    d = i[:, None] - i[None, :]
    return ((segment[:, None] == segment[None, :]) & (d >= 0) & (d <= window))[None]


def random_cases(n: int, seed: int):
    """n (length, window, tokens, reference) cases: half packed for training (max_doc_len 2048 or a
    small cap, so documents are often cut at it), half unaligned validation slices; windows of 0 to
    past the length, some the record's (multiples of 128, its validation 768 and 2560)."""
    g = torch.Generator().manual_seed(seed)
    for case in range(n):
        length = int(torch.randint(1, 2700, (1,), generator=g))
        if case % 3 == 0:
            length = BLOCK * max(1, length // BLOCK)
        training = case % 2 == 0
        cap = 2048 if case % 4 == 0 else int(torch.randint(1, 700, (1,), generator=g))
        lengths = packed_lengths(length, cap, g) if training else validation_lengths(length, g)
        record_windows = (768, 2560, 0, BLOCK * int(torch.randint(1, 14, (1,), generator=g)))
        any_window = int(torch.randint(0, length + 200, (1,), generator=g))
        window = record_windows[case % 4] if case % 3 else any_window
        idx = tokens_for(lengths, leading_bos=training, g=g)
        cu = cu_seqlens(lengths, padded_to=len(lengths) + 5)
        yield length, window, idx, varlen_reference(cu, length, window)


def record_cases():
    """The record's own shapes: a training row of 2304 tokens holding a document cut at max_doc_len
    2048 and one cut at the row's end, at its long windows 384 and 1664 (3, 13 blocks) and a short one;
    a validation slice of 3200 tokens (a leading piece, a 2900-token document, the start of another)
    at the final validation's windows, short 768 and long 2560."""
    g = torch.Generator().manual_seed(1)
    for lengths, leading_bos, windows in (([2048, 200, 56], True, (384, 1664, 640)),
                                          ([150, 2900, 150], False, (768, 2560))):
        idx = tokens_for(lengths, leading_bos, g)
        cu = cu_seqlens(lengths, padded_to=128)
        for window in windows:
            yield sum(lengths), window, idx, varlen_reference(cu, sum(lengths), window)


def from_dense(dense: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b, q_idx, kv_idx]

    return mask_mod


def test_varlen_block_mask_and_dense_mask_equal_the_fa3_varlen_rule():
    # create_block_mask evaluates the reference on every pair and derives full/partial blocks from
    # it; our block-level build must give the same lists, and the dense (SDPA) mask the same pairs.
    for length, window, idx, reference in [*random_cases(24, seed=0), *record_cases()]:
        docs = document_ids(idx, BOS)
        w = torch.tensor(window)
        context = f"T={length}, window={window}, documents={int(docs[0, -1])}"
        assert torch.equal(dense_mask(length, w, docs, "cpu", "varlen")[:, 0], reference), context
        got = flex_block_mask(length, w, docs, "cpu", "varlen")
        expected = create_block_mask(from_dense(reference), 1, None, length, length, device="cpu")
        assert_same_block_mask(got, expected, context)


def test_a_query_sees_w_plus_one_keys_where_its_document_allows():
    # One document of 3000 tokens, then one of 500: query i at offset since = i - start sees
    # min(w + 1, since + 1) keys under "varlen", min(w, since + 1) under "token"; "block" counts whole
    # blocks (up to w keys, and fewer than w + 1 at any block-aligned w).
    idx = torch.ones(1, 3500, dtype=torch.long)
    idx[0, [0, 3000]] = BOS
    docs = document_ids(idx, BOS)
    i = torch.arange(3500)
    since = torch.where(i < 3000, i, i - 3000)
    for window in (0, 1, 128, 384, 768, 2560):
        w = torch.tensor(window)
        keys = keys_per_query(dense_mask(3500, w, docs, "cpu", "varlen"))
        assert torch.equal(keys, torch.clamp_max(since + 1, window + 1)), f"window {window}"
        if window:
            token = keys_per_query(dense_mask(3500, w, docs, "cpu", "token"))
            block = keys_per_query(dense_mask(3500, w, docs, "cpu", "block"))
            assert int(keys.max()) == window + 1 and int(token.max()) == window
            assert not torch.equal(keys, block)
    assert mean_context(3500, 768, "varlen") == pytest.approx(
        float(torch.clamp_max(torch.arange(3500) + 1, 769).float().mean()))


def test_short_windows_halve_the_long_window_in_whole_blocks():
    # The record: long ws blocks of 128 tokens, short ws // 2 blocks (0 keeps the query alone).
    for blocks, short_blocks in ((1, 0), (3, 1), (7, 3), (11, 5), (13, 6), (20, 10)):
        assert int(short_window(torch.tensor(BLOCK * blocks), "varlen")) == BLOCK * short_blocks
    docs = torch.ones(1, 300, dtype=torch.long)
    alone = dense_mask(300, short_window(torch.tensor(BLOCK), "varlen"), docs, "cpu", "varlen")
    assert torch.equal(alone[0, 0], torch.eye(300, dtype=torch.bool))


def test_compiled_flex_attention_matches_sdpa_under_the_varlen_rule():
    # Flex compiled for the CPU (forward only) runs the block-sparse kernel: a wrong full/partial/
    # skipped block shows here. One ragged shape (T = 704), so one compile, every window through it.
    length, heads, head_dim = 704, 2, 16
    compiled = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator().manual_seed(2)
    for window in (0, 127, 128, 384, 700):
        idx = tokens_for(packed_lengths(length, 256, g), leading_bos=True, g=g)
        docs = document_ids(idx, BOS)
        q, k, v = (torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3))
        w = torch.tensor(window)
        got = compiled(q, k, v, 0.12, flex_block_mask(length, w, docs, "cpu", "varlen"))
        expected = sdpa_attention(q, k, v, 0.12, dense_mask(length, w, docs, "cpu", "varlen"))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"window {window}")


def test_the_model_takes_the_final_validations_short_window_explicitly(monkeypatch):
    # Record #46's final validation: long layers 20 blocks (2560 tokens), short ones 6 (768), not 10.
    seen = []
    real = gpt_module.build_mask

    def recording(backend, seq_len, window, docs, device, rule="token"):
        seen.append((int(window), rule))
        return real(backend, seq_len, window, docs, device, rule)

    monkeypatch.setattr(gpt_module, "build_mask", recording)
    cfg = GPTConfig(n_layer=2, n_head=1, head_dim=16, dim=16, max_seq_len=64, value_embeds=1,
                    vocab_size=64, attention="sdpa", window_rule="varlen")
    model = GPT(cfg)
    idx = torch.randint(1, 64, (1, 64))
    model(idx, window=torch.tensor(2560), short=torch.tensor(768))
    model(idx, window=torch.tensor(2560))
    assert seen == [(2560, "varlen"), (768, "varlen"), (2560, "varlen"), (1280, "varlen")]
