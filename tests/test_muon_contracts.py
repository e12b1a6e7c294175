"""optim.Muon under torch.optim's contracts: groups, schedulers, checks, copies and state dicts.

What a torch.optim user relies on without reading Muon's docstring: one group given is one
param_groups entry, schedulers drive what they write, bad hyper-parameters raise ValueError, copies
and torch's checkpoint helpers work, and state dicts load with torch.load(weights_only=True).
"""

import copy
import io
import pickle

import pytest
import torch
import torch.distributed as dist
from test_distributed import init_gloo, spawn
from test_muon import F32, seeded, step_with
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, OneCycleLR

from optim import COEFFICIENTS, Coefficients, Muon, orthogonalize, param_groups


def mixed(seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """Two matrices (hidden) and two vectors (adam), as two groups given without a kind."""
    gen = seeded(seed)
    matrices = [torch.randn(8, 12, generator=gen), torch.randn(12, 8, generator=gen)]
    vectors = [torch.randn(12, generator=gen), torch.randn(8, generator=gen)]
    return matrices + vectors, [{"params": matrices}, {"params": vectors, "lr": 0.01}]


# ---- one group given, one param group ----------------------------------------------------------


def test_each_group_given_is_one_param_group_of_the_kind_torch_muon_would_give():
    params, groups = mixed()
    opt = Muon(groups)
    assert [(g["kind"], g["params"]) for g in opt.param_groups] == [("hidden", params[:2]),
                                                                    ("adam", params[2:])]
    opt.param_groups[1]["lr"] = 0.0  # freezes the vectors, as in torch.optim, and only them
    before = [p.clone() for p in params]
    step_with(opt, params, [torch.ones_like(p) for p in params])
    assert [torch.equal(p, q) for p, q in zip(params, before, strict=True)] == [False, False, True, True]


def test_lambda_lr_takes_one_function_per_group_given():
    params, groups = mixed()
    opt = Muon(groups, lr=0.02)
    scheduler = LambdaLR(opt, [lambda step: 0.5**step, lambda step: 0.1 * step])
    step_with(opt, params, [torch.ones_like(p) for p in params])
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [0.01, pytest.approx(0.001)]


def test_a_group_mixing_matrices_with_other_tensors_and_no_kind_is_refused():
    matrix, vector = torch.zeros(4, 6), torch.zeros(6)
    with pytest.raises(ValueError, match=r"param group 0 has no 'kind' and mixes 2-D matrices with other "
                                         r"tensors \[\(4, 6\), \(6,\)\].*optim.param_groups\(model\)"):
        Muon([matrix, vector])
    model = nn.Linear(6, 4)
    assert [g["kind"] for g in Muon(param_groups(model)).param_groups] == ["hidden", "adam"]


def test_an_empty_group_keeps_its_index_and_one_without_a_kind_is_refused():
    params, groups = mixed()
    opt = Muon([groups[0], {"params": [], "kind": "adam"}, groups[1]])
    assert [len(g["params"]) for g in opt.param_groups] == [2, 0, 2]
    with pytest.raises(ValueError, match="param group 1 has no 'kind' and no parameters"):
        Muon([groups[0], {"params": []}])


def test_a_set_of_parameters_is_refused_as_torch_does():
    with pytest.raises(TypeError, match="params is a set, whose order changes between runs"):
        Muon({torch.zeros(3, 3)})
    with pytest.raises(TypeError, match="ordered collections"):
        Muon([{"params": {torch.zeros(3, 3)}, "kind": "hidden"}])


# ---- schedulers that cycle momentum ------------------------------------------------------------


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: OneCycleLR(opt, max_lr=0.05, total_steps=6, base_momentum=0.8, max_momentum=0.95),
    lambda opt: CyclicLR(opt, base_lr=0.001, max_lr=0.05, step_size_up=2, base_momentum=0.8,
                         max_momentum=0.95),
], ids=["OneCycleLR", "CyclicLR"])
def test_cycled_momentum_drives_hidden_as_torch_muon_and_adam_as_adamw(make_scheduler):
    gen = seeded(1)
    init = [torch.randn(8, 12, generator=gen), torch.randn(12, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(4)]
    ours = [p.clone() for p in init]
    matrix, vector = init[0].clone(), init[1].clone()
    opt = Muon([{"params": [ours[0]], "kind": "hidden"}, {"params": [ours[1]], "kind": "adam"}],
               lr_scale="muon", weight_decay=0.0, adam_betas=(0.9, 0.99))
    theirs = [torch.optim.Muon([matrix], weight_decay=0.0), torch.optim.AdamW([vector], betas=(0.9, 0.99),
                                                                                weight_decay=0.0)]
    schedulers = [make_scheduler(o) for o in (opt, *theirs)]
    momenta = []
    for g in grads:
        step_with(opt, ours, g)
        step_with(theirs[0], [matrix], g[:1])
        step_with(theirs[1], [vector], g[1:])
        for scheduler in schedulers:
            scheduler.step()
        momenta.append(opt.param_groups[0]["momentum"])
        assert opt.param_groups[1]["momentum"] == theirs[1].param_groups[0]["betas"][0]
    assert len(set(momenta)) > 1  # it did cycle
    # The momentum and Adam's first moment are the same float32 lerps as torch's: bitwise.
    assert torch.equal(opt.state[ours[0]]["momentum_buffer"], theirs[0].state[matrix]["momentum_buffer"])
    assert torch.equal(opt.state[ours[1]]["exp_avg"], theirs[1].state[vector]["exp_avg"])


@pytest.mark.parametrize("lr_scale, adjust_lr_fn", [("muon", "original"), ("rms", "match_rms_adamw")])
def test_the_readmes_lr_scale_for_each_adjust_lr_fn_steps_as_torch_muon(lr_scale, adjust_lr_fn):
    gen = seeded(9)
    init = [torch.randn(8, 32, generator=gen), torch.randn(32, 8, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in init]
    ours, theirs = [p.clone() for p in init], [p.clone() for p in init]
    step_with(Muon(ours, lr_scale=lr_scale, ns_dtype=torch.bfloat16), ours, grads)
    step_with(torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, adjust_lr_fn=adjust_lr_fn), theirs, grads)
    for p0, a, b in zip(init, ours, theirs, strict=True):
        # Both orthogonalize in bf16, rounding the normalization differently: bf16 Newton–Schulz accuracy.
        assert torch.linalg.norm((a - p0) - (b - p0)) / torch.linalg.norm(b - p0) < 5e-2


def test_adam_groups_take_adam_betas_first_as_their_momentum_unless_given():
    params, groups = mixed()
    opt = Muon([groups[0], groups[1], {"params": [torch.zeros(3)], "momentum": 0.5}], adam_betas=(0.8, 0.9))
    assert [(g["momentum"], g["beta2"]) for g in opt.param_groups] == [(0.95, 0.9), (0.8, 0.9), (0.5, 0.9)]


# ---- checks at construction and in add_param_group ---------------------------------------------


BAD = [
    ("lr", -0.1, r"lr=-0.1; expected a number ≥ 0"),
    ("lr", "0.1", r"lr='0.1'; expected a number"),
    ("momentum", 1.5, r"momentum=1.5; expected a number in \[0, 1\)"),
    ("momentum", -0.1, r"momentum=-0.1"),
    ("momentum", float("nan"), r"momentum=nan"),
    ("beta2", 1.0, r"beta2=1.0; expected a number in \[0, 1\)"),
    ("eps", -1e-8, r"eps=-1e-08; expected a number ≥ 0"),
    ("weight_decay", -0.1, r"weight_decay=-0.1"),
    ("ns_steps", 0, r"ns_steps=0; expected a number ≥ 1"),
    ("ns_steps", 2.5, r"ns_steps=2.5; expected an integer ≥ 1"),
    ("nesterov", "yes", r"nesterov='yes'; expected True or False"),
    ("lr_scale", "mup", r"unknown lr_scale 'mup'"),
    ("ns_dtype", torch.int8, r"ns_dtype=torch.int8; expected None or a floating torch.dtype"),
    ("ns_coefficients", "septic", r"unknown Newton–Schulz coefficients 'septic'"),
]


@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_a_bad_hyper_parameter_raises_value_error_at_construction_and_in_add_param_group(key, value, message):
    matrix = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [matrix], "kind": "hidden", key: value}])
    opt = Muon([{"params": [matrix], "kind": "hidden"}])
    with pytest.raises(ValueError, match=f"param group 1: {message}"):
        opt.add_param_group({"params": [torch.zeros(4, 4)], "kind": "hidden", key: value})
    assert len(opt.param_groups) == 1  # a refused group is not added
    argument = {"beta2": None, "eps": "adam_eps"}.get(key, key)  # the constructor's name for it
    if argument is not None:
        with pytest.raises(ValueError, match=message):
            Muon([matrix], **{argument: value})


def test_bad_adam_betas_raise_value_error():
    with pytest.raises(ValueError, match=r"adam_betas\[0\]=1.2; expected a number in \[0, 1\)"):
        Muon([torch.zeros(4, 4)], adam_betas=(1.2, 0.9))
    with pytest.raises(ValueError, match=r"adam_betas=0.9; expected a pair"):
        Muon([torch.zeros(4, 4)], adam_betas=0.9)


@pytest.mark.parametrize("key, hint", [("weight_deacy", ""), ("maximize", r" \(minimize the negated loss\)"),
                                       ("betas", r" \(Adam's β₁ is momentum, β₂ is beta2\)")])
def test_an_unknown_group_key_is_refused_naming_the_known_ones(key, hint):
    with pytest.raises(ValueError, match=rf"unknown param-group key '{key}'{hint}; the known ones are "
                                         r"\('params', .*'weight_decay'.*\)"):
        Muon([{"params": [torch.zeros(3)], "kind": "adam", key: 0.1}])


# ---- parameters ---------------------------------------------------------------------------------


def test_a_stack_of_matrices_is_hidden_and_each_matrix_is_mapped_alone():
    g = torch.randn(3, 8, 12, generator=seeded(2))
    stack = torch.zeros(3, 8, 12)
    opt = Muon([{"params": [stack], "kind": "hidden"}], lr=1.0, momentum=0.0, lr_scale="spectral",
               ns_dtype=F32)
    step_with(opt, [stack], [g])
    for i in range(3):
        expected = -(8 / 12) ** 0.5 * orthogonalize(g[i], dtype=F32)
        torch.testing.assert_close(stack[i], expected, rtol=0, atol=1e-6)  # float32 round-off


@pytest.mark.parametrize("tensor, message", [
    (torch.zeros(4, 2, 3, 3), r"shape \(4, 2, 3, 3\) can't be kind 'hidden' \(it needs 2 to 3 dims\).*"
                              r"a 4-D conv weight is kind 'conv'"),
    (torch.zeros(4, 4, dtype=torch.complex64), r"shape \(4, 4\) is complex.*view_as_real"),
    (torch.zeros(4, 4).to_sparse(), r"shape \(4, 4\) is torch.sparse_coo; Muon steps dense tensors"),
    (torch.zeros(0, 8), r"shape \(0, 8\) has no elements"),
], ids=["4-D", "complex", "sparse", "size-0"])
def test_a_tensor_muon_cannot_step_is_refused_at_construction(tensor, message):
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [tensor], "kind": "hidden"}])


def test_a_sparse_gradient_is_refused_at_step():
    table = nn.Embedding(10, 4, sparse=True)
    opt = Muon([{"params": [table.weight], "kind": "embed"}])
    table(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"torch.sparse_coo gradient.*nn.Embedding with sparse=False"):
        opt.step()


# ---- copies and state dicts ---------------------------------------------------------------------


def stepped(seed: int = 3, steps: int = 2) -> tuple[list[torch.Tensor], Muon]:
    params, groups = mixed(seed)
    opt = Muon(groups, weight_decay=0.1)
    gen = seeded(seed + 100)
    for _ in range(steps):
        step_with(opt, params, [torch.randn(p.shape, generator=gen) for p in params])
    return params, opt


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda opt: pickle.loads(pickle.dumps(opt))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_steps_as_the_original(clone):
    params, opt = stepped()
    twin = clone(opt)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    grads = [torch.randn(p.shape, generator=seeded(4)) for p in params]
    step_with(opt, params, grads)
    step_with(twin, twin_params, grads)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params, strict=True))
    assert twin.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    twin.load_state_dict(opt.state_dict())  # the copy still takes the original's state


def test_torchs_checkpoint_helpers_round_trip():
    # The Adam group steps every other step: after 3 steps it rests, and its gradient travels too.
    torch.manual_seed(5)
    models = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [Muon([g | dict(step_every=2) if g["kind"] == "adam" else g for g in param_groups(model)],
                 weight_decay=0.1) for model in models]
    x = torch.randn(4, 6)
    for _ in range(3):
        models[0](x).square().sum().backward()
        opts[0].step()
        opts[0].zero_grad()
    models[1].load_state_dict(models[0].state_dict())
    set_optimizer_state_dict(models[1], opts[1], get_optimizer_state_dict(models[0], opts[0]))
    for model, opt in zip(models, opts, strict=True):
        model(x).square().sum().backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True))


def test_a_state_dict_with_a_coefficients_object_loads_with_weights_only():
    custom = Coefficients(((3.0, -3.2, 1.2),))
    opt = Muon([{"params": [torch.zeros(4, 4)], "kind": "hidden", "ns_coefficients": COEFFICIENTS["muon"]},
                {"params": [torch.zeros(4, 4)], "kind": "hidden", "ns_coefficients": custom}])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert [g["ns_coefficients"] for g in loaded["param_groups"]] == ["muon", ((3.0, -3.2, 1.2),)]
    with pytest.raises(ValueError, match="has its own scale or eps"):
        Muon([torch.zeros(4, 4)], ns_coefficients=Coefficients(((3.0, -3.2, 1.2),), scale=1.1))


def test_a_state_dict_from_before_beta2_is_refused_naming_the_missing_key():
    params, opt = stepped()
    saved = opt.state_dict()
    saved["param_groups"][1] = {k: v for k, v in saved["param_groups"][1].items() if k != "beta2"}
    with pytest.raises(ValueError, match=r"saved param group 1 lacks \['beta2'\]"):
        stepped()[1].load_state_dict(saved)


# ---- several processes: one spawn of 2 gloo ranks for every scenario ----------------------------


def refusal(action) -> str | None:
    try:
        action()
    except (RuntimeError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def habits_on_two_ranks(rank: int, world_size: int, tmp) -> None:
    """torch habits that would make the ranks disagree: each is refused on every rank alike, and the
    ranks then still step together."""
    init_gloo(rank, world_size, tmp / "store")
    matrix, vector = torch.randn(8, 12, generator=seeded(6)), torch.randn(12, generator=seeded(7))
    params = [matrix.requires_grad_(), vector.requires_grad_()]
    opt = Muon([{"params": [matrix], "kind": "hidden"}, {"params": [vector], "kind": "adam"}])
    x = torch.randn(4, 8, generator=seeded(8 + rank))  # each rank its own batch

    def loss(scale: float = 1.0) -> torch.Tensor:
        return (x @ matrix + vector).square().sum() * scale

    record = {}
    loss().backward()  # outside sync_gradients(): step() would send p.grad as it is then
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # by this rank's own norm
    record["clip"] = refusal(opt.step)
    opt.discard_gradients()
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    scaler.scale(loss(float("inf") if rank == 1 else 1.0)).backward()  # an inf on rank 1 only
    record["scaler"] = refusal(lambda: scaler.step(opt))
    opt.discard_gradients()
    record["deepcopy"] = refusal(lambda: copy.deepcopy(opt))
    record["pickle"] = refusal(lambda: pickle.dumps(opt))
    with opt.sync_gradients():
        loss().backward()
    opt.step()
    record["matrix"] = matrix.detach().clone()
    opt.close()
    dist.destroy_process_group()
    torch.save(record, tmp / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("contracts")
    spawn(habits_on_two_ranks, 2, tmp)
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(2)]


def test_torchs_clip_grad_norm_outside_sync_gradients_is_refused_on_every_rank(two_ranks):
    for record in two_ranks:
        assert record["clip"].startswith("RuntimeError: Muon: the gradient of a parameter of shape")
        assert "changed between backward and step()" in record["clip"]
        assert "optimizer.clip_grad_norm_()" in record["clip"]


def test_a_grad_scaler_with_an_inf_on_one_rank_is_refused_on_every_rank(two_ranks):
    for record in two_ranks:
        assert record["scaler"].startswith("RuntimeError: Muon: torch.amp.GradScaler with several processes")


def test_a_distributed_muon_refuses_to_be_copied(two_ranks):
    for record in two_ranks:
        for how in ("deepcopy", "pickle"):
            assert record[how].startswith("TypeError: Muon: a distributed optimizer can't be copied")


def test_after_the_refusals_the_ranks_still_step_together(two_ranks):
    # The refused steps were discarded on both ranks; the next one averaged both ranks' gradients.
    assert not torch.equal(two_ranks[0]["matrix"], torch.randn(8, 12, generator=seeded(6)))
    assert torch.equal(two_ranks[0]["matrix"], two_ranks[1]["matrix"])
