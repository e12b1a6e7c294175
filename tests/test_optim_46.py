"""Record #46's optimizer options of optim.Muon, each against a reference written from its formula.

NorMuon (normuon), the in-update cautious weight decay (wd_form, cautious_wd, lr_mul), Adam stepped
every other step on the sum of two steps' gradients (step_every) and a parameter viewed as a stack of
matrices (matrix_shape). Everything runs in float64: parameters, state and Newton–Schulz (ns_dtype), so
the optimizer and the reference differ only by the order of their float64 operations (≤ ~1e-15
relative per operation, a few dozen operations per step): TOL = 1e-12. Adam's step count is a float32
tensor (optim.update.adam_math), so its bias corrections 1 − βᵗ carry float32 round-off: ADAM_TOL =
1e-6 relative (measured 4e-8). The distributed step with these
options is checked against the one-process step in tests/test_distributed.py.
"""

import copy
import io
import math

import pytest
import torch

from optim import Muon, orthogonalize
from optim.muon import NOT_SHARDED, _check_sharding

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
ADAM_TOL = dict(rtol=1e-6, atol=1e-9)
PE = "polar_express_speedrun"


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gradients(shape, steps: int, seed: int) -> list[torch.Tensor]:
    gen = seeded(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) for _ in range(steps)]


# ---- NorMuon and the in-update cautious decay, as the record's NorMuon steps one matrix -------------


def normuon_reference(p, grads, *, lr, lr_mul, wd, mu, beta2, axis, scale, matrix_shape=None):
    """The record's NorMuon step, written from its formula, on p (…, m, n) or its matrix_shape view:

    b ← lerp(b, g, 1−μ); u = lerp(g, b, μ); O = polar(u) per matrix; r = ‖O‖_F;
    q = mean(O², axis); s ← lerp(s, q, 1−β₂); V = O/√max(s, 1e-10); V ← V·r/max(‖V‖_F, 1e-10);
    p ← p − lr·lr_mul·scale·(V + lr·wd·[V·p ≥ 0]·p).
    """
    p, b, second = p.clone(), torch.zeros_like(p), None
    history = []
    for g in grads:
        b = torch.lerp(b, g, 1 - mu)
        u = torch.lerp(g, b, mu)
        matrices = u.reshape(-1, *matrix_shape) if matrix_shape else u
        each = matrices.reshape(-1, *matrices.shape[-2:])  # one matrix at a time
        O = torch.stack([orthogonalize(x, coefficients=PE, dtype=F64) for x in each]).reshape(matrices.shape)
        r = O.norm(dim=(-2, -1), keepdim=True)
        q = O.square().mean(dim=axis, keepdim=True)
        second = q * (1 - beta2) if second is None else torch.lerp(second, q, 1 - beta2)
        V = O / second.clamp_min(1e-10).sqrt()
        V = (V * r / V.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)).reshape(p.shape)
        mask = (V * p >= 0).to(F64)
        p = p - lr * lr_mul * scale * (V + lr * wd * mask * p)
        history.append(p)
    return history


@pytest.mark.parametrize("shape, normuon, axis", [
    ((12, 5), "auto", -1),  # tall: one second moment per row
    ((5, 12), "auto", -2),  # wide: one per column
    ((8, 8), "auto", -1),  # square: rows, by the record's rule on its stored shape
    ((8, 8), "column", -2),  # the record's attention: square views of a wide stored matrix, by columns
    ((3, 6, 4), "row", -1),  # a stack of three matrices (our merged q, k, v)
])
def test_normuon_with_in_update_cautious_decay_equals_the_records_formula(shape, normuon, axis):
    hyper = dict(lr=0.05, lr_mul=2.0, wd=1.2, mu=0.9, beta2=0.95)
    p0 = torch.randn(shape, generator=seeded(1), dtype=F64)
    grads = gradients(shape, 4, seed=2)
    scale = math.sqrt(max(1.0, shape[-2] / shape[-1]))  # lr_scale "muon"
    want = normuon_reference(p0, grads, axis=axis, scale=scale, **hyper)
    p = p0.clone().requires_grad_()
    opt = Muon([dict(params=[p], kind="hidden", normuon=normuon, wd_form="in_update", cautious_wd=True,
                     lr_mul=hyper["lr_mul"])], lr=hyper["lr"], momentum=hyper["mu"], weight_decay=hyper["wd"],
               adam_betas=(0.9, hyper["beta2"]), lr_scale="muon", ns_coefficients=PE, ns_dtype=F64)
    for g, expected in zip(grads, want, strict=True):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), expected, **TOL)
    m, n = shape[-2:]
    buffer_shape = (*shape[:-2], m, 1) if axis == -1 else (*shape[:-2], 1, n)
    assert opt.state[p]["second_moment"].shape == buffer_shape


def test_a_matrix_view_maps_each_viewed_matrix_and_scales_by_its_shape():
    """matrix_shape (m, n): the record's attention weight (d, 4d), mapped as the four (d, d) matrices its
    memory holds; here (4, 24) as four (4, 6) views, with NorMuon by columns."""
    p0 = torch.randn(4, 24, generator=seeded(3), dtype=F64)
    grads = gradients((4, 24), 3, seed=4)
    want = normuon_reference(p0, grads, lr=0.05, lr_mul=1.0, wd=0.5, mu=0.95, beta2=0.9, axis=-2,
                             scale=1.0, matrix_shape=(4, 6))
    p = p0.clone().requires_grad_()
    opt = Muon([dict(params=[p], kind="hidden", matrix_shape=(4, 6), normuon="column", wd_form="in_update",
                     cautious_wd=True)], lr=0.05, momentum=0.95, weight_decay=0.5, adam_betas=(0.9, 0.9),
               lr_scale="muon", ns_coefficients=PE, ns_dtype=F64)
    for g, expected in zip(grads, want, strict=True):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), expected, **TOL)
    assert opt.state[p]["second_moment"].shape == (4, 1, 6)


def test_the_records_transposed_mlp_weight_with_lr_mul_2_is_ours_with_the_muon_lr_scale():
    """Record #46 stores c_fc as (d, 4d), the transpose of a Linear's (d_out, d_in) = (4d, d), with
    lr_mul 2; in our layout lr_scale "muon" gives √(4d/d) = 2 instead. NorMuon "auto" keeps one second
    moment per hidden unit in both (the stored matrix's columns, our rows), and the in-update decay
    uses the same lr·lr_mul·s: the two steps are transposes of each other."""
    d, hyper = 4, dict(lr=0.05, momentum=0.9, weight_decay=1.2, lr_scale="muon", ns_coefficients=PE,
                       ns_dtype=F64, normuon="auto", wd_form="in_update", cautious_wd=True)
    ours = torch.randn(4 * d, d, generator=seeded(5), dtype=F64).requires_grad_()
    stored = ours.detach().mT.clone().requires_grad_()
    opt_ours = Muon([dict(params=[ours], kind="hidden")], **hyper)
    opt_record = Muon([dict(params=[stored], kind="hidden", lr_mul=2.0)], **hyper)
    for g in gradients((4 * d, d), 3, seed=6):
        ours.grad, stored.grad = g.clone(), g.mT.clone()
        opt_ours.step()
        opt_record.step()
        torch.testing.assert_close(stored.detach().mT, ours.detach(), **TOL)


# ---- the decay rates: how the in-update form follows the lr schedule twice ------------------------


@pytest.mark.parametrize("kind, shape, scale", [("hidden", (16, 4), 2.0), ("adam", (7,), 1.0)])
@pytest.mark.parametrize("wd_form", ["decoupled", "in_update"])
def test_on_a_zero_gradient_the_parameter_decays_by_the_forms_rate(kind, shape, scale, wd_form):
    """A zero gradient gives a zero update (u·p = 0 passes the cautious mask), so p ← (1 − ρ)·p exactly:
    decoupled ρ = lr·wd for Muon kinds (lr·lr_mul·wd for Adam: the record's DistAdam), in_update
    ρ = lr·lr_mul·s·lr·wd, s = lr_scale "muon" of (16, 4) = 2 (1 for Adam)."""
    lr, lr_mul, wd = 0.1, 3.0, 1.2
    p0 = torch.randn(shape, generator=seeded(7), dtype=F64)
    p = p0.clone().requires_grad_()
    opt = Muon([dict(params=[p], kind=kind, lr_mul=lr_mul, wd_form=wd_form, cautious_wd=True)], lr=lr,
               weight_decay=wd, lr_scale="muon", ns_dtype=F64)
    p.grad = torch.zeros_like(p)
    opt.step()
    rate = {"decoupled": lr * wd * (lr_mul if kind == "adam" else 1.0),
            "in_update": lr * lr_mul * scale * lr * wd}[wd_form]
    torch.testing.assert_close(p.detach(), (1 - rate) * p0, **TOL)


def adam_reference(p, grads, *, lr, b1, b2, eps, rate, cautious):
    """AdamW from its formula with the decay p ← p − ρ·[d·p ≥ 0]·p − d (cautious) or p·(1 − ρ) − d."""
    p, m, v, history = p.clone(), torch.zeros_like(p), torch.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        d = lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
        mask = (d * p >= 0).to(F64) if cautious else torch.ones_like(p)
        p = p - rate * mask * p - d
        history.append(p)
    return history


@pytest.mark.parametrize("cautious, wd_form", [(True, "decoupled"), (True, "in_update"),
                                               (False, "in_update")])
def test_adam_with_cautious_or_in_update_decay_equals_the_formula(cautious, wd_form):
    lr, lr_mul, wd = 0.02, 5.0, 0.3
    step = lr * lr_mul
    rate = step * wd if wd_form == "decoupled" else step * lr * wd
    p0 = torch.randn(9, generator=seeded(8), dtype=F64)
    grads = gradients((9,), 4, seed=9)
    want = adam_reference(p0, grads, lr=step, b1=0.65, b2=0.95, eps=1e-8, rate=rate, cautious=cautious)
    p = p0.clone().requires_grad_()
    opt = Muon([dict(params=[p], kind="adam", lr_mul=lr_mul, wd_form=wd_form, cautious_wd=cautious)],
               lr=lr, weight_decay=wd, adam_betas=(0.65, 0.95))
    for g, expected in zip(grads, want, strict=True):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), expected, **ADAM_TOL)


# ---- Adam stepped every other step ----------------------------------------------------------------


def test_a_group_stepped_every_other_step_steps_on_the_sum_of_two_steps_gradients():
    """Record #39: the Adam group rests on even steps (its gradients kept by zero_grad, so the next
    backward adds to them) and steps on odd ones on g_even + g_odd, counting one Adam step per update;
    the hidden group steps every time. Reference: torch.optim.Adam on the summed gradients."""
    matrix = torch.randn(6, 4, generator=seeded(10), dtype=F64, requires_grad=True)
    vector = torch.randn(5, generator=seeded(11), dtype=F64, requires_grad=True)
    reference = vector.detach().clone().requires_grad_()
    opt = Muon([dict(params=[matrix], kind="hidden"), dict(params=[vector], kind="adam", step_every=2)],
               lr=0.01, adam_betas=(0.65, 0.95), ns_dtype=F64)
    torch_adam = torch.optim.Adam([reference], lr=0.01, betas=(0.65, 0.95), eps=1e-8)
    grads = gradients((5,), 6, seed=12)
    for step, g in enumerate(grads):
        before, matrix_before = vector.detach().clone(), matrix.detach().clone()
        (vector * g).sum().backward()  # accumulates into a kept gradient
        matrix.grad = torch.ones_like(matrix)
        opt.step()
        opt.zero_grad()
        assert not torch.equal(matrix.detach(), matrix_before)
        if step % 2 == 0:
            assert torch.equal(vector.detach(), before)  # rests
            assert torch.equal(vector.grad, g)  # kept for the next step's backward
            assert opt.state_dict()["param_groups"][1]["pending_steps"] == 1
        else:
            reference.grad = grads[step - 1] + g
            torch_adam.step()
            torch.testing.assert_close(vector.detach(), reference.detach(), **ADAM_TOL)
            assert vector.grad is None and opt.state[vector]["step"].item() == (step + 1) // 2


def resting_run(seed: int) -> tuple[list[torch.Tensor], Muon]:
    """A hidden matrix stepped every step and two Adam tensors every 3rd, on float64 parameters."""
    params = [torch.randn(s, generator=seeded(seed + i), dtype=F64, requires_grad=True)
              for i, s in enumerate([(6, 4), (5,), (2, 3)])]
    opt = Muon([dict(params=params[:1], kind="hidden"), dict(params=params[1:], kind="adam", step_every=3)],
               lr=0.01, ns_dtype=F64)
    return params, opt


def accumulating_steps(params: list[torch.Tensor], opt: Muon, grads: list[list[torch.Tensor]]) -> None:
    """backward (adding to the gradients zero_grad kept), step(), zero_grad(), once per entry of grads."""
    for g in grads:
        sum((p * q).sum() for p, q in zip(params, g, strict=True)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("saved_at", [2, 5])
def test_a_state_dict_saved_while_a_group_rests_holds_its_gradient_sum_and_resumes_bitwise(saved_at):
    """Saved after 2 steps the Adam group has rested twice and has no state yet; after 5 it has stepped
    once (at the 3rd) and rested twice since. Either way its entries hold p.grad = the last two steps'
    gradient sum, which a fresh optimizer takes back into p.grad: its next steps are the straight run's."""
    shapes = [(6, 4), (5,), (2, 3)]
    grads = [[g[i] for g in (gradients(s, 7, seed=40 + k) for k, s in enumerate(shapes))] for i in range(7)]
    straight, straight_opt = resting_run(30)
    accumulating_steps(straight, straight_opt, grads)
    params, opt = resting_run(30)
    accumulating_steps(params, opt, grads[:saved_at])
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    for i in (1, 2):
        assert torch.equal(state["state"][i]["pending_grad"], grads[saved_at - 2][i] + grads[saved_at - 1][i])
        assert sorted(state["state"][i]) == ["pending_grad"] if saved_at == 2 else [
            "exp_avg", "exp_avg_sq", "pending_grad", "step"]
    assert "pending_grad" not in state["state"][0] and "pending_grad" not in opt.state[params[1]]

    resumed, resumed_opt = resting_run(30)
    with torch.no_grad():
        for p, q in zip(resumed, params, strict=True):
            p.copy_(q)
    resumed_opt.load_state_dict(state)
    assert resumed[0].grad is None and torch.equal(resumed[1].grad, params[1].grad)
    accumulating_steps(resumed, resumed_opt, grads[saved_at:])
    for p, q in zip(resumed, straight, strict=True):
        assert torch.equal(p, q)  # bitwise: the same sums, stepped the same way


def test_a_pending_gradient_is_checked_at_load_and_a_state_dict_without_one_warns():
    params, opt = resting_run(30)
    accumulating_steps(params, opt, [[torch.ones_like(p) for p in params]])
    saved = opt.state_dict()
    wrong = {**saved, "state": {**saved["state"], 1: {"pending_grad": torch.zeros(4, dtype=F64)}}}
    with pytest.raises(ValueError, match=r"pending gradient of parameter 1 of shape \(5,\) is \(\(4,\), "):
        resting_run(30)[1].load_state_dict(wrong)
    stepped = {**saved, "param_groups": [{**g, "pending_steps": 0} for g in saved["param_groups"]]}
    with pytest.raises(ValueError, match="pending gradient for parameter 1 .* saved with pending_steps 0"):
        resting_run(30)[1].load_state_dict(stepped)
    old = {**saved, "state": {i: e for i, e in saved["state"].items() if i not in (1, 2)}}  # before this
    fresh, fresh_opt = resting_run(30)
    with pytest.warns(UserWarning, match=r"param group 1 \(adam\) was saved resting \(pending_steps 1 of "
                                         r"step_every 3\) without its accumulated gradients"):
        fresh_opt.load_state_dict(old)
    assert fresh[1].grad is None and fresh_opt.param_groups[1]["pending_steps"] == 1


def test_loading_drops_what_a_step_every_group_accumulated_since_the_save():
    """A warm-up's steps, then the state saved before them put back (train_gpt.py's warm-up): the Adam
    group's gradient from those steps goes with them; a step_every = 1 group's p.grad is not state."""
    params, opt = resting_run(30)
    saved = copy.deepcopy(opt.state_dict())  # nothing pending yet
    accumulating_steps(params, opt, [[torch.ones_like(p) for p in params]])
    assert params[1].grad is not None and opt.param_groups[1]["pending_steps"] == 1
    params[0].grad = torch.ones_like(params[0])
    opt.load_state_dict(saved)
    assert params[1].grad is None and params[2].grad is None and params[0].grad is not None


def test_discarding_drops_a_resting_groups_gradients_too():
    vector = torch.ones(3, dtype=F64, requires_grad=True)
    opt = Muon([dict(params=[vector], kind="adam", step_every=2)])
    vector.grad = torch.ones_like(vector)
    opt.step()
    opt.zero_grad()
    assert vector.grad is not None  # kept while resting
    opt.discard_gradients()
    assert vector.grad is None


# ---- options are checked at construction --------------------------------------------------------


@pytest.mark.parametrize("group, message", [
    (dict(kind="hidden", normuon="rows"), "normuon='rows'"),
    (dict(kind="adam", normuon="row"), "kind 'adam'"),
    (dict(kind="hidden", wd_form="coupled"), "wd_form='coupled'"),
    (dict(kind="hidden", step_every=0), "step_every=0"),
    (dict(kind="hidden", step_every=1.5), "step_every=1.5"),
    (dict(kind="hidden", lr_mul=-1.0), "lr_mul=-1.0"),
    (dict(kind="hidden", matrix_shape=(5, 5)), "no stack of matrix_shape"),
    (dict(kind="hidden", matrix_shape=(4,)), "matrix_shape=(4,)"),
])
def test_a_bad_option_is_refused_naming_it(group, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Muon([dict(params=[torch.zeros(4, 8, requires_grad=True)], **group)])


@pytest.mark.parametrize("key, value", [("normuon", "row"), ("wd_form", "in_update"),
                                        ("matrix_shape", (2, 2)), ("step_every", 2)])
def test_under_fully_shard_each_option_is_refused_and_its_default_accepted(key, value):
    """fully_shard steps rows apart and averages gradients at every backward (docs/MATH.md §4.7)."""
    with pytest.raises(ValueError, match=f"{key}=.*fully_shard"):
        _check_sharding({"params": [], key: value}, sharded=True)
    _check_sharding({"params": [], **NOT_SHARDED}, sharded=True)
    _check_sharding({"params": [], key: value}, sharded=False)
