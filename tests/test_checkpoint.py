"""training.checkpoint: a kill -9 mid-save keeps the previous checkpoint and an exact resume, saving refuses
NaN/inf, and every bad checkpoint or folder is a one-line CheckpointError.

Run as a script (`python tests/test_checkpoint.py DIR POINT`) it is the child the kill test kills.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    non_finite_tensors,
    read_step,
    resolve_checkpoint,
    save_checkpoint,
    write_step,
)
from training.state import RunState

ROOT = Path(__file__).resolve().parents[1]


# ---- a tiny training run whose whole state is checkpointed ------------------------------------------


def tiny_run() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def states(model, optimizer, step: int) -> tuple[dict, dict]:
    """(shared, per_rank) as train_gpt.py splits them."""
    return dict(model=model.state_dict(), step=step), dict(optimizer=optimizer.state_dict())


def tensors(state, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, tuple | dict):
        state = dict(enumerate(state)) if isinstance(state, tuple) else state
        return {k: v for key, value in state.items() for k, v in tensors(value, f"{prefix}.{key}").items()}
    return {}


def saved(directory: Path, steps: int = 1) -> Path:
    """A checkpoint directory after `steps` steps, one save per step."""
    model, optimizer = tiny_run()
    for step in range(steps):
        train_step(model, optimizer, step)
        write_step(directory, step + 1, *states(model, optimizer, step + 1))
    return directory


# ---- the interface: a RunState in, the same RunState out ---------------------------------------------


class Position:
    """A loader's position, as RunState keeps it (state_dict / load_state_dict)."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_save_then_load_restores_the_run_and_returns_the_plan_it_was_saved_with(tmp_path):
    model, optimizer = tiny_run()
    run = RunState(model, optimizer, Position(96))
    train_step(model, optimizer, 0)
    run.step, run.train_time = 1, 2.5
    plan = dict(model_config={"dim": 8}, config={"lr": 0.1}, data="0123abcd")
    step = save_checkpoint(run, tmp_path / "checkpoints", **plan)
    assert step == tmp_path / "checkpoints" / "step_000001"
    shared, own = read_step(step)
    assert sorted(own) == ["optimizer", "rng"]  # each rank's own; the rest is rank 0's shared part
    assert sorted(shared) == ["config", "data", "loader", "model", "model_config", "step", "train_time",
                              "world_size"] and shared["world_size"] == 1

    fresh_model, fresh_optimizer = tiny_run()
    fresh = RunState(fresh_model, fresh_optimizer, Position())
    assert load_checkpoint(fresh, step, {"dim": 8}) == {"config": {"lr": 0.1}, "data": "0123abcd"}
    assert (fresh.step, fresh.train_time, fresh.loader.position) == (1, 2.5, 96)
    expected, got = tensors(run.state_dict()), tensors(fresh.state_dict())
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    with pytest.raises(SystemExit, match=r"saved for model \{'dim': 8\}, but this run builds \{'dim': 16\}"):
        load_checkpoint(fresh, step, {"dim": 16})


# ---- kill -9 during a real save ----------------------------------------------------------------------


class Stall:
    """Pickled inside torch.save, i.e. while a checkpoint file is open: report, then wait to be killed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        self.marker.write_text("writing")
        time.sleep(600)


def save_then_stall(directory: Path, point: str) -> None:
    """Save step 1, then start a second save that stalls at `point` until the parent kills us."""
    marker = directory.parent / "stalled"
    model, optimizer = tiny_run()
    train_step(model, optimizer, 0)
    shared, own = states(model, optimizer, 1)
    write_step(directory, 1, shared, own)
    if point == "same step":  # a signal right after a periodic save writes step 1 again
        real_replace = os.replace

        def stalling_replace(src, dst):
            if Path(src).name == "step_000001.tmp":  # step_000001 is already moved to .old
                Stall(marker).__reduce__()
            real_replace(src, dst)

        os.replace = stalling_replace
        write_step(directory, 1, shared, own)
    train_step(model, optimizer, 1)
    shared, own = states(model, optimizer, 2)
    if point == "rank file":
        own["stall"] = Stall(marker)
    else:
        shared["stall"] = Stall(marker)
    write_step(directory, 2, shared, own)


@pytest.mark.parametrize("point", ["rank file", "shared file", "same step"])
def test_kill_9_mid_save_keeps_the_previous_checkpoint_and_the_resume_is_exact(tmp_path, point):
    directory = tmp_path / "checkpoints"
    with open(tmp_path / "stderr", "w") as stderr:
        child = subprocess.Popen([sys.executable, __file__, str(directory), point], cwd=ROOT, stderr=stderr,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not (tmp_path / "stalled").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-2000:]
    unfinished = "step_000001.old" if point == "same step" else "step_000002.tmp"
    assert (directory / unfinished).is_dir()  # killed mid-save: the save's work is still lying there

    path = resolve_checkpoint("auto", directory)
    shared, own = read_step(path)
    assert shared["step"] == 1
    resumed, resumed_optimizer = tiny_run()
    resumed.load_state_dict(shared["model"])
    resumed_optimizer.load_state_dict(own["optimizer"])
    train_step(resumed, resumed_optimizer, 1)
    straight, straight_optimizer = tiny_run()
    train_step(straight, straight_optimizer, 0)
    train_step(straight, straight_optimizer, 1)
    expected = tensors(states(straight, straight_optimizer, 2))
    got = tensors(states(resumed, resumed_optimizer, 2))
    assert expected.keys() == got.keys() and len(got) == 4 + 4 * 3  # weights; AdamW: step, 2 moments
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name  # bitwise: same ops on the same CPU

    write_step(directory, 2, *states(resumed, resumed_optimizer, 2))  # the next save tidies up
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_000001", "step_000002"]


# ---- non-finite state is never saved -----------------------------------------------------------------


def test_non_finite_tensors_names_floating_tensors_with_nan_or_inf_in_order():
    state = {"model": {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])},
             "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("-inf")])}}},
             "rng": torch.tensor([255], dtype=torch.uint8), "lr": float("nan"), "betas": (torch.zeros(2),)}
    assert non_finite_tensors(state) == ["model.b", "optimizer.state.0.exp_avg"]
    assert non_finite_tensors(state["model"], "shared.") == ["shared.b"]
    assert non_finite_tensors({"x": torch.ones(2, dtype=torch.bfloat16)}) == []


def poison_a_weight(model, optimizer) -> None:
    with torch.no_grad():
        model[0].weight[2, 3] = float("nan")


def poison_a_moment(model, optimizer) -> None:
    optimizer.state[model[2].bias]["exp_avg_sq"][1] = float("inf")


@pytest.mark.parametrize("poison, first", [(poison_a_weight, "shared.model.0.weight"),
                                           (poison_a_moment, "rank0.optimizer.state.3.exp_avg_sq")])
def test_a_state_with_nan_or_inf_is_refused_and_the_last_good_checkpoint_stays(tmp_path, poison, first):
    directory = saved(tmp_path / "checkpoints")
    model, optimizer = tiny_run()
    train_step(model, optimizer, 0)
    poison(model, optimizer)
    with pytest.raises(CheckpointError) as caught:
        write_step(directory, 2, *states(model, optimizer, 2))
    assert str(caught.value) == (f"{directory}: refusing to save step 2: NaN or inf in 1 tensor "
                                 f"(the first: {first}); the last good checkpoint is still "
                                 f"{directory / 'step_000001'}")
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_000001"]


def refuse_on_every_rank(rank: int, world_size: int, tmp: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=world_size)
    moments = torch.tensor([0.0, float("inf") if rank == 1 else 0.0])  # only rank 1's shard is bad
    try:
        write_step(tmp / "checkpoints", 1, {"model": {"w": torch.ones(2)}}, {"m": moments})
    except CheckpointError as error:
        (tmp / f"rank{rank}.txt").write_text(str(error))
    if rank == 1:  # then rank 1's disk is full: every rank fails that save, none waits for the other
        torch.save = full_disk
    try:
        write_step(tmp / "checkpoints", 2, {"model": {"w": torch.ones(2)}}, {"m": torch.zeros(2)})
    except CheckpointError as error:
        (tmp / f"rank{rank}.full.txt").write_text(str(error))
    dist.destroy_process_group()


def full_disk(obj, f, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_one_ranks_non_finite_shard_makes_every_rank_refuse_without_a_hang(tmp_path):
    context = mp.start_processes(refuse_on_every_rank, args=(2, tmp_path), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 120 s")
    messages = {(tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    assert messages == {f"{tmp_path / 'checkpoints'}: refusing to save step 1: NaN or inf in 1 tensor "
                        f"(the first: rank1.m); no checkpoint was written"}
    assert not (tmp_path / "checkpoints" / "step_000001.tmp").exists()
    messages = {(tmp_path / f"rank{r}.full.txt").read_text() for r in range(2)}
    assert messages == {f"{tmp_path / 'checkpoints'}: cannot write step 2 (rank 1: No space left on device); "
                        f"no checkpoint was written"}
    assert not (tmp_path / "checkpoints" / "step_000002.tmp").exists()


@pytest.mark.parametrize("failure, reason", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    # what torch.save raises when the disk fills while it writes
    (RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                  "data/0: file write failed\n(a C++ backtrace)"),
     "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/0: file "
     "write failed"),
])
def test_a_full_disk_at_save_is_one_line_leaves_no_tmp_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                    failure, reason):
    directory = saved(tmp_path / "checkpoints")
    model, optimizer = tiny_run()

    def fill_the_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)  # part of a file, as a real full disk leaves
        raise failure

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(CheckpointError) as error:
        write_step(directory, 2, *states(model, optimizer, 2))
    assert one_line(error) == (f"{directory}: cannot write step 2 ({reason}); the last good checkpoint is "
                               f"still {directory / 'step_000001'}")
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_000001"]


# ---- every bad checkpoint is one line -----------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint(str(tmp_path / "nowhere"))
    assert one_line(caught).startswith(f"{tmp_path / 'nowhere'}: no such file or directory; expected a step "
                                       f"directory holding shared.pt, or a checkpoint directory")


def test_truncated_shared_file(tmp_path):
    step = saved(tmp_path) / "step_000001"
    data = (step / "shared.pt").read_bytes()
    (step / "shared.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as caught:
        read_step(resolve_checkpoint(str(tmp_path)))
    assert one_line(caught).startswith(f"{step / 'shared.pt'}: cannot be read (")
    assert str(caught.value).endswith("the checkpoint is damaged: resume from another step directory")


def test_garbage_rank_file(tmp_path):
    step = saved(tmp_path) / "step_000001"
    (step / "rank0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as caught:
        read_step(step)
    assert one_line(caught).startswith(f"{step / 'rank0.pt'}: cannot be read (")


def test_latest_naming_a_deleted_step_lists_the_steps_that_exist(tmp_path):
    saved(tmp_path, steps=2)
    shutil.rmtree(tmp_path / "step_000002")
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint("auto", tmp_path)
    assert one_line(caught) == (f"{tmp_path / 'latest'}: names step_000002, which is missing or incomplete; "
                                f"resume from a step directory that exists (step_000001)")


def test_latest_holding_something_else(tmp_path):
    saved(tmp_path)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="expected the name of a step directory .*'../../etc'"):
        resolve_checkpoint(str(tmp_path))


def test_checkpoint_of_another_world_size(tmp_path):
    step = saved(tmp_path) / "step_000001"
    with pytest.raises(CheckpointError) as caught:
        read_step(step, rank=1, world_size=2)
    assert one_line(caught) == (f"{step}: written by 1 process, this run has 2; resume with 1 process "
                                f"(each holds its own optimizer shard)")


def two_process_step(tmp_path: Path) -> Path:
    """A step directory as two processes leave it: shared.pt saying so, rank0.pt and rank1.pt."""
    step = saved(tmp_path) / "step_000001"
    shared = torch.load(step / "shared.pt", weights_only=False)
    torch.save({**shared, "world_size": 2}, step / "shared.pt")
    shutil.copyfile(step / "rank0.pt", step / "rank1.pt")
    return step


@pytest.mark.parametrize("missing", ["rank0.pt", "rank1.pt"])
def test_a_missing_rank_file_is_named_with_the_number_of_processes_that_wrote_the_step(tmp_path, missing):
    step = two_process_step(tmp_path)
    (step / missing).unlink()
    for world_size in (1, 2):  # whatever this run's size: the advice is not "resume with 1 process"
        with pytest.raises(CheckpointError) as caught:
            read_step(step, rank=0, world_size=world_size)
        assert one_line(caught) == (f"{step}: {missing} missing, of the 2 processes that wrote it; the "
                                    f"checkpoint is incomplete: resume from another step directory")


def test_a_step_without_a_recorded_size_counts_its_writers_by_the_highest_rank_file(tmp_path):
    step = saved(tmp_path) / "step_000001"
    (step / "rank0.pt").rename(step / "rank1.pt")
    with pytest.raises(CheckpointError, match="rank0.pt missing, of the 2 processes that wrote it"):
        read_step(step, rank=0, world_size=1)


def test_the_training_script_prints_one_line_for_a_bad_resume(tmp_path):
    missing = tmp_path / "nowhere"
    done = subprocess.run([sys.executable, "train_gpt.py", "--out-dir", str(tmp_path), "--max-steps", "1",
                           "--resume", str(missing)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: {missing}: no such file or directory; expected a step "
                                        f"directory holding shared.pt, or a checkpoint directory holding "
                                        f"`latest`"]


if __name__ == "__main__":
    save_then_stall(Path(sys.argv[1]), sys.argv[2])
