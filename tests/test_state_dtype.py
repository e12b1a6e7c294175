"""Record #46's storage: the LM head and gates stored in bf16 (GPTConfig.head_gate_dtype) and optimizer
state in bf16 (optim.Muon's group key state_dtype), each against its defining property.

Adam's reference is the record's DistAdam formula (its line 663 on: bf16 moments, ε added to √v before
the bias correction) written out per step, each moment computed in float64 and rounded to bf16 as
stored, the step computed from the stored moments. Ours computes in float32 before that rounding, so
a moment may land one bf16 step away where the float64 and float32 values straddle a rounding
boundary: moments are held to one bf16 ulp (2⁻⁸ relative), the parameters to 1e-5 relative (float32
arithmetic on the same stored moments).
"""

import dataclasses
import io

import pytest
import torch
from test_distributed import counting_host_reads

from model import GPT, PRESETS
from optim import Muon, orthogonalize
from optim.kinds import KINDS
from optim.update import adam_update, kind_update
from training import recipe

BF16 = torch.bfloat16
BF16_ULP = dict(rtol=2**-8, atol=0.0)
LR, BETAS, EPS = 0.01, (0.65, 0.95), 1e-8


def adam_bf16_reference(p: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The record's DistAdam with bf16 moments, no weight decay: per step t, in float64,
    m ← bf16(β₁·m + (1 − β₁)·g), v ← bf16(β₂·v + (1 − β₂)·g²),
    p ← p − lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ)·m/(√v + ε), rounded to p's dtype. Returns (p, m, v)."""
    b1, b2 = BETAS
    m = v = torch.zeros_like(p, dtype=BF16)
    work = p.double()
    for t, g in enumerate(grads, start=1):
        g = g.to(p.dtype).double()  # the gradient is in p's dtype
        m = (b1 * m.double() + (1 - b1) * g).to(BF16)
        v = (b2 * v.double() + (1 - b2) * g * g).to(BF16)
        step = LR * (1 - b2**t) ** 0.5 / (1 - b1**t)
        work = work.to(p.dtype).double() - step * m.double() / (v.double().sqrt() + EPS)
    return work.to(p.dtype), m, v


def adam_eager_reference(p: torch.Tensor, grads: list[torch.Tensor],
                         weight_decay: float) -> tuple[torch.Tensor, ...]:
    """The record's DistAdam step as its eager code computes it (its line 721 on): PyTorch ops in place on
    the bf16 moments and on p, each rounding its result to the tensor it writes. Returns (p, m, v)."""
    b1, b2 = BETAS
    p, m, v = p.clone(), torch.zeros_like(p, dtype=BF16), torch.zeros_like(p, dtype=BF16)
    for t, g in enumerate(grads, start=1):
        g = g.to(p.dtype)
        p.mul_(1 - LR * weight_decay)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        update = m.div(v.sqrt().add_(EPS)).mul_(LR * ((1 - b2**t) ** 0.5 / (1 - b1**t)))
        p.add_(update, alpha=-1.0)
    return p, m, v


def adam_run(p: torch.Tensor, grads: list[torch.Tensor], state_dtype: str, rounding: str = "precise",
             weight_decay: float = 0.0) -> tuple[torch.Tensor, Muon]:
    p = p.clone().requires_grad_()
    opt = Muon([dict(params=[p], kind="adam", state_dtype=state_dtype, step_rounding=rounding)], lr=LR,
               adam_betas=BETAS, adam_eps=EPS, adam_eps_form="raw", weight_decay=weight_decay)
    for g in grads:
        p.grad = g.to(p.dtype)
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_adam_with_bf16_moments_equals_the_records_distadam_formula(dtype):
    gen = torch.Generator().manual_seed(0)
    p = (0.01 * torch.randn(5, 7, generator=gen)).to(dtype)  # small: p − d resolves d's rounding
    grads = [torch.randn(5, 7, generator=gen) for _ in range(4)]
    want_p, want_m, want_v = adam_bf16_reference(p, grads)
    got_p, opt = adam_run(p, grads, "bfloat16")
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == BF16
    torch.testing.assert_close(state["exp_avg"], want_m, **BF16_ULP)
    torch.testing.assert_close(state["exp_avg_sq"], want_v, **BF16_ULP)
    tol = dict(rtol=1e-5, atol=1e-9) if dtype == torch.float32 else BF16_ULP
    torch.testing.assert_close(got_p, want_p, **tol)
    # The rounding matters: float32 moments (the default) take another path.
    default_p, default = adam_run(p, grads, "float32")
    assert default.state[default.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32
    if dtype == torch.float32:
        assert not torch.allclose(default_p, want_p, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype, weight_decay", [(torch.float32, 0.0), (torch.float32, 0.5), (BF16, 0.5)])
def test_stepwise_adam_is_the_records_eager_distadam_bit_for_bit(dtype, weight_decay):
    gen = torch.Generator().manual_seed(3)
    p = (0.01 * torch.randn(9, 33, generator=gen)).to(dtype)
    grads = [torch.randn(9, 33, generator=gen) for _ in range(5)]
    want_p, want_m, want_v = adam_eager_reference(p, grads, weight_decay)
    got_p, opt = adam_run(p, grads, "bfloat16", "stepwise", weight_decay)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert torch.equal(state["exp_avg"], want_m) and torch.equal(state["exp_avg_sq"], want_v)
    assert torch.equal(got_p, want_p)
    # The precise form (float32, rounded once as stored) is another arithmetic on the same moments.
    precise_p, _ = adam_run(p, grads, "bfloat16", "precise", weight_decay)
    assert not torch.equal(precise_p, want_p)


def test_stepwise_adam_on_float32_moments_is_the_precise_form_to_float32_rounding():
    gen = torch.Generator().manual_seed(4)
    p, grads = torch.randn(6, 10, generator=gen), [torch.randn(6, 10, generator=gen) for _ in range(4)]
    stepwise, _ = adam_run(p, grads, "float32", "stepwise", 0.1)
    precise, _ = adam_run(p, grads, "float32", "precise", 0.1)
    torch.testing.assert_close(stepwise, precise, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cautious", [False, True])
def test_stepwise_adam_leaves_an_unflagged_tensor_alone_and_steps_a_flagged_one_as_without_flags(cautious):
    # flags (a distributed step's "no rank had a gradient"): the flagged tensor steps as with flags=None;
    # the unflagged one, stepped once before, keeps its value, its moments and its step count exactly.
    group = dict(lr=LR, momentum=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=0.5, lr_mul=1.0,
                 wd_form="decoupled", cautious_wd=cautious, eps_form="raw", state_dtype="bfloat16",
                 step_rounding="stepwise")
    gen = torch.Generator().manual_seed(5)
    flagged = [torch.randn(4, 6, generator=gen), torch.randn(3, generator=gen).to(BF16)]
    plain, flagged_states, plain_states = [flagged[0].clone()], [{}, {}], [{}]
    for step in range(3):
        grads = [torch.randn(4, 6, generator=gen), torch.randn(3, generator=gen).to(BF16)]
        if step == 0:
            adam_update(group, flagged_states, flagged, grads, torch.tensor([True, True]))
            moments = (flagged_states[1][k].clone() for k in ("exp_avg", "exp_avg_sq"))
            after_one = [flagged[1].clone(), *moments]
        else:
            grads[1].zero_()  # what a step without any rank's gradient receives
            adam_update(group, flagged_states, flagged, grads, torch.tensor([True, False]))
        adam_update(group, plain_states, plain, grads[:1], None)
    assert torch.equal(flagged[0], plain[0])
    assert torch.equal(flagged_states[0]["exp_avg_sq"], plain_states[0]["exp_avg_sq"])
    now = [flagged[1], flagged_states[1]["exp_avg"], flagged_states[1]["exp_avg_sq"]]
    assert all(torch.equal(a, b) for a, b in zip(now, after_one, strict=True))
    assert flagged_states[1]["step"].item() == 1


# ---- NorMuon with step_rounding "stepwise": record #46's NorMuon.step, op for op ------------------------

PE = "polar_express_speedrun"
NORMUON = dict(lr=0.023, lr_mul=2.0, wd=1.2, mu=0.95, beta2=0.95)


def normuon_eager_reference(params: list[torch.Tensor], grads: list[torch.Tensor], ns_dtype: torch.dtype,
                            axis: int, scale: float, matrix_shape=None) -> tuple[torch.Tensor, ...]:
    """Record #46's NorMuon step (its lines 548–610) on one group's parameters of one shape, as its eager
    code computes it: stacked, in the parameters' dtype, the update in what Polar Express returns
    (ns_dtype; the map is optim's orthogonalize, checked against the record's elsewhere), in place,
    the in-update cautious decay. grads: one stacked (K, *shape) gradient per step. Returns
    (parameters, momentum, second moment)."""
    P = torch.stack(params).clone()
    momentum, second = torch.zeros_like(P), None
    lr, wd, mu, beta2 = NORMUON["lr"], NORMUON["wd"], NORMUON["mu"], NORMUON["beta2"]
    for G in grads:
        G = G.to(P.dtype).clone()
        momentum.lerp_(G, 1 - mu)
        U = G.lerp_(momentum, mu)
        matrices = U.view(len(params), -1, *matrix_shape) if matrix_shape else U
        V = orthogonalize(matrices.to(ns_dtype), coefficients=PE, dtype=ns_dtype, rounding="fused")
        if second is None:
            second = torch.zeros_like(V.mean(dim=axis, keepdim=True), dtype=P.dtype)
        eff_lr = lr * (scale * P.new_tensor([NORMUON["lr_mul"]] * len(params)).view(-1, 1, 1))
        eff_wd = lr * wd * P.new_tensor([1.0] * len(params)).view(-1, 1, 1)
        norm = V.norm(dim=(-2, -1), keepdim=True)
        second.lerp_(V.square().mean(dim=axis, keepdim=True).to(P.dtype), 1 - beta2)
        V.mul_(second.clamp_min(1e-10).rsqrt_())
        V.mul_(norm / V.norm(dim=(-2, -1), keepdim=True).clamp_min_(1e-10))
        V = V.view(P.shape)
        mask = (V * P) >= 0
        V.addcmul_(P, (eff_wd.view(-1, *[1] * (P.dim() - 1)) * mask).to(P.dtype))
        P.addcmul_(V, -eff_lr.view(-1, *[1] * (P.dim() - 1)))
    return P, momentum, second


def normuon_run(params: list[torch.Tensor], grads: list[torch.Tensor], ns_dtype: torch.dtype, rounding: str,
                **options) -> tuple[list[torch.Tensor], Muon]:
    params = [p.clone().requires_grad_() for p in params]
    opt = Muon([dict(params=params, kind="hidden", state_dtype="param", step_rounding=rounding, **options)],
               lr=NORMUON["lr"], lr_mul=NORMUON["lr_mul"], momentum=NORMUON["mu"], weight_decay=NORMUON["wd"],
               wd_form="in_update", cautious_wd=True, adam_betas=(0.9, NORMUON["beta2"]), lr_scale="muon",
               ns_coefficients=PE, ns_dtype=ns_dtype, ns_rounding="fused")
    for G in grads:
        for p, g in zip(params, G.unbind(0), strict=True):
            p.grad = g.to(p.dtype)
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("dtype, ns_dtype, shape, normuon, axis, matrix_shape", [
    (BF16, BF16, (6, 12), "auto", -2, None),  # the record's attention gates: bf16, one moment per column
    (BF16, torch.float32, (6, 12), "auto", -2, None),  # the same with float32 Polar Express (parity's check)
    (BF16, BF16, (1, 12), "auto", -2, None),  # the smear gate
    (torch.float32, BF16, (32, 8), "auto", -1, None),  # a float32 MLP matrix, tall: per row
    (torch.float32, BF16, (8, 32), "column", -2, (8, 8)),  # attention: (d, 4d) as four (d, d), by columns
])
def test_stepwise_normuon_is_the_records_eager_normuon_bit_for_bit(dtype, ns_dtype, shape, normuon, axis,
                                                                   matrix_shape):
    gen = torch.Generator().manual_seed(7)
    params = [(0.1 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(2)]
    grads = [torch.randn(2, *shape, generator=gen) for _ in range(3)]
    m, n = matrix_shape or shape
    scale = max(1.0, shape[0] / shape[1]) ** 0.5  # the record's sizing, on the stored shape
    want_p, want_b, want_s = normuon_eager_reference(params, grads, ns_dtype, axis, scale, matrix_shape)
    got, opt = normuon_run(params, grads, ns_dtype, "stepwise", normuon=normuon, matrix_shape=matrix_shape)
    states = [opt.state[p] for p in opt.param_groups[0]["params"]]
    assert torch.equal(torch.stack(got), want_p)
    assert torch.equal(torch.stack([s["momentum_buffer"] for s in states]), want_b)
    assert torch.equal(torch.stack([s["second_moment"] for s in states]).view(want_s.shape), want_s)
    precise, _ = normuon_run(params, grads, ns_dtype, "precise", normuon=normuon, matrix_shape=matrix_shape)
    assert not torch.equal(torch.stack(precise), want_p)  # another arithmetic: V rounded once, as stored


def test_stepwise_normuon_leaves_an_unflagged_tensor_alone_and_steps_a_flagged_one_as_without_flags():
    group = dict(lr=0.05, momentum=0.9, nesterov=True, beta2=0.95, weight_decay=1.2, lr_mul=2.0,
                 wd_form="in_update", cautious_wd=True, normuon="auto", matrix_shape=None, lr_scale="muon",
                 ns_steps=5, ns_coefficients=PE, ns_dtype=BF16, ns_eps=None, ns_rounding="fused",
                 state_dtype="param", step_rounding="stepwise")
    # float32 parameters, the record's hidden matrices (flags are 0-dim float32 tensors, which lerp would
    # round to a bf16 buffer's dtype; no preset sends flags: the record's model uses every parameter).
    gen = torch.Generator().manual_seed(8)
    flagged = [torch.randn(6, 12, generator=gen) for _ in range(2)]
    plain, flagged_states, plain_states = [flagged[0].clone()], [{}, {}], [{}]
    for step in range(3):
        grads = [torch.randn(6, 12, generator=gen) for _ in range(2)]
        if step == 0:
            kind_update(KINDS["hidden"], group, flagged_states, flagged, grads, torch.tensor([True, True]))
            after_one = [flagged[1].clone(), *(flagged_states[1][k].clone() for k in flagged_states[1])]
        else:
            grads[1].zero_()  # what a step without any rank's gradient receives
            kind_update(KINDS["hidden"], group, flagged_states, flagged, grads, torch.tensor([True, False]))
        kind_update(KINDS["hidden"], group, plain_states, plain, grads[:1], None)
    assert torch.equal(flagged[0], plain[0])
    assert all(torch.equal(flagged_states[0][k], plain_states[0][k]) for k in plain_states[0])
    now = [flagged[1], *flagged_states[1].values()]
    assert all(torch.equal(a, b) for a, b in zip(now, after_one, strict=True))


def test_a_stepwise_normuon_step_reads_nothing_on_the_host():
    # Its coefficients are tensors made on the device (torch.full), as the lr is a Python float: on CUDA
    # no step waits for the GPU.
    gen = torch.Generator().manual_seed(10)
    params = [(0.1 * torch.randn(6, 12, generator=gen)).to(BF16) for _ in range(2)]
    grads = [torch.randn(2, 6, 12, generator=gen) for _ in range(2)]
    normuon_run(params, grads[:1], BF16, "stepwise", normuon="auto")  # the state made before counting
    _, opt = normuon_run(params, grads[:1], BF16, "stepwise", normuon="auto")
    for p, g in zip(opt.param_groups[0]["params"], grads[1].unbind(0), strict=True):
        p.grad = g.to(p.dtype)
    reads = []
    with counting_host_reads(reads):
        opt.step()
    assert reads == []


@pytest.mark.parametrize("kind", ["embed", "head_sign"])
def test_stepwise_rounding_is_refused_on_a_kind_the_records_have_not(kind):
    with pytest.raises(ValueError, match=f"step_rounding='stepwise' on kind '{kind}'.*use 'precise'"):
        Muon([dict(params=[torch.zeros(4, 4, requires_grad=True)], kind=kind, step_rounding="stepwise")])


def test_an_unknown_step_rounding_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="step_rounding='fused'.*'stepwise'"):
        Muon([torch.zeros(2, 2, requires_grad=True)], step_rounding="fused")


def test_param_state_follows_each_parameters_dtype_and_updates_a_bf16_one_in_bf16():
    # The record's NorMuon keeps a bf16 gate's momentum (zeros_like its bf16 gradient) in bf16 and lerps
    # there: buf = lerp(0, g, 1 − μ) in bf16 after one step; a float32 matrix keeps float32 buffers.
    gen = torch.Generator().manual_seed(1)
    gate = torch.randn(6, 12, generator=gen).to(BF16).requires_grad_()
    hidden = torch.randn(8, 8, generator=gen).requires_grad_()
    opt = Muon([dict(params=[gate], kind="hidden", state_dtype="param", normuon="auto"),
                dict(params=[hidden], kind="hidden", state_dtype="param", normuon="auto")],
               lr=0.02, momentum=0.95)
    gate.grad, hidden.grad = torch.randn(6, 12, generator=gen).to(BF16), torch.randn(8, 8, generator=gen)
    opt.step()
    dtypes = {k: v.dtype for k, v in opt.state[gate].items()}
    assert dtypes == {"momentum_buffer": BF16, "second_moment": BF16}
    dtypes = {k: v.dtype for k, v in opt.state[hidden].items()}
    assert dtypes == {"momentum_buffer": torch.float32, "second_moment": torch.float32}
    assert torch.equal(opt.state[gate]["momentum_buffer"], torch.zeros_like(gate).lerp_(gate.grad, 1 - 0.95))
    assert gate.dtype == BF16


def test_a_bf16_state_dict_round_trips_and_float32_state_is_refused_at_load():
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    p, opt = adam_run(torch.zeros(3, 4), grads[:2], "bfloat16")
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    q = p.clone().requires_grad_()
    resumed = Muon([dict(params=[q], kind="adam", state_dtype="bfloat16")], lr=LR, adam_betas=BETAS,
                   adam_eps=EPS, adam_eps_form="raw")
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    want, _ = adam_run(torch.zeros(3, 4), grads, "bfloat16")
    q.grad = grads[2]
    resumed.step()
    assert torch.equal(q.detach(), want)
    _, float32 = adam_run(torch.zeros(3, 4), grads[:2], "float32")
    with pytest.raises(ValueError, match="exp_avg"):
        resumed.load_state_dict(float32.state_dict())


def test_a_state_dict_from_before_state_dtype_and_step_rounding_resumes_as_it_was_saved():
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    p, opt = adam_run(torch.zeros(3, 4), grads[:2], "float32")
    old = opt.state_dict()
    old["param_groups"] = [{k: v for k, v in g.items() if k not in ("state_dtype", "step_rounding")}
                           for g in old["param_groups"]]
    q = p.clone().requires_grad_()
    resumed = Muon([dict(params=[q], kind="adam")], lr=LR, adam_betas=BETAS, adam_eps=EPS,
                   adam_eps_form="raw", step_rounding="stepwise")
    resumed.load_state_dict(old)
    assert (resumed.param_groups[0]["state_dtype"], resumed.param_groups[0]["step_rounding"]) == (
        "float32", "precise")
    q.grad = grads[2]
    resumed.step()
    assert torch.equal(q.detach(), adam_run(torch.zeros(3, 4), grads, "float32")[0])
    old["param_groups"][0].pop("eps_form")  # a key older than these is still refused
    with pytest.raises(ValueError, match=r"lacks \['eps_form'\]: it was saved by another version"):
        resumed.load_state_dict(old)


def test_a_state_dict_saved_with_adam_rounding_loads_it_as_step_rounding():
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    p, opt = adam_run(torch.zeros(3, 4), grads[:2], "bfloat16", "stepwise")
    old = opt.state_dict()
    old["param_groups"] = [{("adam_rounding" if k == "step_rounding" else k): v for k, v in g.items()}
                           for g in old["param_groups"]]
    q = p.clone().requires_grad_()
    resumed = Muon([dict(params=[q], kind="adam", state_dtype="bfloat16")], lr=LR, adam_betas=BETAS,
                   adam_eps=EPS, adam_eps_form="raw")
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["step_rounding"] == "stepwise"
    assert "adam_rounding" not in resumed.param_groups[0]
    q.grad = grads[2]
    resumed.step()
    assert torch.equal(q.detach(), adam_run(torch.zeros(3, 4), grads, "bfloat16", "stepwise")[0])


def test_an_unknown_state_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="state_dtype='float16'.*'param'"):
        Muon([torch.zeros(2, 2, requires_grad=True)], state_dtype="float16")


TINY_46 = dataclasses.replace(PRESETS["124m-46"], n_layer=4, n_head=1, head_dim=64, dim=64, vocab_size=256,
                              max_seq_len=128, long_window_layers=(1, 3), attention_free_layers=(0,),
                              mlp_free_layers=(0,), backout_layer=2, skips=((1, 2),), bos_token=0)


def test_the_head_and_gates_are_stored_in_head_gate_dtype_on_cuda_and_float32_elsewhere():
    assert PRESETS["124m-46"].head_gate_dtype == "bfloat16" and PRESETS["124m"].head_gate_dtype == "float32"
    model = GPT(TINY_46).cast_storage("cuda")  # the dtypes to_device gives on CUDA, here on the CPU
    stored = {name: p.dtype for name, p in model.named_parameters() if p.dtype != torch.float32}
    gates = {f"blocks.{i}.attn.gate.weight" for i in (1, 2, 3)} | {"smear.gate.weight"}
    tables = {"embed.weight", *(f"value_embeds.{i}.weight" for i in range(2))}
    assert stored == dict.fromkeys({"lm_head.weight", *gates, *tables}, BF16)
    assert all(p.dtype == torch.float32 for p in GPT(TINY_46).cast_storage("cpu").parameters())


def test_bf16_head_and_gates_leave_the_bf16_forward_unchanged():
    # With a bf16 stream each CastedLinear casts its weight to bf16 for the matmul: storing it in bf16
    # (weights bf16-representable) computes the same logits.
    torch.manual_seed(3)
    fp32 = GPT(dataclasses.replace(TINY_46, head_gate_dtype="float32")).cast_storage("cuda")
    with torch.no_grad():
        for p in fp32.parameters():
            p.copy_((0.1 * torch.randn_like(p, dtype=torch.float32)).to(BF16))
    bf16 = GPT(TINY_46).cast_storage("cuda")
    bf16.load_state_dict(fp32.state_dict())
    idx = torch.randint(1, 256, (1, 64))
    idx[0, 0] = 0
    assert torch.equal(fp32(idx), bf16(idx))
    assert bf16.lm_head.weight.dtype == BF16


@pytest.mark.parametrize("preset, adam, muon", [("speedrun", "bfloat16", "param"),
                                                ("speedrun-2025-07-12", "float32", "float32"),
                                                ("demo", "float32", "float32")])
def test_the_speedrun_preset_takes_the_records_state_dtypes_and_the_others_the_default(preset, adam, muon):
    optimizer = recipe.build_optimizer(GPT(TINY_46), recipe.parse_config(["--preset", preset]))
    got = {(group["kind"] == "adam", group["state_dtype"]) for group in optimizer.param_groups}
    assert got == {(True, adam), (False, muon)}
