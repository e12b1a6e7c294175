"""The model changes of records #28-#45 as GPTConfig options, each held to its defining property on a
hand-sized input: dropped layers, smear, the sparse attention gate, backout, gated skips, YaRN, the
exponential-decay init. Every option is off by default (tests/test_model.py covers the default model)."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from conftest import random_gpt
from torch._dynamo.testing import CompileCounter

from model import GPT, GPTConfig
from model.attention import YarnRotary, dense_mask
from model.gpt import CausalSelfAttention, Smear, rms_norm, skip_pairs, value_embedding_layers

# dim = n_head * head_dim (the record's square attention), gate_dims 12 of 16 dims.
SMALL = GPTConfig(vocab_size=64, n_layer=4, n_head=2, head_dim=8, dim=16, max_seq_len=32, value_embeds=1,
                  bos_token=0, value_lambda_all_layers=True)
BOS = SMALL.bos_token


def tokens(length: int, seed: int = 0) -> torch.Tensor:
    """(1, length) ids in 1..vocab-1 (no BOS)."""
    return torch.randint(1, SMALL.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def output_of(module: torch.nn.Module, run) -> torch.Tensor:
    """What module returns while run() runs (its last call)."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen[-1]


# Dropped layers (records #30, #35) ---------------------------------------------------------------

def test_dropped_layers_have_no_parameters():
    model = GPT(dataclasses.replace(SMALL, attention_free_layers=(0, 2), mlp_free_layers=(0, 1)))
    names = lambda i: {n for n, _ in model.blocks[i].named_parameters()}  # noqa: E731
    assert names(0) == set()  # both sublayers dropped: the identity, not even (k0, k1)
    assert names(1) == {"lambdas", "attn.qkv.weight", "attn.o.weight", "attn.value_lambdas"}
    assert names(2) == {"lambdas", "mlp.fc.weight", "mlp.proj.weight"}
    full = GPT(SMALL)
    dropped = sum(p.numel() for i in (0, 2) for p in full.blocks[i].attn.parameters())
    dropped += sum(p.numel() for i in (0, 1) for p in full.blocks[i].mlp.parameters())
    dropped += 2  # block 0's lambdas
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in model.parameters()) == dropped


def test_a_dropped_sublayer_is_the_identity_on_its_path():
    model = random_gpt(dataclasses.replace(SMALL, attention_free_layers=(0, 2), mlp_free_layers=(0, 1)))
    x, x0 = torch.randn(2, 1, 8, 16, generator=torch.Generator().manual_seed(3))
    mask = dense_mask(8, None, None, "cpu")
    assert model.blocks[0](x, x0, None, "sdpa", mask) is x  # no (k0, k1) mix either
    attn_only, mlp_only = model.blocks[1], model.blocks[2]
    mixed = attn_only.lambdas[0] * x + attn_only.lambdas[1] * x0
    torch.testing.assert_close(attn_only(x, x0, None, "sdpa", mask),
                               mixed + attn_only.attn(rms_norm(mixed), None, "sdpa", mask), rtol=0, atol=0)
    mixed = mlp_only.lambdas[0] * x + mlp_only.lambdas[1] * x0
    torch.testing.assert_close(mlp_only(x, x0, None, "sdpa", mask), mixed + mlp_only.mlp(rms_norm(mixed)),
                               rtol=0, atol=0)


def test_value_embeddings_skip_an_attention_free_block_as_the_record():
    # Record #46: block 0 has no attention, so table 0 feeds block 9 only: . 1 2 ... 0 1 2.
    cfg = GPTConfig(attention_free_layers=(0, 7), mlp_free_layers=(0,))
    assert value_embedding_layers(cfg) == [None, 1, 2] + [None] * 6 + [0, 1, 2]


# Smear (record #34) -----------------------------------------------------------------------------

def test_smear_adds_the_previous_position_times_its_gate():
    smear = Smear(SMALL)
    e = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(smear(e), e)  # lambda and w start at 0: the identity
    with torch.no_grad():
        smear.lambdas.fill_(0.7)
        smear.gate.weight.copy_(torch.randn(1, 12, generator=torch.Generator().manual_seed(1)))
    out = smear(e)
    assert torch.equal(out[:, 0], e[:, 0])
    for t in range(1, 5):  # e_t + lambda * sigmoid(w . e_t[:12]) * e_{t-1}
        gate = 0.7 * torch.sigmoid(e[:, t, :12] @ smear.gate.weight[0])
        torch.testing.assert_close(out[:, t], e[:, t] + gate[:, None] * e[:, t - 1], rtol=1e-6, atol=1e-6)
    moved = e.clone()
    moved[:, 1] += 1.0  # position 1 feeds positions 1 and 2, nothing further
    changed = (smear(moved) != out).any(dim=-1)
    assert changed.tolist() == [[False, True, True, False, False]] * 2


def test_smear_carries_the_last_token_of_a_document_into_the_next_bos():
    # Document masking keeps attention inside a document; the smear alone reaches across: the BOS at
    # position 3 picks up token 2, the previous document's last, as in the record's packed stream.
    idx = tokens(8)
    idx[0, 3] = BOS
    other = idx.clone()
    other[0, 2] = (idx[0, 2] % (SMALL.vocab_size - 1)) + 1
    for smear, crosses in ((True, True), (False, False)):
        model = random_gpt(dataclasses.replace(SMALL, smear=smear))
        a, b = model.residual(idx), model.residual(other)
        assert (not torch.equal(a[0, 3], b[0, 3])) == crosses  # the BOS, first of the second document
        assert torch.equal(a[0, 4:], b[0, 4:]) != crosses  # the rest of the second document with it
        assert torch.equal(a[0, :2], b[0, :2])  # causal: the past never moves


# Sparse attention gate (record #28) ---------------------------------------------------------------

def test_attention_gate_scales_each_head_by_a_sigmoid_of_the_inputs_first_dims():
    gated_cfg = dataclasses.replace(SMALL, attn_gate=True)
    torch.manual_seed(0)
    gated = CausalSelfAttention(gated_cfg)
    plain = CausalSelfAttention(SMALL)
    with torch.no_grad():
        for p in gated.parameters():
            p.copy_(torch.randn_like(p))
        gated.o.weight.copy_(torch.eye(16))  # the output projection passes the heads through
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")})
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    mask = dense_mask(5, None, None, "cpu")
    heads = plain(x, None, "sdpa", mask).view(1, 5, 2, 8)
    gate = torch.sigmoid(x[..., :12] @ gated.gate.weight.T)  # (1, 5, heads): one gate per head, per token
    torch.testing.assert_close(gated(x, None, "sdpa", mask), (heads * gate[..., None]).view(1, 5, 16),
                               rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        gated.gate.weight.zero_()  # its initial value: every head halved
    torch.testing.assert_close(gated(x, None, "sdpa", mask), heads.reshape(1, 5, 16) / 2,
                               rtol=1e-6, atol=1e-6)


# Backout (record #40) ---------------------------------------------------------------------------

def test_backout_subtracts_lambda_times_the_residual_after_its_block():
    model = random_gpt(dataclasses.replace(SMALL, backout_layer=1))
    assert model.backout_lambda.shape == (1,)
    assert GPT(dataclasses.replace(SMALL, backout_layer=1)).backout_lambda.item() == 0.5
    idx = tokens(8)
    with torch.no_grad():
        model.backout_lambda.zero_()
    x_b = output_of(model.blocks[1], lambda: model.residual(idx))
    plain = model.residual(idx)
    with torch.no_grad():
        model.backout_lambda.fill_(0.7)
    torch.testing.assert_close(model.residual(idx), plain - 0.7 * x_b, rtol=0, atol=0)


# Skip connections (records #32, #45) -----------------------------------------------------------

def test_default_skips_are_the_unet_and_the_records_is_one_pair():
    assert skip_pairs(GPTConfig()) == ((5, 6), (4, 7), (3, 8), (2, 9), (1, 10), (0, 11))
    record = GPTConfig(skips=((4, 7),), skip_gate="sigmoid")
    assert skip_pairs(record) == ((4, 7),)
    weights = GPT(dataclasses.replace(SMALL, skips=((0, 2),), skip_gate="sigmoid")).skip_weights
    assert torch.equal(weights, torch.tensor([-1.5]))  # sigmoid(-1.5) = 0.18


@pytest.mark.parametrize("gate", ["linear", "sigmoid"])
def test_a_skip_adds_its_sources_output_times_its_gate_before_its_target(gate):
    model = random_gpt(dataclasses.replace(SMALL, skips=((0, 2),), skip_gate=gate))
    idx = tokens(8)
    seen = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i in (0, 1)]
    hooks.append(model.blocks[2].register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0])))
    model.residual(idx)
    for hook in hooks:
        hook.remove()
    w = model.skip_weights[0]
    g = torch.sigmoid(w) if gate == "sigmoid" else w
    torch.testing.assert_close(seen["in"], seen[1] + g * seen[0], rtol=0, atol=0)
    assert not torch.equal(seen["in"], seen[1])


# Exponential-decay init (record #45) --------------------------------------------------------------

def test_block_lambda_init_scales_a_blocks_output_by_it_once_per_later_block():
    cfg = dataclasses.replace(SMALL, block_lambda_init=1.1, attention_free_layers=(0,), mlp_free_layers=(0,),
                              skips=())
    model = GPT(cfg)  # output projections at 0, no skips: blocks add nothing, k0 = 1.1 scales the stream
    assert all(torch.equal(b.lambdas, torch.tensor([1.1, 0.0])) for b in model.blocks[1:])
    idx = tokens(8)
    x0 = rms_norm(model.embed(idx))
    torch.testing.assert_close(model.residual(idx), 1.1**3 * x0, rtol=1e-6, atol=0)  # blocks 1, 2, 3
    delta = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))
    hook = model.blocks[1].register_forward_hook(lambda m, args, out: out + delta)
    try:
        pushed = model.residual(idx)
    finally:
        hook.remove()
    torch.testing.assert_close(pushed - model.residual(idx), 1.1**2 * delta, rtol=1e-5, atol=1e-6)


# The head's soft-cap from record #28 on ----------------------------------------------------------

def test_the_unscaled_sigmoid_softcap_divides_by_s_alone():
    model = GPT(dataclasses.replace(SMALL, head_softcap="sigmoid_unscaled"))
    z = torch.tensor([-15.0, 0.0, 7.5, 40.0])
    torch.testing.assert_close(model.soft_cap(z), 30 * torch.sigmoid(z / 7.5), rtol=0, atol=0)
    assert model.soft_cap(torch.tensor(7.5)).item() == pytest.approx(30 / (1 + math.exp(-1)))


def test_softcap_dtype_head_caps_bf16_logits_in_bf16_before_the_float32_loss():
    # Record #46's evaluation: logits = 30 sigmoid(z / 7.5) in the head's bf16, then .float() for the
    # mean cross-entropy; "float32" (the 2025-07-12 record) casts z first. With bf16 tables z is bf16.
    idx = tokens(24, seed=3)
    targets = tokens(24, seed=4)
    unscaled = dataclasses.replace(SMALL, head_softcap="sigmoid_unscaled")
    model = random_gpt(unscaled).cast_embeddings(torch.bfloat16)
    z = model.lm_head(rms_norm(model.residual(idx)))
    assert z.dtype == torch.bfloat16
    for choice, logits in (("float32", 30 * torch.sigmoid(z.float() / 7.5)),
                           ("head", (30 * torch.sigmoid(z / 7.5)).float())):
        chosen = GPT(dataclasses.replace(model.config, softcap_dtype=choice)).cast_embeddings(torch.bfloat16)
        chosen.load_state_dict(model.state_dict())
        chosen.eval()
        assert torch.equal(chosen(idx), logits)
        assert torch.equal(chosen(idx, targets), F.cross_entropy(logits[0], targets[0]))
    assert not torch.equal((30 * torch.sigmoid(z / 7.5)).float(), 30 * torch.sigmoid(z.float() / 7.5))


# YaRN (record #31) ------------------------------------------------------------------------------

# Record #46's long windows, in tokens (128-token blocks): 3, 7, 11 during the schedule, 13 on the
# extension steps; YaRN applied at each change. Its validation runs with the state of the moment, the
# final one with a 20-block window and no further YaRN step.
RECORD_WINDOWS = [128 * w for w in (3, 7, 11, 13)]
RECORD_SCALES = [0.1, 0.1169, 0.1275, 0.1318]  # docs: the record's attention scale after each step


def yarn_reference(windows: list[int]) -> list[torch.Tensor]:
    """theta after each YaRN step, from the formula: theta_i *= s + clamp((r_i - 1) / 31, 0, 1) (1 - s),
    r_i = old * theta_i / (2 pi), s = old / new; start (1/1024)^(i/31) for i < 32, then 32 zeros."""
    theta = torch.cat([(1 / 1024) ** torch.linspace(0, 1, 32), torch.zeros(32)])
    states = [theta]
    for old, new in itertools.pairwise(windows):
        r = old * theta / (2 * math.pi)
        theta = theta * (old / new + torch.clamp((r - 1) / 31, 0, 1) * (1 - old / new))
        states.append(theta)
    return states


def test_yarn_frequencies_and_scale_equal_the_formula_at_the_records_windows():
    rotary = YarnRotary(128, 64, 1024.0, 0.1)
    for i, theta in enumerate(yarn_reference(RECORD_WINDOWS)):
        if i:
            rotary.extend(RECORD_WINDOWS[i - 1], RECORD_WINDOWS[i])
        assert torch.equal(rotary.theta, theta)  # the record's float32 operations, in its order
        angles = torch.arange(64.0)[:, None] * rotary.theta
        assert torch.equal(rotary.cos, angles.cos()) and torch.equal(rotary.sin, angles.sin())
        assert round(float(rotary.attn_scale), 4) == RECORD_SCALES[i]
    base = yarn_reference(RECORD_WINDOWS[:1])[0]
    turns = RECORD_WINDOWS[0] * base / (2 * math.pi)
    fast, slow = turns >= 32, (turns <= 1) & (base > 0)
    ratio = RECORD_WINDOWS[0] / RECORD_WINDOWS[1]
    rotary.reset()
    rotary.extend(RECORD_WINDOWS[0], RECORD_WINDOWS[1])
    assert torch.equal(rotary.theta[fast], base[fast])  # many turns over the old window: kept
    torch.testing.assert_close(rotary.theta[slow], base[slow] * ratio, rtol=1e-6, atol=0)  # interpolated
    assert torch.equal(rotary.theta[32:], torch.zeros(32))  # the unrotated half stays put
    rotary.reset()
    assert torch.equal(rotary.theta, base) and float(rotary.attn_scale) == pytest.approx(0.1)


def test_attention_uses_the_yarn_frequencies_and_scale_in_training_and_validation():
    cfg = dataclasses.replace(SMALL, yarn=True, attn_scale=0.1)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p))
    attn.rotary.extend(3, 7)
    theta, scale = attn.rotary.theta.clone(), 0.1 * (0.2 * math.log(7 / 3) + 1)
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    mask = dense_mask(6, None, None, "cpu")

    def rotate(t):  # (B, T, H, D), angle position * theta on pairs (i, i + D/2)
        angles = torch.arange(6.0)[:, None, None] * theta
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([t1 * angles.cos() + t2 * angles.sin(), t2 * angles.cos() - t1 * angles.sin()], -1)

    q, k, v = (x @ attn.qkv.weight.flatten(end_dim=1).T).view(1, 6, 6, 8).chunk(3, dim=-2)
    q, k, v = rotate(rms_norm(q)), rotate(rms_norm(k)), attn.value_lambdas[0] * v
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=scale)
    expected = y.transpose(1, 2).reshape(1, 6, 16) @ attn.o.weight.T
    for mode in (attn.train, attn.eval):
        mode()
        torch.testing.assert_close(attn(x, None, "sdpa", mask), expected, rtol=1e-5, atol=1e-5)


def test_yarn_off_the_model_has_no_yarn_and_on_it_compiles_once_across_extensions():
    with pytest.raises(ValueError, match="GPTConfig.yarn"):
        GPT(SMALL).extend_yarn(384, 896)
    model = random_gpt(dataclasses.replace(SMALL, yarn=True, attn_scale=0.1, smear=True, attn_gate=True,
                                           backout_layer=2, skips=((1, 2),), skip_gate="sigmoid"))
    model.reset_yarn()  # random_gpt leaves the buffers alone; make the starting state explicit
    idx, window = tokens(16), torch.tensor(8, dtype=torch.int32)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=False)
    for old, new in ((None, None), (8, 16), (16, 24)):
        if old is not None:
            model.extend_yarn(old, new)
        torch.testing.assert_close(compiled(idx, window=window), model(idx, window=window),
                                   rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1  # the frequencies and scale are buffers written in place
    before = model(idx, window=window)
    model.reset_yarn()
    assert not torch.allclose(model(idx, window=window), before)


# Record #46's architecture at full size, on the meta device (no memory) --------------------------

RECORD_46 = GPTConfig(attention_free_layers=(0, 7), mlp_free_layers=(0,), long_window_layers=(4, 11),
                      smear=True, attn_gate=True, backout_layer=8, skips=((4, 7),), skip_gate="sigmoid",
                      block_lambda_init=1.1, yarn=True, attn_scale=0.1, head_softcap="sigmoid_unscaled",
                      value_lambda_all_layers=True, softcap_dtype="head")


def test_record_46_options_give_its_tensors_one_for_one():
    with torch.device("meta"):
        model = GPT(RECORD_46)
    ours = {name: p.numel() for name, p in model.named_parameters()}
    attention, mlp = [i for i in range(12) if i not in (0, 7)], range(1, 12)
    # The record's tensors (numel): embed, smear_gate (1, 12), 3 value_embeds, qkvo_w (768, 3072) and
    # attn_gate (6, 12) per attention block, c_fc and c_proj (768, 3072) per MLP, lm_head.
    table = 50304 * 768
    assert ours["smear.gate.weight"] == 12 and ours["lm_head.weight"] == ours["embed.weight"] == table
    assert all(ours[f"value_embeds.{j}.weight"] == table for j in range(3))
    for i in attention:
        assert ours[f"blocks.{i}.attn.qkv.weight"] + ours[f"blocks.{i}.attn.o.weight"] == 768 * 3072
        assert ours[f"blocks.{i}.attn.gate.weight"] == 6 * 12
    for i in mlp:
        assert ours[f"blocks.{i}.mlp.fc.weight"] == ours[f"blocks.{i}.mlp.proj.weight"] == 768 * 3072
    # Its 64 scalars: 12 skip slots (only [1] read), 12 (k0, k1), 12 sa_lambdas, smear, backout, 2 pads;
    # the slots it reads are ours: 1 skip weight, (k0, k1) of blocks 1-11, value lambdas of its
    # 10 attention blocks, the smear and backout lambdas.
    scalars = {n: k for n, k in ours.items() if n == "skip_weights" or "lambda" in n}
    assert sum(scalars.values()) == 64 - 11 - 2 - 2 * 2 - 2 == 1 + 2 * 11 + 2 * 10 + 1 + 1
    assert set(ours) == set(scalars) | {n for n in ours if n.endswith(".weight")}
    assert value_embedding_layers(RECORD_46) == [None, 1, 2] + [None] * 6 + [0, 1, 2]
