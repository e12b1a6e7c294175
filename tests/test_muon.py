"""Muon: routing by kind, momentum, weight decay, parity with torch, state round trip, training.

Newton–Schulz runs in float32 (ns_dtype, dtype) wherever a test compares against an exact formula:
the CPU default follows the hardware (bf16 on CPUs with bf16 dot products).
"""

import dataclasses
import functools
import io
import math
from unittest import mock

import pytest
import torch
from torch import nn

import optim.kinds
from model import GPT, PRESETS
from optim import (
    KINDS,
    Kind,
    Muon,
    dualize_conv2d,
    dualize_embed,
    dualize_linear,
    dualize_sign,
    orthogonalize,
    param_groups,
)

F32 = torch.float32


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def step_with(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


# ---- the update each kind applies -------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, shape, dualize",
    [
        # lr_scale="spectral" makes hidden the Linear dual
        ("hidden", (8, 20), functools.partial(dualize_linear, dtype=F32)),
        ("head_linear", (20, 8), functools.partial(dualize_linear, dtype=F32)),
        ("conv", (6, 4, 3, 3), functools.partial(dualize_conv2d, dtype=F32)),
        ("head_sign", (20, 8), dualize_sign),
        ("embed", (20, 8), dualize_embed),
    ],
)
def test_each_kind_steps_by_its_duality_map(kind, shape, dualize):
    p = torch.randn(shape, generator=seeded(0))
    g = torch.randn(shape, generator=seeded(1))
    p0 = p.clone()
    # momentum 0 makes the momentum update the gradient itself, isolating the map.
    step_with(Muon([{"params": [p], "kind": kind}], lr=0.1, momentum=0.0, ns_dtype=F32), [p], [g])
    # float32: the stacked call may round differently from the single one.
    torch.testing.assert_close(p, p0 - 0.1 * dualize(g), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "rule, wide_scale, tall_scale",
    [
        ("spectral", math.sqrt(8 / 32), math.sqrt(32 / 8)),  # √(d_out/d_in)
        ("muon", 1.0, math.sqrt(32 / 8)),  # √max(1, d_out/d_in)
        ("rms", 0.2 * math.sqrt(32), 0.2 * math.sqrt(32)),  # 0.2·√max(d_out, d_in)
    ],
)
def test_lr_scale_rules(rule, wide_scale, tall_scale):
    wide, tall = torch.zeros(8, 32), torch.zeros(32, 8)
    g_wide, g_tall = torch.randn(8, 32, generator=seeded(2)), torch.randn(32, 8, generator=seeded(3))
    opt = Muon([wide, tall], lr=0.1, momentum=0.0, lr_scale=rule, ns_dtype=F32)
    step_with(opt, [wide, tall], [g_wide, g_tall])
    torch.testing.assert_close(wide, -0.1 * wide_scale * orthogonalize(g_wide, dtype=F32), rtol=0, atol=1e-6)
    torch.testing.assert_close(tall, -0.1 * tall_scale * orthogonalize(g_tall, dtype=F32), rtol=0, atol=1e-6)


def test_nesterov_momentum_in_ema_form():
    mu = 0.9
    p = torch.zeros(6, 10)
    g1, g2 = torch.randn(2, 6, 10, generator=seeded(4))
    opt = Muon([p], lr=1.0, momentum=mu, ns_dtype=F32)
    step_with(opt, [p], [g1])
    p1 = p.clone()
    step_with(opt, [p], [g2])
    buf = mu * (1 - mu) * g1 + (1 - mu) * g2  # buf₁ = lerp(0, g₁, 1−μ); buf₂ = lerp(buf₁, g₂, 1−μ)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, rtol=1e-6, atol=1e-7)
    nesterov = (1 - mu) * g2 + mu * buf  # u = lerp(g₂, buf₂, μ)
    torch.testing.assert_close(p, p1 - dualize_linear(nesterov, dtype=F32), rtol=0, atol=1e-6)


def test_momentum_and_lr_are_read_at_every_step():
    p = torch.zeros(6, 10)
    g1, g2 = torch.randn(2, 6, 10, generator=seeded(5))
    opt = Muon([p], lr=0.02, momentum=0.95, ns_dtype=F32)
    step_with(opt, [p], [g1])
    p1 = p.clone()
    # A training loop warms momentum up and schedules lr by writing the group: with μ = 0 the
    # second step ignores the history and moves by exactly lr·dualize(g₂).
    opt.param_groups[0]["momentum"] = 0.0
    opt.param_groups[0]["lr"] = 0.5
    step_with(opt, [p], [g2])
    torch.testing.assert_close(p, p1 - 0.5 * dualize_linear(g2, dtype=F32), rtol=0, atol=1e-6)


def test_absent_tokens_get_a_geometrically_decaying_update():
    mu, lr = 0.9, 0.1
    table = torch.zeros(5, 4)
    g_first = torch.zeros(5, 4)
    g_first[[0, 2]] = torch.randn(2, 4, generator=seeded(6))
    g_later = torch.zeros(5, 4)
    g_later[0] = torch.randn(4, generator=seeded(7))  # token 2 is absent from now on
    opt = Muon([{"params": [table], "kind": "embed"}], lr=lr, momentum=mu)
    v = dualize_embed(g_first)[2]  # token 2's unit-RMS direction
    before = table.clone()
    step_with(opt, [table], [g_first])
    # Nesterov from zero: u₁ = (1−μ)(1+μ)·v, a full-size step while the token is present.
    torch.testing.assert_close(table[2] - before[2], -lr * (1 - mu) * (1 + mu) * v, rtol=1e-6, atol=1e-7)
    for t in range(2, 5):
        before = table.clone()
        step_with(opt, [table], [g_later])
        # Dualizing before momentum: the absent row's dualized gradient is exactly 0, so its step
        # is lr·μᵗ(1−μ)·v, shrinking by μ per step instead of being re-inflated to unit RMS.
        torch.testing.assert_close(table[2] - before[2], -lr * mu**t * (1 - mu) * v, rtol=1e-5, atol=1e-8)
    assert torch.equal(table[[1, 3, 4]], torch.zeros(3, 4))  # never-seen tokens never move


# ---- weight decay ----------------------------------------------------------------------------


def test_weight_decay_is_decoupled_and_uses_the_group_lr():
    p = torch.randn(6, 10, generator=seeded(8))
    p0 = p.clone()
    # A zero gradient dualizes to 0, leaving only the decay p ← p·(1 − lr·wd), unscaled by lr_scale.
    step_with(Muon([p], lr=0.1, weight_decay=0.5, lr_scale="rms"), [p], [torch.zeros(6, 10)])
    assert torch.equal(p, p0 * (1 - 0.1 * 0.5))


def test_cautious_weight_decay_only_where_the_update_agrees():
    lr, wd, mu = 0.1, 0.5, 0.9
    p = torch.randn(6, 10, generator=seeded(9))
    g = torch.randn(6, 10, generator=seeded(10))
    p0 = p.clone()
    step_with(Muon([p], lr=lr, momentum=mu, weight_decay=wd, cautious_wd=True, ns_dtype=F32), [p], [g])
    u = dualize_linear((1 - mu) * (1 + mu) * g, dtype=F32)  # Nesterov's first update from a zero buffer
    agrees = (u * p0 >= 0).float()
    assert 0 < agrees.mean() < 1  # both cases occur, so the test can tell them apart
    torch.testing.assert_close(p, p0 * (1 - lr * wd * agrees) - lr * u, rtol=0, atol=1e-6)


# ---- parity with torch -------------------------------------------------------------------------


SHAPES = [(16, 48), (48, 16), (32, 32), (16, 48)]


def run_pair(ours: dict, theirs: dict, steps: int = 3):
    """Same initial matrices and gradient sequence through our Muon and torch.optim.Muon."""
    gen = seeded(11)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]
    a, b = [p.clone() for p in init], [p.clone() for p in init]
    opt_a, opt_b = Muon(a, **ours), torch.optim.Muon(b, **theirs)
    for g in grads:
        step_with(opt_a, a, g)
        step_with(opt_b, b, g)
    return init, a, b, opt_a, opt_b


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_in_bf16(nesterov):
    common = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1)
    init, a, b, opt_a, opt_b = run_pair(
        dict(common, lr_scale="muon", ns_coefficients="muon", ns_dtype=torch.bfloat16),
        dict(common, adjust_lr_fn="original"),
    )
    for p0, pa, pb in zip(init, a, b, strict=True):
        # The momentum is float32 in both, computed the same way: bitwise equal.
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
        # Both orthogonalize in bf16; they differ in where the normalization rounds (we take the
        # norm in float32), so the steps agree to bf16 Newton–Schulz accuracy (docs/MATH.md: 5e-2).
        step_a, step_b = pa - p0, pb - p0
        assert torch.linalg.norm(step_a - step_b) / torch.linalg.norm(step_b) < 5e-2


def torch_muon_in_float32(params, grads_seq, lr, momentum, weight_decay, eps=1e-7):
    """torch.optim.Muon's algorithm (nesterov, "original" lr adjust) with float32 Newton–Schulz."""
    a, b, c = 3.4445, -4.7750, 2.0315
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_seq:
        for p, g, buf in zip(params, grads, bufs, strict=True):
            buf.lerp_(g, 1 - momentum)
            X = g.lerp(buf, momentum)
            tall = X.size(0) > X.size(1)
            X = X.T if tall else X
            X = X / X.norm().clamp(min=eps)
            for _ in range(5):
                A = X @ X.T
                X = a * X + (b * A + c * A @ A) @ X
            X = X.T if tall else X
            p.mul_(1 - lr * weight_decay)
            p.add_(X, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))


def test_matches_torch_muon_algorithm_in_float32():
    gen = seeded(12)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]
    ours, ref = [p.clone() for p in init], [p.clone() for p in init]
    opt = Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.1, lr_scale="muon", ns_dtype=torch.float32)
    for g in grads:
        step_with(opt, ours, g)
    torch_muon_in_float32(ref, grads, lr=0.02, momentum=0.95, weight_decay=0.1)
    for p0, po, pr in zip(init, ours, ref, strict=True):
        # Only the normalization's eps placement (‖G‖+1e-7 vs max(‖G‖, 1e-7)) and float32
        # rounding differ: the steps agree to 1e-5 relative.
        assert torch.linalg.norm((po - p0) - (pr - p0)) / torch.linalg.norm(pr - p0) < 1e-5


def test_adam_kind_is_torch_adamw():
    gen = seeded(13)
    init = [torch.randn(7, generator=gen), torch.randn(3, 5, generator=gen), torch.randn((), generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(10)]
    a, b = [p.clone() for p in init], [p.clone() for p in init]
    hyper = dict(lr=0.01, weight_decay=0.1)
    ours = Muon([{"params": a, "kind": "adam", **hyper}], adam_betas=(0.8, 0.95), adam_eps=1e-3)
    theirs = torch.optim.AdamW(b, betas=(0.8, 0.95), eps=1e-3, foreach=True, **hyper)
    for g in grads:
        step_with(ours, a, g)
        step_with(theirs, b, g)
    for pa, pb in zip(a, b, strict=True):
        # The moments are torch's foreach calls: bitwise.
        assert torch.equal(ours.state[pa]["exp_avg"], theirs.state[pb]["exp_avg"])
        assert torch.equal(ours.state[pa]["exp_avg_sq"], theirs.state[pb]["exp_avg_sq"])
        # Our bias corrections are float32 on the device (no host read of the step), torch's float64
        # on the host: the parameters differ by float32 rounding, measured ≤ 1.2e-7 over 10 steps.
        torch.testing.assert_close(pa, pb, rtol=0, atol=3e-7)


@pytest.mark.parametrize("kind", ["adam", "embed"])
def test_a_bf16_parameter_steps_by_the_float32_math_rounded_once(kind):
    gen = seeded(19)
    p32 = torch.randn(6, 8, generator=gen)
    grads = [torch.randn(6, 8, generator=gen) for _ in range(3)]
    p16 = p32.to(torch.bfloat16)
    reference = p16.float()  # the same start, in float32
    hyper = dict(lr=0.05, weight_decay=0.1, adam_eps=1e-6)
    ours = Muon([{"params": [p16], "kind": kind}], **hyper)
    exact = Muon([{"params": [reference], "kind": kind}], **hyper)
    for g in grads:
        step_with(ours, [p16], [g.to(torch.bfloat16)])
        step_with(exact, [reference], [g.to(torch.bfloat16).float()])
        # State stays float32, so each step is the float32 step from the stored bf16 value, rounded
        # once as it is stored: bitwise, the reference rounded after every step.
        assert torch.equal(p16, reference.to(torch.bfloat16))
        reference.copy_(p16)
    for key, value in ours.state[p16].items():
        assert value.dtype == F32, key
        assert torch.equal(value, exact.state[reference][key])


# ---- param groups and batching -----------------------------------------------------------------


def test_plain_tensors_follow_torch_muons_2d_rule():
    matrix, vector, filters = torch.zeros(4, 6), torch.zeros(6), torch.zeros(2, 3, 3, 3)
    opt = Muon([matrix, vector, filters])
    kinds = {g["kind"]: g["params"] for g in opt.param_groups}
    assert kinds == {"hidden": [matrix], "adam": [vector, filters]}


def test_bad_kinds_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="unknown param-group kind"):
        Muon([{"params": [torch.zeros(3, 3)], "kind": "dense"}])
    with pytest.raises(ValueError, match="can't be kind 'conv'"):
        Muon([{"params": [torch.zeros(3, 3)], "kind": "conv"}])
    with pytest.raises(ValueError, match="unknown lr_scale"):
        Muon([torch.zeros(3, 3)], lr_scale="mup")
    with pytest.raises(ValueError, match="unknown Newton–Schulz coefficients"):
        Muon([torch.zeros(3, 3)], ns_coefficients="septic")


def test_one_orthogonalize_call_per_shape_group():
    gen = seeded(14)
    params = [torch.zeros(8, 16) for _ in range(3)] + [torch.zeros(16, 8) for _ in range(2)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    opt = Muon(params, momentum=0.0, ns_dtype=F32)
    with mock.patch.object(optim.kinds, "orthogonalize", wraps=orthogonalize) as spy:
        step_with(opt, params, grads)
    assert [call.args[0].shape for call in spy.call_args_list] == [(3, 8, 16), (2, 16, 8)]
    # Stacking changes nothing but speed: each matrix moved by its own dual (float32 round-off).
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p, -0.02 * dualize_linear(g, dtype=F32), rtol=0, atol=1e-6)


class CastedLinear(nn.Linear):
    """A subclass, as model/ may define for its hidden linears."""


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.attn = CastedLinear(8, 8, bias=False)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.gate = nn.Parameter(torch.zeros(8, 8))  # a matrix held directly by a module
        self.lm_head = nn.Linear(8, 20, bias=False)


def roles_and_kinds(groups: list[dict]) -> dict[str, tuple[str, str]]:
    return {name: (g["role"], g["kind"]) for g in groups for name, _ in g["params"]}


def test_param_groups_route_by_role():
    assert roles_and_kinds(param_groups(Toy())) == {
        "embed.weight": ("embed", "embed"),
        "conv.weight": ("conv", "conv"),
        "conv.bias": ("scalar", "adam"),
        "norm.weight": ("scalar", "adam"),
        "norm.bias": ("scalar", "adam"),
        "attn.weight": ("hidden", "hidden"),
        "mlp.0.weight": ("hidden", "hidden"),
        "mlp.0.bias": ("scalar", "adam"),
        "mlp.2.weight": ("hidden", "hidden"),
        "mlp.2.bias": ("scalar", "adam"),
        "gate": ("scalar", "adam"),
        "lm_head.weight": ("head", "adam"),
    }


@pytest.mark.parametrize("head", ["adam", "head_linear", "head_sign"])
def test_param_groups_head_and_embed_choices(head):
    kinds = roles_and_kinds(param_groups(Toy(), head=head, embed="adam"))
    assert kinds["lm_head.weight"] == ("head", head)
    assert kinds["embed.weight"] == ("embed", "adam")


def test_param_groups_give_each_role_its_own_group_and_lr_even_with_one_kind():
    # Embeddings, head and scalars all Adam, each at its own lr: the speedrun's grouping.
    lrs = dict(hidden=0.05, embed=0.6, head=0.22, scalar=0.04)
    groups = param_groups(Toy(), embed="adam", head="adam", lrs=lrs)
    assert [(g["role"], g["kind"], g.get("lr")) for g in groups] == [
        ("hidden", "hidden", 0.05), ("conv", "conv", None), ("embed", "adam", 0.6), ("head", "adam", 0.22),
        ("scalar", "adam", 0.04)]
    opt = Muon(groups, lr=0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.02, 0.6, 0.22, 0.04]


def test_param_groups_express_the_speedrun_grouping_of_the_gpt():
    model = GPT(dataclasses.replace(PRESETS["demo"], vocab_size=64))
    groups = param_groups(model, embed="adam", head="adam", lrs=dict(hidden=0.05, embed=0.6, head=0.22,
                                                                      scalar=0.04))
    # The record's rule (hand-built groups): 2-D block matrices Newton–Schulz; token and value
    # embeddings, the head and every parameter of fewer than 2 dims Adam, each set at its own lr.
    expected = [
        ("hidden", [p for p in model.blocks.parameters() if p.ndim >= 2], 0.05),
        ("embed", [model.embed.weight, *(t.weight for t in model.value_embeds)], 0.6),
        ("head", [model.lm_head.weight], 0.22),
        ("scalar", [p for p in model.parameters() if p.ndim < 2], 0.04),
    ]
    got = [(g["role"], [p for _, p in g["params"]], g["lr"]) for g in groups]
    assert [(role, [id(p) for p in ps], lr) for role, ps, lr in got] == [
        (role, [id(p) for p in ps], lr) for role, ps, lr in expected]


def test_param_groups_overrides_win_and_lrs_set_group_lr():
    model = nn.Sequential()
    model.add_module("block", Toy())
    groups = param_groups(
        model,
        head="head_sign",
        overrides={"block.gate": "hidden", "block.mlp.2.weight": "scalar"},
        lrs={"hidden": 0.05},
    )
    kinds = roles_and_kinds(groups)
    assert kinds["block.gate"] == ("hidden", "hidden") and kinds["block.mlp.2.weight"] == ("scalar", "adam")
    # head names match a nested module's last name
    assert kinds["block.lm_head.weight"] == ("head", "head_sign")
    assert [g["role"] for g in groups] == ["hidden", "conv", "embed", "head", "scalar"]
    assert [g.get("lr") for g in groups] == [0.05, None, None, None, None]
    opt = Muon(groups, lr=0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.02, 0.02, 0.02, 0.02]
    assert opt.param_groups[0]["param_names"] == ["block.gate", "block.attn.weight", "block.mlp.0.weight"]


def test_param_groups_reject_unknown_names_and_impossible_roles():
    with pytest.raises(ValueError, match="no parameter named"):
        param_groups(Toy(), overrides={"gates": "hidden"})
    with pytest.raises(ValueError, match="unknown role"):
        param_groups(Toy(), overrides={"gate": "dense"})
    with pytest.raises(ValueError, match="unknown role"):
        param_groups(Toy(), lrs={"adam": 0.1})
    with pytest.raises(ValueError, match="head="):
        param_groups(Toy(), head="tied")
    with pytest.raises(ValueError, match="embed="):
        param_groups(Toy(), embed="dual")
    with pytest.raises(ValueError, match=r"norm.bias of shape \(8,\) can't have role 'hidden'"):
        param_groups(Toy(), overrides={"norm.bias": "hidden"})


# ---- the kind records ------------------------------------------------------------------------


def test_every_kind_has_one_record_that_muon_steps_by():
    # A new kind is one entry: here the identity map, sharded by element, taking 1-D parameters.
    identity = Kind("identity", lambda U, group: U, before_momentum=False, shard="element", ndim=(1, 1))
    p, g = torch.zeros(5), torch.randn(5, generator=seeded(20))
    with mock.patch.dict(optim.kinds.KINDS, identity=identity):
        step_with(Muon([{"params": [p], "kind": "identity"}], lr=0.1, momentum=0.0), [p], [g])
        with pytest.raises(ValueError, match="needs 1 dims"):
            Muon([{"params": [torch.zeros(2, 2)], "kind": "identity"}])
    assert torch.equal(p, -0.1 * g)
    assert set(KINDS) == {"hidden", "conv", "embed", "head_linear", "head_sign", "adam"}


# ---- state round trip --------------------------------------------------------------------------


def every_kind() -> tuple[list[torch.Tensor], list[dict]]:
    gen = seeded(15)
    shapes = {
        "hidden": [(12, 8), (12, 8), (8, 12)],
        "conv": [(6, 4, 3, 3)],
        "embed": [(20, 8)],
        "head_linear": [(20, 8)],
        "head_sign": [(20, 8)],
        "adam": [(8,), (12,)],
    }
    params = {kind: [torch.randn(s, generator=gen) for s in ss] for kind, ss in shapes.items()}
    groups = [
        {"params": ps, "kind": kind, "lr": 0.01 * (i + 1)} for i, (kind, ps) in enumerate(params.items())
    ]
    return [p for ps in params.values() for p in ps], groups


def test_state_dict_round_trip_gives_bitwise_identical_steps():
    gen = seeded(16)
    params, groups = every_kind()
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(5)]
    opt = Muon(groups, weight_decay=0.01, cautious_wd=True)
    for g in grads[:3]:
        step_with(opt, params, g)
    opt.param_groups[0]["momentum"] = 0.9  # mid-warm-up group settings travel with the state
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)

    restored_params, restored_groups = every_kind()
    for p, q in zip(restored_params, params, strict=True):
        p.copy_(q)
    restored = Muon(restored_groups)
    restored.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for g in grads[3:]:
        step_with(opt, params, g)
        step_with(restored, restored_params, g)
    for p, q in zip(params, restored_params, strict=True):
        assert torch.equal(p, q)


def test_loading_torchs_own_state_dicts_fails_at_load_naming_what_was_expected():
    params, groups = every_kind()
    ours = Muon(groups)
    for theirs in (torch.optim.AdamW(params), torch.optim.Muon([p for p in params if p.ndim == 2])):
        with pytest.raises(ValueError, match=r"param group 0 has no 'kind'.*not an optim.Muon state dict.*"
                                             r"\('hidden', 3\), \('conv', 1\)"):
            ours.load_state_dict(theirs.state_dict())


def test_loading_another_optimizers_groups_or_another_ranks_state_fails_at_load():
    params, groups = every_kind()
    saved = Muon(groups).state_dict()
    other_params, other_groups = every_kind()
    with pytest.raises(ValueError, match=r"saved groups \(kind, parameters\) \[\('hidden', 3\)\], but this"):
        Muon(other_groups).load_state_dict({**saved, "param_groups": saved["param_groups"][:1]})
    with pytest.raises(ValueError, match="saved as rank 1 of 2, but this optimizer is rank 0 of 1"):
        Muon(other_groups).load_state_dict({**saved, "distribution": {"rank": 1, "world_size": 2}})
    with pytest.raises(ValueError, match="no 'distribution' entry"):
        Muon(other_groups).load_state_dict({k: v for k, v in saved.items() if k != "distribution"})


def test_loading_state_of_the_wrong_shape_fails_at_load():
    params, groups = every_kind()
    opt = Muon(groups)
    step_with(opt, params, [torch.ones_like(p) for p in params])
    saved = opt.state_dict()
    saved["state"][0] = {"momentum_buffer": torch.zeros(3, 3)}  # a (12, 8) matrix's momentum
    with pytest.raises(ValueError, match=r"parameter 0 of shape \(12, 8\) is .*\(3, 3\).*keeps .*\(12, 8\)"):
        Muon(every_kind()[1]).load_state_dict(saved)


def test_clip_grad_norm_matches_torch_and_returns_the_norm():
    params, groups = every_kind()
    grads = [torch.randn(p.shape, generator=seeded(21)) for p in params]
    twins = [p.clone().requires_grad_() for p in params]
    for p, q, g in zip(params, twins, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    total = Muon(groups).clip_grad_norm_(0.5)
    expected = torch.nn.utils.clip_grad_norm_(twins, 0.5)
    # Both sum the same squares in float32, grouped differently.
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    assert total > 0.5  # it did clip
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_discarded_gradients_change_nothing():
    params, groups = every_kind()
    opt = Muon(groups)
    before = [p.clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.discard_gradients()
    assert all(p.grad is None for p in params)
    opt.step()  # nothing left to step by
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True)) and not opt.state


# ---- training ----------------------------------------------------------------------------------


def test_a_step_lowers_the_loss():
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    x, y = torch.randn(64, 10, generator=seeded(17)), torch.randn(64, 1, generator=seeded(18))
    opt = Muon(param_groups(model), lr=0.02)
    before = nn.functional.mse_loss(model(x), y)
    before.backward()
    opt.step()
    assert nn.functional.mse_loss(model(x), y) < before


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, steps: int, **groups
) -> tuple[float, float]:
    opt = Muon(param_groups(model, lrs={"scalar": 0.01}), lr=0.05, **groups)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_mlp_trains():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = teacher(x)
    student = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    first, last = train(student, x, y, nn.functional.mse_loss, steps=150)
    # Regression onto a random teacher: measured first/last = 113 after 150 steps.
    assert last < first / 20


def test_cnn_trains():
    torch.manual_seed(0)
    patterns = torch.randn(4, 1, 8, 8)  # one template image per class
    labels = torch.arange(4).repeat(32)
    x = patterns[labels] + 0.5 * torch.randn(128, 1, 8, 8)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    )
    first, last = train(cnn, x, labels, nn.functional.cross_entropy, steps=60)
    # Classifying noisy templates: measured first/last = 270 after 60 steps.
    assert last < first / 20


# ---- a stack of Linear weights in one parameter (the GPT's merged q, k, v) ------------------------


def test_a_stacked_hidden_parameter_steps_as_its_matrices_each_on_its_own():
    # One (3, 16, 8) parameter against three (16, 8) ones, same gradients, two steps with momentum:
    # each slice orthogonalized alone and scaled by its own (d_out, d_in) = (16, 8), i.e. "muon"'s
    # sqrt(16/8), not sqrt(48/8). float32 Newton–Schulz on both sides; the stacked call batches the
    # same per-matrix arithmetic: measured identical, checked at 1e-6.
    gen = seeded(21)
    stacked = torch.randn(3, 16, 8, generator=gen)
    apart = [w.clone() for w in stacked.unbind()]
    options = dict(lr=0.05, momentum=0.9, lr_scale="muon", ns_dtype=F32)
    opt_stacked = Muon([dict(params=[stacked], kind="hidden")], **options)  # a plain 3-D tensor: adam
    opt_apart = Muon(apart, **options)
    for _ in range(2):
        g = torch.randn(3, 16, 8, generator=gen)
        step_with(opt_stacked, [stacked], [g])
        step_with(opt_apart, apart, list(g.unbind()))
    torch.testing.assert_close(stacked, torch.stack(apart), rtol=0, atol=1e-6)


def test_the_gpts_merged_qkv_weight_is_hidden_and_each_third_is_one_matrix():
    model = GPT(dataclasses.replace(PRESETS["demo"], vocab_size=64))
    groups = roles_and_kinds(param_groups(model))
    inner = PRESETS["demo"].n_head * PRESETS["demo"].head_dim
    assert model.blocks[0].attn.qkv.weight.shape == (3, inner, PRESETS["demo"].dim)
    assert groups["blocks.0.attn.qkv.weight"] == ("hidden", "hidden")
