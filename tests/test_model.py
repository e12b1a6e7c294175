"""The GPT: shapes, the architecture's invariants (causality, windows, document masks), back-end agreement."""

import dataclasses
import math

import pytest
import torch
from conftest import random_gpt

from model import GPT, GPT2_EOT, PRESETS, GPTConfig

TINY = GPTConfig(vocab_size=256, n_layer=4, n_head=2, head_dim=16, dim=32, max_seq_len=64, value_embeds=2,
                 bos_token=0)


def randomized(cfg: GPTConfig) -> GPT:
    """Every weight random (N(0, 0.3²)), so every path, zero-initialized ones too, carries signal."""
    return random_gpt(cfg, scale=0.3)


def tokens(batch: int, length: int, seed: int = 1, low: int = 1) -> torch.Tensor:
    return torch.randint(low, TINY.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_initial_loss_is_log_vocab_because_the_head_starts_at_zero():
    model = GPT(TINY)
    idx = tokens(2, 16)
    loss = model(idx, idx)
    # zero head -> all logits 0 -> uniform softmax; float32 log/exp round-off only
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 1e-5


def test_output_projections_start_at_zero():
    model = GPT(TINY)
    for block in model.blocks:
        assert block.attn.o.weight.abs().max() == 0 and block.mlp.proj.weight.abs().max() == 0
    assert model.lm_head.weight.abs().max() == 0


def test_logits_shape_and_softcap_bound():
    model = randomized(TINY)
    logits = model(tokens(3, 20))
    assert logits.shape == (3, 20, TINY.vocab_size)
    assert logits.abs().max() <= TINY.logit_softcap


def test_causal_future_tokens_do_not_change_past_logits():
    model = randomized(TINY)
    idx = tokens(1, 32)
    changed = idx.clone()
    changed[0, 20:] = tokens(1, 12, seed=7)
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-5)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


def test_sliding_window_bounds_the_receptive_field():
    # each layer sees at most `window - 1` tokens back (short layers half that), so after L layers a
    # position t depends on tokens >= t - L * (window - 1) only.
    model = randomized(dataclasses.replace(TINY, document_masking=False))
    window, L = 4, TINY.n_layer
    idx = tokens(1, 40)
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % TINY.vocab_size
    a, b = model(idx, window=window), model(changed, window=window)
    reach = L * (window - 1)
    torch.testing.assert_close(a[:, reach + 1:], b[:, reach + 1:], rtol=0, atol=1e-5)
    full_a, full_b = model(idx), model(changed)
    assert (full_a[:, reach + 1:] - full_b[:, reach + 1:]).abs().max() > 1e-3, "full attention should reach"


def test_document_masking_isolates_documents():
    model = randomized(TINY)
    idx = tokens(1, 32)
    idx[0, 0] = idx[0, 12] = TINY.bos_token  # two documents: [0, 12) and [12, 32)
    changed = idx.clone()
    changed[0, 1:12] = tokens(1, 11, seed=9)
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, 12:], b[:, 12:], rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 8])
def test_flex_and_sdpa_back_ends_agree(window):
    idx = tokens(2, 32)
    idx[:, 10] = TINY.bos_token
    sdpa = randomized(dataclasses.replace(TINY, attention="sdpa"))
    flex = randomized(dataclasses.replace(TINY, attention="flex"))
    # same weights, same math; flex's unfused CPU path sums in another order: float32 round-off.
    # (Flex has no backward on CPU, so this compares forwards.)
    with torch.no_grad():
        expected = sdpa(idx, window=window)
        torch.testing.assert_close(flex(idx, window=window), expected, rtol=1e-4, atol=1e-4)


def test_value_embeddings_feed_first_and_last_blocks():
    model = GPT(dataclasses.replace(TINY, n_layer=6, value_embeds=2))
    assert model.value_embedding_layers() == [0, 1, None, None, 0, 1]


def test_speedrun_shape_parameter_count():
    with torch.device("meta"):
        model = GPT(PRESETS["124m"])
    V, d, L = 50304, 768, 12
    tables = V * d * (1 + 3) + V * d  # embedding + 3 value embeddings + untied head
    blocks = L * (4 * d * d + 2 * 4 * d * d)  # q, k, v, o and the 4x MLP
    scalars = L * 2 + L * 2 + L // 2  # block lambdas, value lambdas, skip weights
    assert sum(p.numel() for p in model.parameters()) == tables + blocks + scalars
    assert PRESETS["124m"].n_head * PRESETS["124m"].head_dim == d


def test_generate_is_seeded_and_stays_in_vocab():
    model = randomized(TINY)
    prompt = torch.tensor([[TINY.bos_token, 5, 6]])

    def run():
        seeded = torch.Generator().manual_seed(3)
        return model.generate(prompt, 10, top_k=5, vocab_limit=100, generator=seeded)

    out = run()
    assert out.shape == (1, 13) and torch.equal(out[:, :3], prompt)
    assert out.max() < 100
    assert torch.equal(out, run())


def test_sequence_longer_than_rotary_table_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        GPT(TINY)(tokens(1, TINY.max_seq_len + 1))


def test_eot_is_gpt2s():
    assert GPT2_EOT == 50256 and PRESETS["124m"].vocab_size % 128 == 0


def test_flops_per_token_counts_matmuls_and_each_layers_attention_window():
    model = GPT(TINY)
    matmuls = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_key = 6 * 2 * TINY.n_head * TINY.head_dim
    # full causal over T=4: queries see 1, 2, 3, 4 keys -> mean 2.5, in each of the 4 layers
    assert model.flops_per_token(4) == 6 * matmuls + per_key * 4 * 2.5
    # window 2 on T=4: long layers (0 and 3) see 1, 2, 2, 2 keys (mean 1.75); short ones (w=1) see 1
    assert model.flops_per_token(4, window=2) == 6 * matmuls + per_key * (2 * 1.75 + 2 * 1.0)
