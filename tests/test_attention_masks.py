"""The document + sliding-window + causal attention mask: block-level construction vs the elementwise rule.

Query i sees key j iff j <= i, i - j < window and both lie in the same document (documents start at
each BOS). `flex_block_mask` builds FlexAttention's BlockMask from per-128-token-block quantities;
these tests hold it to that rule on random documents, windows and lengths.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from model.attention import BLOCK, dense_mask, document_ids, flex_attention, flex_block_mask, sdpa_attention

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


def elementwise_rule(length: int, window: int | None, docs: torch.Tensor | None):
    """The rule as a mask_mod, read off the dense (T, T) mask that the SDPA back end uses."""
    dense = dense_mask(length, None if window is None else torch.tensor(window), docs, "cpu")

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b if docs is not None else 0, 0, q_idx, kv_idx]

    return mask_mod


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
