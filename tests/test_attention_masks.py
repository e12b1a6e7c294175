"""The document + sliding-window + causal attention mask: block-level construction vs the elementwise rule.

Query i sees key j iff j <= i, both lie in the same document (documents start at each BOS), and the
window allows it: "token" i - j < window; "block" floor(i/128) - floor(j/128) < ceil(window/128) (the
2025-07-12 record's rule). `flex_block_mask` builds FlexAttention's BlockMask from per-128-token-block
quantities; these tests hold it to that rule on random documents, windows and lengths, and the
"block" rule to a re-enactment of the record's own block lists.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from model.attention import (
    BLOCK,
    dense_mask,
    document_ids,
    flex_attention,
    flex_block_mask,
    sdpa_attention,
    short_window,
)

BOS = 0
BLOCK_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def random_documents(batch: int, length: int, mean_docs: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) document ids: each position is a BOS with probability mean_docs / length."""
    idx = torch.randint(1, 50, (batch, length), generator=generator)
    idx[torch.rand(batch, length, generator=generator) < mean_docs / length] = BOS
    return document_ids(idx, BOS)


def random_cases(n: int, seed: int, max_len: int = 900):
    """n (length, window, docs) triples: lengths ragged or whole blocks, windows any size from 1 to past
    the length (mostly not multiples of 128), 0 to ~6 documents, so documents often outrun the window."""
    g = torch.Generator().manual_seed(seed)
    for case in range(n):
        length = int(torch.randint(1, max_len, (1,), generator=g))
        if case % 4 == 0:
            length = BLOCK * max(1, length // BLOCK)
        window = int(torch.randint(1, length + 200, (1,), generator=g))
        mean_docs = float(torch.randint(0, 7, (1,), generator=g))
        yield length, window, random_documents(2, length, mean_docs, g)


def elementwise_rule(length: int, window: int | None, docs: torch.Tensor | None, rule: str = "token"):
    """The rule as a mask_mod, read off a dense (T, T) mask: the SDPA back end's for "token", the
    reference `block_rule` for "block"."""
    if rule == "block":
        dense = block_rule(length, window, docs)[:, None]
    else:
        dense = dense_mask(length, None if window is None else torch.tensor(window), docs, "cpu")

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b if docs is not None else 0, 0, q_idx, kv_idx]

    return mask_mod


def block_rule(length: int, window: int, docs: torch.Tensor) -> torch.Tensor:
    """(B, T, T) reference of the "block" rule, from its statement alone: j <= i, same document, and
    query block minus key block < W = max(1, ceil(window / 128))."""
    i = torch.arange(length)
    blocks = max(1, -(-window // BLOCK))
    near = (i[:, None] // BLOCK - i[None, :] // BLOCK) < blocks
    return (i[:, None] >= i[None, :]) & near & (docs[:, :, None] == docs[:, None, :])


def records_mask(docs: torch.Tensor, window_blocks: int) -> torch.Tensor:
    """(B, T, T): what the record's BlockMask lets through, re-enacted from its construction (T a
    multiple of 128). Per query block m: the key blocks where causal + document is partial and where
    it is full, each listed nearest first; it keeps the first min(F, W - 1) full blocks (none if that
    is negative) and the first min(P, max(1, W - F)) partial ones, F and P the list lengths, and inside
    a kept partial block applies causal + document token by token."""
    B, T = docs.shape
    N = T // BLOCK
    lo, hi = docs[:, ::BLOCK], docs[:, BLOCK - 1::BLOCK]
    i = torch.arange(T)
    token_rule = (i[:, None] >= i[None, :]) & (docs[:, :, None] == docs[:, None, :])
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for m in range(N):
            overlap = [n for n in range(m + 1) if lo[b, m] <= hi[b, n] and lo[b, n] <= hi[b, m]]
            full = [n for n in overlap if n < m and hi[b, m] == lo[b, n] and lo[b, m] == hi[b, n]]
            partial = [n for n in overlap if n not in full]
            full, partial = sorted(full, reverse=True), sorted(partial, reverse=True)
            kept_full = full[:max(0, min(len(full), window_blocks - 1))]
            kept_partial = partial[:min(len(partial), max(1, window_blocks - len(full)))]
            rows = slice(m * BLOCK, (m + 1) * BLOCK)
            for n in kept_full:
                allowed[b, rows, n * BLOCK:(n + 1) * BLOCK] = True
            for n in kept_partial:
                cols = slice(n * BLOCK, (n + 1) * BLOCK)
                allowed[b, rows, cols] = token_rule[b, rows, cols]
    return allowed


def assert_same_block_mask(got, expected, context: str):
    for field in BLOCK_MASK_FIELDS:
        assert torch.equal(getattr(got, field), getattr(expected, field)), f"{field} differs for {context}"


def test_block_mask_equals_the_elementwise_definition():
    # create_block_mask evaluates the rule on every (q, k) pair and derives the full/partial blocks
    # from that; ours must give the same kv and q block lists (counts and order), exactly.
    for length, window, docs in random_cases(40, seed=0):
        got = flex_block_mask(length, torch.tensor(window), docs, "cpu")
        expected = create_block_mask(elementwise_rule(length, window, docs), 2, None, length, length,
                                     device="cpu")
        assert_same_block_mask(got, expected, f"T={length}, window={window}, docs={docs[:, -1].tolist()}")


@pytest.mark.parametrize("window, with_docs", [(None, True), (200, False), (None, False)])
def test_block_mask_without_window_or_documents_equals_the_elementwise_definition(window, with_docs):
    docs = random_documents(2, 700, 4, torch.Generator().manual_seed(1)) if with_docs else None
    got = flex_block_mask(700, None if window is None else torch.tensor(window), docs, "cpu")
    batch = 2 if with_docs else None
    expected = create_block_mask(elementwise_rule(700, window, docs), batch, None, 700, 700, device="cpu")
    assert_same_block_mask(got, expected, f"window={window}, docs={with_docs}")


def test_compiled_flex_attention_matches_dense_reference_attention():
    # Flex compiled for the CPU (forward only: it has no CPU backward) runs the block-sparse kernel,
    # so a wrong full/partial/skipped block would show here. One shape, so one compile (~10 s):
    # T = 704 = 5.5 blocks, a ragged last block. float32 both sides; flex's online softmax sums
    # blocks in another order than SDPA's: round-off ~1e-7 on O(1) outputs, checked at 1e-5.
    length, heads, head_dim = 704, 2, 16
    compiled = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator().manual_seed(2)
    for window in (1, 37, 128, 200, 333, 700):
        docs = random_documents(2, length, 3, g)
        q, k, v = (torch.randn(2, heads, length, head_dim, generator=g) for _ in range(3))
        w = torch.tensor(window)
        got = compiled(q, k, v, 0.12, flex_block_mask(length, w, docs, "cpu"))
        expected = sdpa_attention(q, k, v, 0.12, dense_mask(length, w, docs, "cpu"))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"window {window}")


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_block_mask_is_built_from_blocks_not_token_pairs():
    # T = 8192: N = 64 blocks. The block-level build makes tensors of at most B * N * (N + 1)
    # elements (FlexAttention's transpose to query-side lists pads one column); an elementwise build
    # would make B * T^2 = 134M. Document ids (B, T) come in ready-made.
    length, batch = 8192, 2
    docs = random_documents(batch, length, 20, torch.Generator().manual_seed(3))
    with LargestTensor() as largest:
        flex_block_mask(length, torch.tensor(1000), docs, "cpu")
    blocks = length // BLOCK
    assert largest.numel <= batch * blocks * (blocks + 1)


# ---- the record's block-granular window ("block") ------------------------------------------------


@pytest.mark.parametrize("record_blocks", [1, 2, 3, 5, 14])
def test_the_block_rule_is_what_the_records_block_lists_let_through(record_blocks):
    # The record's long window is W = window/128 blocks, its short one W // 2 (0 at W = 1). Ours takes
    # the window in tokens: the long layers get 128 W, the short ones short_window(128 W).
    g = torch.Generator().manual_seed(5)
    for length, mean_docs in ((1024, 3), (1024, 12), (640, 0)):
        docs = random_documents(2, length, mean_docs, g)
        window = torch.tensor(BLOCK * record_blocks)
        for ours, theirs in ((window, record_blocks), (short_window(window, "block"), record_blocks // 2)):
            got = dense_mask(length, ours, docs, "cpu", "block")[:, 0]
            assert torch.equal(got, records_mask(docs, theirs)), f"W={theirs}, T={length}"
            assert torch.equal(got, block_rule(length, int(ours), docs))


def test_block_rule_block_mask_equals_the_elementwise_definition():
    # Windows in tokens of every size (ceil to blocks: 1, 2, odd counts), lengths ragged or whole.
    for length, window, docs in random_cases(30, seed=6):
        got = flex_block_mask(length, torch.tensor(window), docs, "cpu", "block")
        expected = create_block_mask(elementwise_rule(length, window, docs, "block"), 2, None, length, length,
                                     device="cpu")
        assert_same_block_mask(got, expected, f"T={length}, window={window}, docs={docs[:, -1].tolist()}")
        dense = dense_mask(length, torch.tensor(window), docs, "cpu", "block")[:, 0]
        assert torch.equal(dense, block_rule(length, window, docs))


def test_compiled_flex_attention_matches_dense_reference_attention_under_the_block_rule():
    # As the token-rule test above (a ragged T = 704), windows of 1, 1, 2 and 3 blocks.
    length, heads, head_dim = 704, 2, 16
    compiled = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator().manual_seed(7)
    for window in (1, 128, 200, 333):
        docs = random_documents(2, length, 3, g)
        q, k, v = (torch.randn(2, heads, length, head_dim, generator=g) for _ in range(3))
        w = torch.tensor(window)
        got = compiled(q, k, v, 0.12, flex_block_mask(length, w, docs, "cpu", "block"))
        expected = sdpa_attention(q, k, v, 0.12, dense_mask(length, w, docs, "cpu", "block"))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"window {window}")


def keys_per_query(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(dim=-1).flatten()


def test_short_windows_the_record_gives_and_the_token_rule_does_not():
    # The example: 2,048 tokens, 3 documents, long window 128. The record's short layers get
    # W // 2 = 0 blocks, i.e. the query's own block: up to 128 keys; the token rule gives 64.
    idx = torch.ones(1, 2048, dtype=torch.long)
    idx[0, [0, 700, 1500]] = BOS
    docs = document_ids(idx, BOS)
    window = torch.tensor(128)
    block = dense_mask(2048, short_window(window, "block"), docs, "cpu", "block")
    token = dense_mask(2048, short_window(window, "token"), docs, "cpu", "token")
    assert keys_per_query(block).max() == 128 and keys_per_query(token).max() == 64
    # Neither contains the other: the block rule drops the previous block's keys at a block's start.
    only_block, only_token = (block & ~token).sum(), (token & ~block).sum()
    assert only_block > 0 and only_token > 0
    # Both as counted by hand: query i at offset r = i mod 128 in its block, s its document's start;
    # block rule keys min(r, i - s) + 1, token rule min(64, i - s + 1).
    starts = torch.tensor([0, 700, 1500])
    i = torch.arange(2048)
    since = i - starts[(i[:, None] >= starts).sum(dim=1) - 1]
    assert torch.equal(keys_per_query(block), torch.minimum(i % 128, since) + 1)
    assert torch.equal(keys_per_query(token), torch.clamp_max(since + 1, 64))
    # At 3 blocks (the schedule's window 384, e.g. step 300) the short layers get 1 block, not 192 tokens.
    assert int(short_window(torch.tensor(384), "block")) == 128
    assert int(short_window(torch.tensor(384), "token")) == 192
