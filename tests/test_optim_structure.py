"""The optimizer step's structure, without a process group: its collectives
(optim.distributed.step_collectives) are 16-byte aligned, with has-a-gradient flags only under
unused_parameters=True and apart from the data there, its
allocations (optim.allocations) do not grow after the first step, and Adam's compiled update equals the
eager one without recompiling as lr is scheduled. The multi-process side (the step issues exactly
step_collectives' list; its allocations at W = 2, 3) is in tests/test_distributed.py."""

import pytest
import torch
from test_distributed import HYPER, problem
from torch._dynamo.testing import CompileCounterWithBackend

from bench.memory import meta_gpt, speedrun_groups
from model import PRESETS
from optim import Muon
from optim.allocations import count_allocations
from optim.distributed import step_collectives
from optim.update import adam_update
from optim.zero import ALIGNMENT, ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, aligned

# Shapes whose element counts are odd, in every dtype a parameter may have: unaligned unless padded.
ODD = {"hidden": [(3, 5)] * 5 + [(7, 3)], "embed": [(11, 3)], "head_sign": [(5, 7)],
       "adam": [(3,), (1,), (5, 1)]}


def odd_groups(dtype: torch.dtype) -> list[dict]:
    return [{"params": [torch.zeros(s, dtype=dtype, device="meta") for s in shapes], "kind": kind}
            for kind, shapes in ODD.items()]


@pytest.mark.parametrize("world_size", [2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_collective_is_16_byte_aligned_at_any_world_size(world_size, dtype):
    collectives = step_collectives(odd_groups(dtype), world_size, unused_parameters=True)
    assert collectives and all(c.bytes % ALIGNMENT == 0 for c in collectives)
    # The data travel in the parameters' dtype, the flags apart, as int32 counts.
    assert {c.dtype for c in collectives if c.op != ALL_REDUCE} == {dtype}
    assert {c.dtype for c in collectives if c.op == ALL_REDUCE} == {torch.int32}
    # By default no flag travels: the same collectives less the all-reduces.
    assert step_collectives(odd_groups(dtype), world_size) == [c for c in collectives if c.op != ALL_REDUCE]


def test_a_stack_travels_as_padded_matrices_and_its_flags_apart():
    # Five 3×5 float32 matrices at W = 2: 3 buckets of 2 rows of 15 → 16 elements (64 bytes), the
    # flags of 5 matrices as 8 int32 counts, and 3 matrices a rank gathered, each padded alike.
    hidden = step_collectives([{"params": [torch.zeros(3, 5)] * 5, "kind": "hidden"}], 2,
                              unused_parameters=True)
    assert [(c.op, c.elements, c.dtype) for c in hidden] == [(REDUCE_SCATTER, 16, torch.float32)] * 3 + [
        (ALL_REDUCE, 8, torch.int32), (ALL_GATHER, 48, torch.float32)]
    # 17 bf16 Adam elements at W = 3: ranges of 6, padded to 8 (16 bytes); no flag in them.
    adam = [{"params": [torch.zeros(17, dtype=torch.bfloat16)], "kind": "adam"}]
    flagged = step_collectives(adam, 3, unused_parameters=True)
    assert [(c.op, c.elements) for c in flagged] == [(REDUCE_SCATTER, 8), (ALL_REDUCE, 4), (ALL_GATHER, 8)]
    assert [(c.op, c.elements) for c in step_collectives(adam, 3)] == [(REDUCE_SCATTER, 8), (ALL_GATHER, 8)]


def test_the_speedrun_step_at_8_ranks_is_aligned():
    # The 124M speedrun step's chunks were 4·(768² + 1) = 2,359,300 bytes and 2·(38,633,472/8 + 1) =
    # 9,658,370 bytes with the flags inside; now every one is 16-byte aligned and holds data only.
    collectives = step_collectives(speedrun_groups(meta_gpt(PRESETS["124m"], fsdp=False), "adam"), 8)
    assert all(c.bytes % ALIGNMENT == 0 for c in collectives)
    scatters = {c.bytes for c in collectives if c.op == REDUCE_SCATTER}
    assert {4 * 768**2, 2 * 38_633_472 // 8} <= scatters


def test_a_group_without_a_kind_is_refused():
    with pytest.raises(ValueError, match="param group 0 has kind None"):
        step_collectives([{"params": [torch.zeros(2)]}], 2)
    assert step_collectives(odd_groups(torch.float32), 1) == []  # one process: no collectives


def test_aligned_rounds_up_to_16_bytes():
    assert [aligned(n, torch.float32) for n in (0, 1, 4, 5)] == [0, 4, 4, 8]
    assert [aligned(n, torch.bfloat16) for n in (1, 8, 9)] == [8, 8, 16]
    assert aligned(3, torch.float64) == 4


def test_allocations_count_new_storages_only():
    x, y = torch.zeros(4), torch.zeros(3)
    with count_allocations() as allocations:
        x.add_(1)  # in place
        x.view(2, 2)  # a view
        torch.add(x, 1, out=x)  # out=
        x + 1  # one
        torch._foreach_add([x, y], 1)  # two
        torch.empty(0)  # no bytes
    assert allocations.count == 3 and allocations.bytes == 4 * (4 + 4 + 3)
    assert allocations.by_op == {"add": 1, "_foreach_add": 2}


# One process, every kind (test_distributed.problem): the state and the eager update's temporaries.
# Measured: 168 at the first step (with the 24 state tensors made there), 144 after (122 before the
# problem held the two merged q, k, v parameters), Newton–Schulz's matmul outputs (compiled on CUDA) and
# the eager updates' temporaries.
ALLOCATIONS_AFTER_THE_FIRST_STEP = 144


def test_one_process_step_allocates_the_same_after_the_first():
    params, groups = problem()
    opt = Muon(groups, **HYPER)
    counts = []
    for step in range(4):
        for p in params:
            p.grad = torch.full_like(p, step + 1.0)
        opt.param_groups[0]["lr"] = 0.05 / (step + 1)
        with count_allocations() as allocations:
            opt.step()
        counts.append(allocations.count)
    assert counts[0] > counts[1] == counts[2] == counts[3] <= ALLOCATIONS_AFTER_THE_FIRST_STEP


# Muon's defaults
DEFAULT_ADAM_OPTIONS = dict(lr_mul=1.0, wd_form="decoupled", cautious_wd=False, eps_form="corrected",
                            state_dtype="float32", step_rounding="precise")


def adam_problem() -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen) for s in [(8,), (3, 4), (5, 6)]]
    tensors[2] = tensors[2].bfloat16()  # read and stored through float32 state, rounded once
    return tensors, [{} for _ in tensors]


@pytest.mark.parametrize("options", [DEFAULT_ADAM_OPTIONS,
                                     DEFAULT_ADAM_OPTIONS | dict(lr_mul=2.0, wd_form="in_update",
                                                                 cautious_wd=True, eps_form="raw"),
                                     DEFAULT_ADAM_OPTIONS | dict(eps_form="raw", state_dtype="bfloat16")],
                         ids=["decoupled", "cautious_in_update_raw_eps", "bf16_moments"])
def test_compiled_adam_equals_eager_in_one_graph_as_lr_changes(options):
    # The function compiled on CUDA (optim.update.adam_math), compiled here with inductor on the CPU.
    # Flags on: the distributed case, with one tensor no rank had a gradient for at the first step.
    # Parametrized: record #46's cautious in-update decay with lr_mul and the records' raw ε, compiled as
    # the default form is; and record #46's bf16 moments, rounded as stored inside the graph.
    counter = CompileCounterWithBackend("inductor")
    group = dict(weight_decay=0.1, momentum=0.8, beta2=0.95, eps=1e-3) | options
    eager, eager_states = adam_problem()
    compiled, compiled_states = adam_problem()
    for step in range(4):
        group["lr"] = 0.1 / (step + 1)  # scheduled: a 0-dim tensor input, so no recompile
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in eager]
        flags = torch.tensor([True, step > 0, True])
        adam_update(group, eager_states, eager, grads, flags, compile=False)
        adam_update(group, compiled_states, compiled, grads, flags, compile=counter)
    assert counter.frame_count == 1
    # Measured equal to the last bit on this CPU; inductor may fuse into FMAs elsewhere: float32 ulps.
    # bf16 moments: eager reads back the rounded stored moments, inductor's fused kernel keeps their
    # float32 values (no emulated casts), as the record's compiled DistAdam on the GPU: d differs by up
    # to a bf16 rounding of m and v (measured 5.9e-4 relative), which moves a bf16 parameter or v by one
    # bf16 step at most (measured 6.5e-3 relative: a step is 2^-8 to 2^-7 of the value).
    tol = dict(rtol=2**-7, atol=1e-7) if options["state_dtype"] == "bfloat16" else dict(rtol=1e-6, atol=1e-7)
    for got, want in zip(compiled + [s["exp_avg_sq"] for s in compiled_states],
                         eager + [s["exp_avg_sq"] for s in eager_states], strict=True):
        torch.testing.assert_close(got, want, **tol)
    assert not torch.equal(eager[1], adam_problem()[0][1])  # it moved, once flagged


def test_compiled_adam_steps_slices_of_parameters_as_a_rank_does():
    # A rank's pieces (optim/zero.py FlatShard): views into parameters, gradients viewing one received
    # buffer. Through AOT autograd's functionalization (aot_eager: the same graph inductor gets, unfused),
    # the writes land in the parameters and nowhere else.
    group = dict(lr=0.1, weight_decay=0.1, momentum=0.8, beta2=0.95, eps=1e-3) | DEFAULT_ADAM_OPTIONS
    gen = torch.Generator().manual_seed(1)
    base, received = torch.randn(2, 12, generator=gen), torch.randn(13, generator=gen)
    sent = received.clone()
    results = []
    for compile in (False, "aot_eager"):
        params = [base[0].clone(), base[1].clone().bfloat16()]
        tensors = [params[0][3:], params[1].view(-1, 4)[1:]]  # 9 elements, 2 rows of 4
        grads, states = [received[:9], received[9:].view(1, 4).expand(2, 4)], [{}, {}]
        for _ in range(2):
            adam_update(group, states, tensors, grads, torch.tensor([True, True]), compile=compile)
        results.append(params)
    (eager0, eager1), (compiled0, compiled1) = results
    torch.testing.assert_close(compiled0, eager0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled1, eager1, rtol=0, atol=0)
    assert torch.equal(compiled0[:3], base[0][:3]) and not torch.equal(compiled0[3:], base[0][3:])
    assert torch.equal(received, sent)  # gradients are read only
