"""The GPT: shapes, the architecture's invariants (causality, windows, document masks), back-end agreement."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from conftest import ROOT, random_gpt

from data.tokenizer import EOT
from model import GPT, PRESETS, GPTConfig
from model.attention import dense_mask
from model.gpt import long_window_layers, mean_context

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


def test_merged_qkv_is_three_linear_maps_in_one_weight_initialized_like_each():
    model = GPT(dataclasses.replace(TINY, dim=256))
    qkv = model.blocks[0].attn.qkv
    inner, d = TINY.n_head * TINY.head_dim, 256
    assert qkv.weight.shape == (3, inner, d) and "blocks.0.attn.qkv.weight" in model.state_dict()
    x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(4))
    separate = torch.cat([x @ w.T for w in qkv.weight.unbind()], dim=-1)  # [q | k | v] features
    torch.testing.assert_close(qkv(x), separate, rtol=1e-6, atol=1e-6)
    # each W_i ~ U(-a, a), a = sqrt(3) * 0.5 / sqrt(d_in): std 0.5 / sqrt(d_in) (the record's and
    # every other hidden Linear's). 32 x 256 samples a slice: the sample std spreads by ~0.5%.
    bound = math.sqrt(3) * 0.5 / math.sqrt(d)
    assert qkv.weight.abs().max() <= bound
    for w in qkv.weight.unbind():
        assert w.std().item() == pytest.approx(0.5 / math.sqrt(d), rel=0.05)


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
@pytest.mark.parametrize("window", [None, 8, torch.tensor(13)])
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


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_and_sdpa_back_ends_agree_under_the_block_rule():
    # T = 300 over 3 blocks, window 128: long layers see their own block, short ones too. Eager flex
    # evaluates mask_mod on every pair, ignoring the block lists: it must state the window itself.
    cfg = dataclasses.replace(TINY, max_seq_len=300, window_rule="block")
    idx = tokens(1, 300)
    idx[:, 190] = TINY.bos_token
    sdpa = randomized(dataclasses.replace(cfg, attention="sdpa"))
    flex = randomized(dataclasses.replace(cfg, attention="flex"))
    with torch.no_grad():
        expected = sdpa(idx, window=128)
        torch.testing.assert_close(flex(idx, window=128), expected, rtol=1e-4, atol=1e-4)
        assert (expected - sdpa(idx, window=256)).abs().max() > 1e-3  # the window is in effect


def test_value_embeddings_feed_first_and_last_blocks():
    model = GPT(dataclasses.replace(TINY, n_layer=6, value_embeds=2))
    assert model.value_embedding_layers() == [0, 1, None, None, 0, 1]


def test_speedrun_shape_parameter_count():
    with torch.device("meta"):
        model = GPT(PRESETS["124m"])
    V, d, L, A = 50304, 768, 12, 11  # A: blocks with attention (the record drops layer 7's)
    tables = V * d * (1 + 3) + V * d  # embedding + 3 value embeddings + untied head
    blocks = A * 4 * d * d + L * 2 * 4 * d * d  # q, k, v, o where there is attention; the 4x MLP
    scalars = L * 2 + A * 2 + L // 2  # block lambdas, value lambdas, skip weights
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


# A fresh process with 2 threads: record the vector-math calls made while model.attention is imported and
# a Rotary builds its (256, 32) tables, and measure the tables against float64's cos and sin of the same
# float32 angles.
FRESH_ROTARY = """
import json, torch
from torch.overrides import TorchFunctionMode
torch.set_num_threads(2)
calls = []
class Record(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("cos", "sin"):
            calls.append([func.__name__, args[0].numel()])
        return func(*args, **(kwargs or {}))
with Record():
    from model.attention import Rotary
    rotary = Rotary(64, 256)
angles = torch.outer(torch.arange(256, dtype=torch.float32), rotary.theta).double()
errors = [(rotary.cos.double() - angles.cos()).abs().max().item(),
          (rotary.sin.double() - angles.sin()).abs().max().item()]
print(json.dumps(dict(calls=calls, errors=errors)))
"""


def test_rotary_tables_are_accurate_in_a_fresh_process():
    """MKL's vector math is set up by a single-threaded call before the first table is built: its first
    call split over threads left one thread on a low-accuracy path (2e-4) in some processes."""
    probe = subprocess.run([sys.executable, "-c", FRESH_ROTARY], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    report = json.loads(probe.stdout)
    assert report["calls"][0] == ["cos", 1]  # the set-up call, before the tables' 8192-element cos
    assert max(report["errors"]) < 1e-6  # float32 rounding of a 1-ulp cos is 6e-8; the bad path's 2e-4


def test_eot_is_gpt2s():
    assert EOT == 50256 and PRESETS["124m"].vocab_size % 128 == 0


def test_flops_per_token_counts_matmuls_and_each_layers_attention_window():
    model = GPT(TINY)
    d, inner = TINY.dim, TINY.n_head * TINY.head_dim  # per block: q, k, v, o; MLP 4d x d twice; head
    matmuls = TINY.n_layer * (4 * d * inner + 2 * 4 * d * d) + TINY.vocab_size * d
    per_key = 6 * 2 * TINY.n_head * TINY.head_dim
    # full causal over T=4: queries see 1, 2, 3, 4 keys -> mean 2.5, in each of the 4 layers
    assert model.flops_per_token(4) == 6 * matmuls + per_key * 4 * 2.5
    # window 2 on T=4: long layers (0 and 3) see 1, 2, 2, 2 keys (mean 1.75); short ones (w=1) see 1
    assert model.flops_per_token(4, window=2) == 6 * matmuls + per_key * (2 * 1.75 + 2 * 1.0)


@pytest.mark.parametrize("rule", ["token", "block"])
def test_mean_context_is_the_mean_number_of_keys_the_mask_allows(rule):
    for T, w in [(1, 1), (100, 7), (300, 128), (300, 129), (700, 384), (1000, 2000)]:
        allowed = dense_mask(T, torch.tensor(w), None, "cpu", rule).sum().item()
        assert mean_context(T, w, rule) == pytest.approx(allowed / T, rel=1e-12), f"T={T}, w={w}"


def test_flops_per_token_counts_the_block_rules_short_window_in_blocks():
    # window 384 = 3 blocks: long layers (0 and 3) 3 blocks, short ones 3 // 2 = 1 block (not 192 tokens)
    model = GPT(dataclasses.replace(TINY, window_rule="block"))
    per_key = 6 * 2 * TINY.n_head * TINY.head_dim
    attention = model.flops_per_token(700, window=384) - model.flops_per_token(700, window=None)
    long, short, full = (mean_context(700, w, "block") for w in (384, 128, 700))
    assert attention == pytest.approx(per_key * (2 * long + 2 * short - 4 * full), rel=1e-12)


def test_window_as_int_or_tensor_is_the_same_function():
    model = randomized(TINY)
    idx = tokens(2, 40)
    idx[:, 17] = TINY.bos_token
    with torch.no_grad():
        torch.testing.assert_close(model(idx, window=9), model(idx, window=torch.tensor(9)), rtol=0, atol=0)


def test_long_window_layers_choose_which_blocks_see_the_long_window():
    # 2 blocks, window 8: on the long window a block reaches 7 tokens back, on the short one 3; so
    # position 7 depends on token 0 only if some block has the long window.
    cfg = dataclasses.replace(TINY, n_layer=2, value_embeds=1, document_masking=False)
    idx = tokens(1, 12)
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % TINY.vocab_size

    def reaches_back_7(long_layers):
        model = randomized(dataclasses.replace(cfg, long_window_layers=long_layers))
        return (model(idx, window=8)[0, 7] - model(changed, window=8)[0, 7]).abs().max() > 1e-3

    assert not reaches_back_7(())  # two short blocks: reach 2 * 3 = 6
    assert reaches_back_7((1,))


@pytest.mark.parametrize("n_layer, expected", [(4, {0, 3}), (12, {0, 4, 7, 11}), (24, {0, 4, 8, 15, 19, 23})])
def test_default_long_windows_are_every_fourth_block_from_each_end(n_layer, expected):
    assert long_window_layers(dataclasses.replace(TINY, n_layer=n_layer)) == expected


# ---------------------------------------------------------------------------------------------------
# The record's architecture (2025-07-12 "BosAlign"): head, attention-free block, value scaling, dtypes

RECORD_TINY = dataclasses.replace(TINY, n_layer=6, head_softcap="sigmoid", value_lambda_all_layers=True,
                                  attention_free_layers=(2,))  # value embeddings feed blocks 0, 1, 4, 5


def test_124m_preset_is_the_records_architecture():
    cfg = PRESETS["124m"]
    assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.head_dim, cfg.vocab_size) == (12, 768, 6, 128, 50304)
    assert (cfg.head_softcap, cfg.logit_softcap, cfg.sigmoid_softcap_scale) == ("sigmoid", 30.0, 7.5)
    assert cfg.attention_free_layers == (7,) and cfg.long_window_layers == (0, 4, 7, 11)
    assert cfg.value_lambda_all_layers and cfg.cuda_dtype == "bfloat16" and cfg.window_rule == "block"
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.value_embedding_layers() == [0, 1, 2] + [None] * 6 + [0, 1, 2]
    assert [block.attn is None for block in model.blocks] == [i == 7 for i in range(12)]


def test_learned_scalars_start_at_the_records_values():
    model = GPT(RECORD_TINY)
    assert torch.equal(model.skip_weights, torch.ones(3))
    for block in model.blocks:
        assert torch.equal(block.lambdas, torch.tensor([1.0, 0.0]))  # x <- 1 * x + 0 * x0
        if block.attn is not None:
            assert torch.equal(block.attn.value_lambdas, torch.tensor([0.5, 0.5]))


def softcap_value_and_slope_at_zero(cfg: GPTConfig) -> tuple[float, float]:
    z = torch.zeros((), requires_grad=True)
    capped = GPT(cfg).soft_cap(z)
    capped.backward()
    return capped.item(), z.grad.item()


def test_sigmoid_head_is_30_sigmoid_z_over_7_5_sqrt_dim():
    # 30 * sigmoid(z / (7.5 sqrt(dim))): 15 at z = 0, slope 30 / (4 * 7.5 * sqrt(dim)) there, range (0, 30)
    cfg = dataclasses.replace(TINY, head_softcap="sigmoid")
    value, slope = softcap_value_and_slope_at_zero(cfg)
    assert value == 15.0 and slope == pytest.approx(1 / math.sqrt(cfg.dim), rel=1e-6)  # float32 round-off
    logits = randomized(cfg)(tokens(2, 16))
    assert logits.min() > 0 and logits.max() < 30


def test_tanh_head_is_30_tanh_z_over_30():
    value, slope = softcap_value_and_slope_at_zero(TINY)
    assert value == 0.0 and slope == pytest.approx(1.0, rel=1e-6)  # float32 round-off


def test_attention_free_block_mixes_no_positions():
    # Without attention a block is position-wise: changing other positions leaves position 5 alone.
    block = randomized(RECORD_TINY).blocks[2]
    x, x0 = torch.randn(1, 10, TINY.dim), torch.randn(1, 10, TINY.dim)
    changed = x.clone()
    changed[0, :5] += 1.0
    with torch.no_grad():
        a, b = block(x, x0, None, "sdpa", None), block(changed, x0, None, "sdpa", None)
    torch.testing.assert_close(a[:, 5:], b[:, 5:], rtol=0, atol=0)


@pytest.mark.parametrize("all_layers", [True, False])
def test_value_lambda_scales_values_in_blocks_without_value_embedding(all_layers):
    # Block 3 takes no value embedding: with value_lambda_all_layers, v <- l0 * v, so l0 = 0 silences
    # its attention; without, l0 is unused.
    model = randomized(dataclasses.replace(RECORD_TINY, value_lambda_all_layers=all_layers))
    attn = model.blocks[3].attn
    with torch.no_grad():
        attn.value_lambdas[0] = 0.0
        out = attn(torch.randn(1, 8, TINY.dim), None, "sdpa", None)
    assert (out.abs().max() == 0) == all_layers


def test_flops_per_token_counts_no_attention_in_attention_free_blocks():
    with_attention = GPT(dataclasses.replace(RECORD_TINY, attention_free_layers=()))
    without = GPT(RECORD_TINY)
    inner = TINY.n_head * TINY.head_dim
    # block 2 is short-window (long: 0 and 5): window 4 -> 2 over T = 8, mean context 2 - 2 * 1 / 16
    attention_of_block_2 = 6 * 4 * TINY.dim * inner + 6 * 2 * inner * (2 - 2 / 16)
    difference = with_attention.flops_per_token(8, window=4) - without.flops_per_token(8, window=4)
    assert difference == pytest.approx(attention_of_block_2, rel=1e-12)  # float64 sums of integers


def test_bf16_embeddings_run_the_stream_in_bf16_close_to_float32():
    fp32 = randomized(RECORD_TINY).train()
    bf16 = random_gpt(RECORD_TINY, scale=0.3).train().cast_embeddings(torch.bfloat16)
    idx = tokens(2, 32)
    idx[:, 11] = TINY.bos_token
    stream = []
    bf16.blocks[1].register_forward_hook(lambda module, args, out: stream.append(out.dtype))
    loss = bf16(idx, idx, window=8)
    loss.backward()
    assert stream == [torch.bfloat16] and loss.dtype == torch.float32
    assert bf16.lm_head.weight.dtype == bf16.lm_head.weight.grad.dtype == torch.float32  # fp32 masters
    with torch.no_grad():
        # bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%): logits in (0, 30) within 30 * 2^-8;
        # the loss, a mean over 64 tokens, within 2^-8 relative. Measured: 0.05 and 1e-4.
        torch.testing.assert_close(bf16(idx, window=8), fp32(idx, window=8), rtol=0, atol=30 * 2**-8)
        torch.testing.assert_close(loss, fp32(idx, idx, window=8), rtol=2**-8, atol=0)


def test_to_device_keeps_cpu_in_float32_whatever_cuda_dtype_says():
    model = GPT(dataclasses.replace(RECORD_TINY, cuda_dtype="bfloat16")).to_device("cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("change, message", [
    (dict(head_softcap="cubic"), "head_softcap"),
    (dict(cuda_dtype="float16"), "cuda_dtype"),
    (dict(long_window_layers=(0, 6)), "long_window_layers"),
    (dict(attention_free_layers=(1, 5)), "value embedding"),  # table 1 would feed no block
])
def test_config_refuses_bad_values_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(RECORD_TINY, **change)


def test_generate_works_on_the_records_architecture():
    model = randomized(RECORD_TINY)
    out = model.generate(torch.tensor([[TINY.bos_token, 5]]), 6, top_k=4, vocab_limit=100,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8) and out.max() < 100


# ---------------------------------------------------------------------------------------------------
# One compiled graph for the whole window schedule

SCHEDULE = [16 * k for k in range(1, 15)]  # the speedrun's 128, 256, ..., 1792, scaled to T = 256
COMPILE_CFG = dataclasses.replace(TINY, vocab_size=128, max_seq_len=256)  # vocab != T: no (T, T) logits


def compile_counting(model: GPT) -> tuple[torch.nn.Module, list[torch.fx.GraphModule]]:
    """torch.compile(model, dynamic=False) with a backend that keeps each graph (tagged with the mode
    it was captured in, `graph.mode`) and runs it eagerly."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(graph, example_inputs):
        graph.mode = "train" if model.training else "eval"
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()  # a fresh cache: no graphs or recompile budget left over from other tests
    return torch.compile(model, backend=backend, dynamic=False), graphs


def schedule_batch() -> torch.Tensor:
    idx = torch.randint(1, COMPILE_CFG.vocab_size, (1, 256), generator=torch.Generator().manual_seed(4))
    idx[:, ::61] = COMPILE_CFG.bos_token  # documents longer than the small windows
    return idx


def test_one_graph_per_mode_over_the_window_schedule():
    # The training loop's order: a step at each window, validation at each window change, back to
    # training. Training runs forward + backward (SDPA: Flex has no backward on CPU). Exactly one
    # graph per mode: a second would be a recompile per window, zero an eager fallback.
    model = randomized(dataclasses.replace(COMPILE_CFG, attention="sdpa"))
    compiled, graphs = compile_counting(model)
    idx = schedule_batch()
    for window in SCHEDULE:
        window = torch.tensor(window, dtype=torch.int32)
        model.train()
        compiled(idx, idx, window=window).backward()
        model.eval()
        with torch.no_grad():
            compiled(idx, idx, window=window)
    assert sorted(g.mode for g in graphs) == ["eval", "train"]


@pytest.fixture(scope="module", params=["token", "block"])
def flex_schedule_graphs(request) -> list[torch.fx.GraphModule]:
    """The graphs captured while the Flex model evaluates the whole schedule under each window rule
    (Flex compiles no backward on CPU; training builds its masks with the same code)."""
    model = randomized(dataclasses.replace(COMPILE_CFG, attention="flex", window_rule=request.param))
    compiled, graphs = compile_counting(model)
    idx = schedule_batch()
    with torch.no_grad():
        for window in SCHEDULE:
            compiled(idx, idx, window=torch.tensor(window, dtype=torch.int32))
    return graphs


def test_one_flex_graph_over_the_window_schedule(flex_schedule_graphs):
    # The CUDA back end's block masks are built inside the graph from the window tensor.
    assert [g.mode for g in flex_schedule_graphs] == ["eval"]


def test_flex_graph_holds_no_token_pair_tensor(flex_schedule_graphs):
    # At T = 49,152 a (T, T) mask is 2.4 GB per mask; the graph may hold per-block (T/128)^2 tensors.
    T = schedule_batch().size(1)
    (graph,) = flex_schedule_graphs
    shapes = [tuple(node.meta["example_value"].shape) for node in graph.graph.nodes
              if isinstance(node.meta.get("example_value"), torch.Tensor)]
    assert shapes and not [s for s in shapes if s[-2:] == (T, T)]
