"""optim.Muon with record #46's options, distributed (gloo, W = 2 and 3), steps as one process does on
the gradient averaged over ranks: NorMuon with the in-update cautious decay and lr_mul on the matrices,
one parameter viewed as a stack of square matrices (matrix_shape, the record's attention), and groups
stepped every other step (step_every = 2) on the sum of two steps' gradients. Only optim's public API.

The shapes and options follow record #46's groups at toy size (docs/MATH.md §4.7): its attention
tensor (d, 4d) viewed as four (d, d) matrices with NorMuon by columns; its c_fc with lr_mul 2 (ours
(4d, d), NorMuon by rows, the larger side); its gates (1 x g and heads x g, bf16 in the record; here
also stepped every other step, to cover a resting Newton–Schulz group, with the record's op order:
step_rounding "stepwise"); the Adam side with the
cautious decay and lr_mul, stepped on odd steps, and one Adam group with the record's bf16 moments
and its eager arithmetic (state_dtype "bfloat16", step_rounding "stepwise"). Two gates of one shape
share a stack, three attention tensors do too, so 2 and 3 ranks split the stacks unevenly.
"""

import copy
from pathlib import Path

import pytest
import torch
from test_distributed import init_gloo, spawn

from optim import Muon

F64 = torch.float64
D, G, HEADS = 8, 4, 3  # width, gate inputs, heads
STEPS = 5  # the step_every = 2 groups step at the 2nd and 4th call and rest on the 5th
RESUMED_AT = 3  # the distributed run saves and loads its state here, while those groups rest
DECAY = dict(wd_form="in_update", cautious_wd=True)
GROUPS = [  # (shapes, options) per param group
    ([(D, 4 * D)] * 3, dict(kind="hidden", matrix_shape=(D, D), normuon="column", **DECAY)),
    ([(4 * D, D), (D, 4 * D)], dict(kind="hidden", normuon="auto", lr_mul=2.0, **DECAY)),
    ([(1, G), (HEADS, G), (HEADS, G)], dict(kind="hidden", normuon="auto", step_every=2,
                                            step_rounding="stepwise", **DECAY)),
    ([(16, D), (5,), (3, 4)], dict(kind="adam", step_every=2, cautious_wd=True, lr_mul=3.0)),
    ([(6,)], dict(kind="adam", lr_mul=5.0, state_dtype="bfloat16", step_rounding="stepwise", **DECAY)),
]
RESTING = [options.get("step_every", 1) > 1 for shapes, options in GROUPS for _ in shapes]  # per parameter
# Adam's eps is near the gradients' size, so that Adam's step depends on the gradient's scale: every
# other map is scale-invariant, so only through it and the momentum would a wrong average show.
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1.2, ns_coefficients="polar_express_speedrun",
             ns_dtype=F64, lr_scale="muon", adam_betas=(0.65, 0.95), adam_eps=0.1, adam_eps_form="raw")
# float64 throughout: gloo sums the ranks' gradients in its own order, a resting group's gradients are
# summed over steps before ranks (one process: over ranks first), and NorMuon divides by the second
# moment of small entries (the 1 x 4 gate's), which amplifies that last-bit difference; in float32 it
# reached 5e-7. In float64: measured 2e-16 (W = 2) and 2e-15 (W = 3).
ATOL = 1e-12


def problem() -> tuple[list[torch.Tensor], list[dict]]:
    """The parameters (seeded, the same on every rank) and their param groups."""
    gen = torch.Generator().manual_seed(0)
    params, groups = [], []
    for shapes, options in GROUPS:
        group = [torch.randn(s, generator=gen, dtype=F64).mul_(0.5).requires_grad_() for s in shapes]
        params += group
        groups.append(dict(params=group, **options))
    return params, groups


def gradient(step: int, rank: int, index: int, shape) -> torch.Tensor:
    """Rank `rank`'s gradient of parameter `index` at `step`."""
    gen = torch.Generator().manual_seed(1000 * step + 100 * rank + index)
    return torch.randn(shape, generator=gen, dtype=F64)


def backward(params: list[torch.Tensor], gradients: list[torch.Tensor]) -> None:
    """p.grad += the given gradient, for every parameter, through autograd."""
    sum((p * g).sum() for p, g in zip(params, gradients, strict=True)).backward()


def steps(params: list[torch.Tensor], opt: Muon, gradients_at, sync,
          resumed: bool = False) -> list[list[torch.Tensor]]:
    """STEPS steps: backward (inside sync()), step(), zero_grad(); the parameters after each. `resumed`:
    before step RESUMED_AT, a resume's round trip: the state dict saved, every p.grad lost, the state
    loaded back."""
    history = []
    for step in range(STEPS):
        if resumed and step == RESUMED_AT:
            saved = copy.deepcopy(opt.state_dict())
            for p in params:
                p.grad = None
            opt.load_state_dict(saved)
        with sync():
            backward(params, gradients_at(step))
        opt.step()
        opt.zero_grad(set_to_none=True)  # keeps a resting group's gradients
        history.append([p.detach().clone() for p in params])
    return history


def worker(rank: int, world_size: int, tmp: Path) -> None:
    init_gloo(rank, world_size, tmp / "store")
    params, groups = problem()
    opt = Muon(groups, **HYPER)
    own = [(lambda s, i=i, p=p: gradient(s, rank, i, p.shape)) for i, p in enumerate(params)]
    history = steps(params, opt, lambda s: [g(s) for g in own], opt.sync_gradients, resumed=True)
    opt.close()
    torch.distributed.destroy_process_group()
    torch.save(history, tmp / f"rank{rank}.pt")


def one_process(world_size: int) -> list[list[torch.Tensor]]:
    """One process, each step's gradient the average of the ranks'."""
    params, groups = problem()
    opt = Muon(groups, process_group=None, **HYPER)

    def averaged(step: int) -> list[torch.Tensor]:
        return [sum(gradient(step, r, i, p.shape) for r in range(world_size)) / world_size
                for i, p in enumerate(params)]

    return steps(params, opt, averaged, opt.sync_gradients)


@pytest.mark.parametrize("world_size", [2, 3])
def test_record_46_options_step_distributed_as_one_process_on_the_averaged_gradient(world_size, tmp_path):
    spawn(worker, world_size, tmp_path)
    want = one_process(world_size)
    initial = problem()[0]
    for step, expected in enumerate(want):
        for i, p in enumerate(expected):
            moved = not torch.equal(p, want[step - 1][i] if step else initial[i])
            # the step_every = 2 groups move only at the 2nd and 4th step, every other group at each
            assert moved == (step % 2 == 1 or not RESTING[i]), f"step {step} param {i}"
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for step, (ps, qs) in enumerate(zip(got, want, strict=True)):
            for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
                where = f"W={world_size} rank {rank} step {step} param {i}"
                torch.testing.assert_close(p, q, rtol=0, atol=ATOL, msg=lambda m, at=where: f"{at}: {m}")
