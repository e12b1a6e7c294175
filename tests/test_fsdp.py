"""Muon on FSDP2 (fully_shard) parameters, on CPU gloo processes (W = 2, 3): a tiny GPT trains as one
process does, each rank holds 1/W of the parameters and optimizer state and orthogonalizes 1/W of the
matrices, and torch.distributed.checkpoint resumes it bitwise on the same W and closely on another.

One set of 3 processes runs every scenario (start-up is most of the cost): first W = 2 on two of them,
then W = 3, which also resumes W = 2's checkpoint. Each test reads one scenario's record.
"""

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from test_distributed import TORCHRUN, counting_host_reads, init_gloo, losses, run_command, spawn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

import optim.kinds
from bench.memory import fully_sharded, speedrun_groups
from model import GPT, GPTConfig
from optim import Muon, orthogonalize, param_groups
from training.checkpoint import load_model
from training.fsdp import mixed_precision_policy
from training.sampling import Sampling, sample

# The demo's architecture made tiny; every matrix dim divisible by 2 and 3, so rows split evenly and only
# the 2-element scalar vectors (lambdas, skip weights) split unevenly at W = 3. Values scaled in every
# block, as the GPU presets do: every parameter gets a gradient, hence optimizer state.
CFG = GPTConfig(vocab_size=60, n_layer=4, n_head=2, head_dim=12, dim=24, max_seq_len=32, value_embeds=1,
                value_lambda_all_layers=True)
BATCH, SEQ_LEN, STEPS, SAVED_AT = 6, 16, 10, 5  # 6 sequences a step: each of W ranks takes 6/W
# Float32 Newton–Schulz, so that only the ranks' summation order separates the runs; Adam's eps near its
# gradients' size, so that a wrong average (every other map is scale-invariant) would show.
HYPER = dict(ns_dtype=torch.float32, adam_eps=1e-3)
LRS = dict(hidden=0.05, embed=0.05, head=0.01, scalar=0.04)
# gloo sums the ranks' gradients in another order than one process's backward does; Newton–Schulz
# carries the last-bit difference through 10 steps. Measured ≤ 4.8e-7 at W = 2 and 3, and between 2
# ranks and 3 resumed from 2's checkpoint. Orthogonalizing each rank's rows instead of whole matrices
# moves the losses by 1.6e-5 at step 3 and up to 4.0e-4 by step 10 (W = 2).
LOSS_TOLERANCE = 2e-6


# Every kind on shards of uneven rows: 5 rows split 3 + 2 and 2 + 2 + 1, 2 rows 1 + 1 + 0 at W = 3;
# stacks of 4 matrices and of 1 (fewer than W), conv, a Linear head, rows for embed and the sign head.
EVERY_KIND = {
    "hidden": [(5, 7)] * 4 + [(2, 4)],
    "conv": [(5, 2, 3, 3)] * 2,
    "head_linear": [(7, 5)],
    "embed": [(5, 4)],
    "head_sign": [(4, 3)],
    "adam": [(5,), (3, 2)],
}
KIND_STEPS, CLIPPED_AT, CLIP = 3, 1, 2.0  # below step 1's averaged-gradient norm (14 at W = 2, 12 at 3)
# Decoupled weight decay (cautious on the hidden group) applied to shards: their masks are elementwise.
KIND_HYPER = dict(lr=0.05, momentum=0.9, weight_decay=0.1, adam_eps=0.1, ns_dtype=torch.float32)
# gloo's summation order, through 5 float32 Newton–Schulz iterations a step: measured 1.2e-7 at W = 2,
# 2.4e-7 at W = 3. Without the all-reduce of the clipping norm's squares: 9e-3.
KIND_ATOL = 5e-7


class EveryKind(nn.Module):
    """One parameter per shape of EVERY_KIND; the loss Σ ⟨p, w⟩ makes each rank's gradient its w."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.kinds = nn.ModuleDict({kind: nn.ParameterList(torch.randn(shape, generator=generator)
                                                           for shape in shapes)
                                    for kind, shapes in EVERY_KIND.items()})

    def forward(self, weights: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * w).sum() for p, w in zip(self.parameters(), weights, strict=True))

    def groups(self) -> list[dict]:
        return [{"params": list(params), "kind": kind, "cautious_wd": kind == "hidden"}
                for kind, params in self.kinds.items()]


def rank_gradients(step: int, rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(s, generator=generator) for shapes in EVERY_KIND.values() for s in shapes]


def every_kind_steps(mesh: DeviceMesh | None, world_size: int) -> list[list[torch.Tensor]]:
    """KIND_STEPS steps, clipped at CLIPPED_AT; the parameters after each. mesh None: one process on the
    gradients averaged over world_size ranks, clipped by torch.nn.utils.clip_grad_norm_."""
    module = EveryKind()
    if mesh is not None:
        fully_shard(module, mesh=mesh)
    opt = Muon(module.groups(), **KIND_HYPER)
    history = []
    for step in range(KIND_STEPS):
        if mesh is None:
            ranks = [rank_gradients(step, r) for r in range(world_size)]
            for p, *grads in zip(module.parameters(), *ranks, strict=True):
                p.grad = sum(grads) / world_size
            if step == CLIPPED_AT:
                torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        else:
            module(rank_gradients(step, mesh.get_local_rank())).backward()
            if step == CLIPPED_AT:
                opt.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append([p.detach().clone() if mesh is None else p.full_tensor() for p in module.parameters()])
    return history


def batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, CFG.vocab_size, (BATCH, SEQ_LEN + 1), generator=generator)


def build(seed: int, mesh: DeviceMesh | None) -> tuple[GPT, Muon]:
    """The tiny GPT from `seed`, every block and the model fully_shard-ed over `mesh` (None: one process)."""
    torch.manual_seed(seed)
    model = GPT(CFG)
    if mesh is not None:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, Muon(param_groups(model, lrs=LRS), **HYPER)


def train(model: GPT, opt: Muon, steps: range, mesh: DeviceMesh | None) -> list[float]:
    """Each step on this rank's rows of the batch; returns the loss averaged over ranks."""
    rank, world_size = (0, 1) if mesh is None else (mesh.get_local_rank(), mesh.size())
    losses = []
    for step in steps:
        tokens = batch(step).chunk(world_size)[rank]
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mesh is not None:
            loss = loss.detach()
            dist.all_reduce(loss, group=mesh.get_group())
            loss /= world_size
        losses.append(loss.item())
    return losses


def train_with_a_halved_lr(model: GPT, opt: Muon, mesh: DeviceMesh | None) -> list[float]:
    """Steps 1 to SAVED_AT, halving every group's lr before the last (as a schedule would set it)."""
    losses = train(model, opt, range(SAVED_AT - 1), mesh)
    for group in opt.param_groups:
        group["lr"] /= 2
    return losses + train(model, opt, range(SAVED_AT - 1, SAVED_AT), mesh)


def train_to_the_end(model: GPT, opt: Muon, mesh: DeviceMesh | None) -> tuple[list[float], int]:
    """Steps SAVED_AT + 1 to STEPS, the last counting the matrices this rank puts through Newton–Schulz."""
    losses, matrices = train(model, opt, range(SAVED_AT, STEPS - 1), mesh), []

    def counted(G, **kwargs):
        matrices.append(math.prod(G.shape[:-2]))  # a stack of (…, m, n) matrices
        return orthogonalize(G, **kwargs)

    with mock.patch.object(optim.kinds, "orthogonalize", counted):
        losses += train(model, opt, range(STEPS - 1, STEPS), mesh)
    return losses, sum(matrices)


def held_bytes(model: GPT, opt: Muon) -> dict[str, int]:
    """Bytes of the parameters and optimizer state this process holds (a rank's shards under FSDP)."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    state = [v for entry in opt.state.values() for v in entry.values()]
    return dict(parameters=sum(p.numel() * p.element_size() for p in params),
                state=sum(v.numel() * v.element_size() for v in state))


def host_reads_in_a_step(model: GPT, opt: Muon) -> list[str]:
    tokens = batch(STEPS)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    with counting_host_reads([]) as reads:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return reads


def checkpoint(model: GPT, opt: Muon) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def resumed(directory: Path, mesh: DeviceMesh) -> dict:
    """A model from another seed, loaded from the checkpoint, trained from SAVED_AT to STEPS."""
    model, opt = build(seed=1, mesh=mesh)
    state = checkpoint(model, opt)
    dcp.load(state, checkpoint_id=directory, process_group=mesh.get_group())
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    lrs = [group["lr"] for group in opt.param_groups]
    return dict(losses=train(model, opt, range(SAVED_AT, STEPS), mesh), lrs=lrs)


def refusal(build_optimizer) -> str | None:
    try:
        build_optimizer()
    except ValueError as error:
        return str(error)
    return None


def scenarios(mesh: DeviceMesh, tmp: Path) -> dict:
    """Train, saving at SAVED_AT; resume that checkpoint (and, on 3 ranks, 2 ranks'); misuse."""
    world_size = mesh.size()
    model, opt = build(seed=0, mesh=mesh)
    losses = train_with_a_halved_lr(model, opt, mesh)
    dcp.save(checkpoint(model, opt), checkpoint_id=tmp / f"checkpoint{world_size}",
             process_group=mesh.get_group())
    later, ns_matrices = train_to_the_end(model, opt, mesh)
    record = dict(losses=losses + later, ns_matrices=ns_matrices, held=held_bytes(model, opt),
                  lrs=[group["lr"] for group in opt.param_groups])
    record["host_reads"] = host_reads_in_a_step(model, opt)
    record["every_kind"] = every_kind_steps(mesh, world_size)
    record["resumed"] = resumed(tmp / f"checkpoint{world_size}", mesh)
    if world_size == 3:
        record["resumed_from_2"] = resumed(tmp / "checkpoint2", mesh)
    plain = torch.nn.Parameter(torch.zeros(4, 4))
    record["mixed_error"] = refusal(lambda: Muon([*model.parameters(), plain]))
    record["no_group_error"] = refusal(lambda: Muon(param_groups(model), process_group=None))
    record["later_error"] = refusal(lambda: Muon([{"params": [plain]}, {"params": list(model.parameters())}],
                                                 process_group=mesh.get_group()))
    matrix = next(p for p in model.parameters() if p.ndim == 2)
    stepwise = dict(params=[matrix], kind="hidden", step_rounding="stepwise")
    record["stepwise_error"] = refusal(lambda: Muon([stepwise], process_group=mesh.get_group()))
    opt.close()
    return record


def every_scenario(rank: int, world_size: int, tmp: Path) -> None:
    """W = 2 on ranks 0 and 1 (rank 2 waits), then W = 3 on all three: one start-up for both."""
    init_gloo(rank, world_size, tmp / "store")
    pair = dist.new_group([0, 1])  # a collective over every rank
    records = {}
    if rank < 2:
        records[2] = scenarios(DeviceMesh.from_group(pair, "cpu"), tmp)
    dist.barrier()  # 2 ranks' checkpoint is on disk
    records[3] = scenarios(init_device_mesh("cpu", (world_size,)), tmp)
    dist.destroy_process_group()
    torch.save(records, tmp / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """W → each rank's record."""
    tmp = tmp_path_factory.mktemp("fsdp")
    spawn(every_scenario, 3, tmp)
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(3)]
    return {w: [records[w] for records in ranks if w in records] for w in (2, 3)}


@pytest.fixture(scope="module")
def one_process() -> dict:
    model, opt = build(seed=0, mesh=None)
    losses = train_with_a_halved_lr(model, opt, None)
    later, ns_matrices = train_to_the_end(model, opt, None)
    return dict(losses=losses + later, ns_matrices=ns_matrices, held=held_bytes(model, opt), model=model,
                step_counts=sum("step" in entry for entry in opt.state.values()))


WORLD_SIZES = pytest.mark.parametrize("world_size", [2, 3], ids=lambda w: f"W={w}")


@WORLD_SIZES
def test_training_follows_the_one_process_losses(runs, one_process, world_size):
    for rank, record in enumerate(runs[world_size]):
        assert len(record["losses"]) == STEPS
        expected = pytest.approx(one_process["losses"], rel=0, abs=LOSS_TOLERANCE)
        assert record["losses"] == expected, f"rank {rank}"


@WORLD_SIZES
def test_every_kind_on_uneven_shards_steps_as_one_process_on_the_averaged_gradient(runs, world_size):
    expected = every_kind_steps(None, world_size)
    for rank, record in enumerate(runs[world_size]):
        for step, (got, want) in enumerate(zip(record["every_kind"], expected, strict=True)):
            for i, (p, q) in enumerate(zip(got, want, strict=True)):
                where = f"rank {rank} step {step} parameter {i}"
                torch.testing.assert_close(p, q, rtol=0, atol=KIND_ATOL, msg=lambda m, at=where: f"{at}: {m}")


@WORLD_SIZES
def test_each_rank_holds_a_wth_of_the_parameters_and_optimizer_state(runs, one_process, world_size):
    total = one_process["held"]
    per_rank = [record["held"] for record in runs[world_size]]
    # Nothing is held twice: the shards add up to the one-process bytes, but for Adam's step counts
    # (one 4-byte float per Adam parameter with state, kept on every rank).
    assert sum(held["parameters"] for held in per_rank) == total["parameters"]
    replicated_steps = (world_size - 1) * 4 * one_process["step_counts"]
    assert sum(held["state"] for held in per_rank) == total["state"] + replicated_steps
    # Rows split evenly but for the 2-element scalar vectors at W = 3 (measured ≤ 1.0008 of a W-th) and
    # the merged q, k, v weights (3, d_out, d_in), split on dim 0 by whole matrices: ⌈3/W⌉ of 3 on a
    # rank (with their float32 momentum: 8 bytes an element).
    stacked = 8 * sum(p.numel() for p in one_process["model"].parameters() if p.ndim == 3)
    for held in per_rank:
        bound = 1.01 * (sum(total.values()) - stacked) / world_size + stacked * math.ceil(3 / world_size) / 3
        assert held["parameters"] + held["state"] <= bound


@WORLD_SIZES
def test_the_memory_table_predicts_each_ranks_parameter_and_state_bytes(runs, one_process, world_size):
    groups = speedrun_groups(one_process["model"], embed_map="dual")  # the groups build() gives Muon
    for rank, record in enumerate(runs[world_size]):
        predicted = fully_sharded(one_process["model"], groups, world_size, rank)
        assert (predicted["parameters"], predicted["optimizer"]) == tuple(record["held"].values())


@WORLD_SIZES
def test_each_rank_orthogonalizes_a_wth_of_the_matrices(runs, one_process, world_size):
    counts = [record["ns_matrices"] for record in runs[world_size]]
    assert sum(counts) == one_process["ns_matrices"] == 6 * CFG.n_layer  # q, k, v, o, fc, proj
    # dealt round-robin across stacks by parameter; the merged qkv parameter holds 3 matrices
    assert max(counts) - min(counts) <= 3


@WORLD_SIZES
def test_a_step_reads_nothing_on_the_host(runs, world_size):
    for record in runs[world_size]:
        assert record["host_reads"] == []


@WORLD_SIZES
def test_a_checkpoint_resumes_bitwise_on_the_same_number_of_ranks(runs, world_size):
    for record in runs[world_size]:
        assert record["resumed"]["losses"] == record["losses"][SAVED_AT:]
        assert record["resumed"]["lrs"] == record["lrs"]  # the halved lrs came back with the state


def test_a_checkpoint_of_two_ranks_resumes_on_three(runs):
    continued = runs[2][0]["losses"][SAVED_AT:]
    for record in runs[3]:
        # Two ranks' summation order against three's (measured 4.8e-7): the one-process tolerance.
        assert record["resumed_from_2"]["losses"] == pytest.approx(continued, rel=0, abs=LOSS_TOLERANCE)
        assert record["resumed_from_2"]["lrs"] == record["lrs"]


@WORLD_SIZES
def test_plain_tensors_mixed_with_sharded_ones_and_a_process_group_are_refused(runs, world_size):
    record = runs[world_size][0]
    assert "plain tensor among DTensors" in record["mixed_error"]
    assert "process_group=None with DTensor" in record["no_group_error"]
    assert "a DTensor among plain ones" in record["later_error"]
    assert "step_rounding='stepwise' on kind 'hidden' with fully_shard" in record["stepwise_error"]


def test_fsdp_computes_in_bf16_and_reduces_gradients_in_float32_on_cuda_only():
    cuda, cpu = mixed_precision_policy(torch.device("cuda")), mixed_precision_policy(torch.device("cpu"))
    assert (cuda.param_dtype, cuda.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert (cpu.param_dtype, cpu.reduce_dtype) == (None, None)  # the parameters' own float32: no casts


# ---- train_gpt.py --fsdp under torchrun ---------------------------------------------------------------

# The demo, 4 steps of 512 tokens (4 sequences of 64 per process, 2 a micro-batch), saving at step 2.
# Adam's eps near its gradients' size, so that the trajectory depends on the averaged gradient's scale
# (tests/test_distributed.py).
DEMO = ["--max-steps", "4", "--tokens-per-step", "512", "--seq-len", "64", "--batch-size", "2",
        "--log-every", "1", "--val-every", "0", "--val-tokens", "1024", "--val-seq-len", "64", "--no-plot",
        "--adam-eps", "1e-3"]
# The first --fsdp run also warms up (a step and a validation, then the state put back), saves at step
# 2 and samples at the end.
FIRST = ["--warmup-kernel-steps", "1", "--save-every", "2", "--sample-tokens", "4", "--sample-prompt", "The",
         "--seed", "0"]


def test_train_gpt_with_fsdp_follows_the_default_run_resumes_bitwise_and_samples(tmp_path):
    fsdp = [*TORCHRUN, "--nproc_per_node=2", "train_gpt.py", "--fsdp", *DEMO]
    one_process = [sys.executable, "train_gpt.py", *DEMO, "--sample-tokens", "0"]
    first = [[*one_process, "--out-dir", str(tmp_path / "one")],
             [*fsdp, *FIRST, "--out-dir", str(tmp_path / "fsdp")]]
    with ThreadPoolExecutor(2) as pool:  # side by side: the one-process run uses one core of two
        one, sharded = pool.map(lambda command: run_command(command, timeout=240), first)
    assert one.returncode == 0, one.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    step_2 = tmp_path / "fsdp" / "checkpoints" / "step_000002"
    resumed = run_command([*fsdp, "--sample-tokens", "0", "--resume", str(step_2),
                           "--out-dir", str(tmp_path / "resumed")], timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert [(step, key) for step, key, _ in got] == [(step, key) for step, key, _ in expected]
    for (step, key, want), (_, _, value) in zip(expected, got, strict=True):
        # Same tokens, same averaged gradient: only the summation order differs (gloo's reduce-scatter
        # of 2 processes' halves of the batch), which Newton–Schulz carries on: measured ≤ 8.6e-6.
        assert value == pytest.approx(want, abs=5e-5), f"step {step} {key}"
    # The first run warmed up a step and a validation first, then put the state back: that too must
    # leave its losses on the default run's. The resumed run, from step 2, has no warm-up.
    assert losses(tmp_path / "resumed") == got[2:]  # steps 3, 4 and the validation: bitwise
    # load_model reads an --fsdp checkpoint in one process, and writes what the run wrote after step 4.
    model = load_model(tmp_path / "fsdp" / "checkpoints" / "step_000004")
    assert f"sample: {sample(model, 'The', 4, Sampling(seed=0))}" in sharded.stdout
