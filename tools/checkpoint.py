"""Checkpoints that a crash cannot corrupt and that never hold NaN or inf, for one process or many.

Layout under a run's checkpoint directory:

    step_000120/shared.pt     rank 0: model weights, model config, train config, step, loader position,
                              world_size (the processes that wrote the step)
    step_000120/rank0.pt      every rank: its optimizer state (sharded under torchrun) and RNG states
    step_000120/rank1.pt
    step_000120/sharded/      with --fsdp: model weights and optimizer state as DTensors, written by
                              torch.distributed.checkpoint (each rank its rows), instead of the above
    latest                    text file naming the newest complete step directory

A checkpoint is written into `step_XXXXXX.tmp/`, which is renamed to `step_XXXXXX/` only once every
rank's file is on disk, and `latest` is replaced atomically after that; a kill at any moment leaves
the previous checkpoint complete and `latest` naming it. Saving a step again (a signal right after a
periodic save) first moves the old copy to `step_XXXXXX.old/`, which `latest` then falls back to if
the kill lands between the two renames.

A state with a non-finite floating-point tensor is refused, so the checkpoint `latest` names is
always finite. A save that fails on any rank (a full disk: an OSError, or torch.save's RuntimeError)
fails on every rank, and its `.tmp` folder is deleted. Every failure a user can meet raises
CheckpointError, whose message is one line.
"""

import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from data.durable import fsync_dir, write_text_atomic
from optim.distributed import is_dtensor

STEP_NAME = re.compile(r"step_\d{6}")
RANK_FILE = re.compile(r"rank(\d+)\.pt")
SHARDED = "sharded"  # the torch.distributed.checkpoint folder of a step written with --fsdp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message is one line naming the path."""


def non_finite_tensors(state, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in `state` (nested dicts, lists, tuples) that hold
    a NaN or an infinity, in the order met. One host read per device, whatever the tensor count."""
    named = list(_floating_tensors(state, prefix))
    finite: dict[int, bool] = {}
    for device in {tensor.device for _, tensor in named}:
        indices = [i for i, (_, tensor) in enumerate(named) if tensor.device == device]
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in indices]).tolist()
        finite.update(zip(indices, flags, strict=True))
    return [name for i, (name, _) in enumerate(named) if not finite[i]]


def _floating_tensors(state, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():  # a DTensor: this rank's rows
            yield prefix.rstrip("."), (state.to_local() if is_dtensor(state) else state).detach()
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from _floating_tensors(value, f"{prefix}{key}.")
    elif isinstance(state, list | tuple):
        for index, value in enumerate(state):
            yield from _floating_tensors(value, f"{prefix}{index}.")


def save_checkpoint(directory: str | Path, step: int, shared: dict, per_rank: dict, rank: int = 0,
                    keep: int = 2, sharded: dict | None = None) -> Path:
    """Write step `step`; returns its directory and keeps the newest `keep` steps.

    Collective under torchrun: every rank calls it; `shared` is written (and checked) by rank 0 only;
    `sharded` (DTensors, every rank its rows) goes through torch.distributed.checkpoint into SHARDED.
    Raises CheckpointError on every rank, writing nothing, if any rank's state is not finite.
    """
    directory = Path(directory)
    own = {"shared": shared, "rank0": per_rank} if rank == 0 else {f"rank{rank}": per_rank}
    _refuse_non_finite(directory, step, own if sharded is None else {**own, SHARDED: sharded})
    final = directory / f"step_{step:06d}"
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")

    def write() -> None:
        if sharded is not None:
            _save_sharded(sharded, tmp / SHARDED)
        _save_file(per_rank, tmp / f"rank{rank}.pt")
        if rank == 0:
            _save_file(shared, tmp / "shared.pt")

    failure = _first_failure(_attempt(partial(_fresh_folder, tmp)) if rank == 0 else None)
    if failure is None:  # every rank's file on disk, or every rank knows one is not
        failure = _first_failure(_attempt(write))
    if failure is None:
        failure = _first_failure(_attempt(partial(_publish, directory, tmp, final, old, keep)) if rank == 0
                                 else None)
    if failure is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a part-written step would hold the disk
        raise CheckpointError(f"{directory}: cannot write step {step} ({failure}); {_last_good(directory)}")
    return final


def _fresh_folder(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed mid-save
    tmp.mkdir(parents=True)


def _attempt(write: Callable[[], None]) -> str | None:
    """None if `write` succeeded, else why not, in a few words. torch.save reports a full disk or an I/O
    error as a RuntimeError ("PytorchStreamWriter failed writing file ..."), not an OSError."""
    try:
        write()
    except OSError as error:
        return error.strerror or str(error)
    except RuntimeError as error:
        return (str(error).splitlines() or [type(error).__name__])[0].strip()[:160]
    return None


def _first_failure(failure: str | None) -> str | None:
    """The first rank's failure, on every rank (collective under torchrun: a barrier that carries it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return failure
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    return next((f"rank {r}: {f}" for r, f in enumerate(failures) if f is not None), None)


def _publish(directory: Path, tmp: Path, final: Path, old: Path, keep: int) -> None:
    """Rename the complete `tmp` to `final`, point `latest` at it, then delete what it replaces."""
    if (tmp / SHARDED).is_dir():
        fsync_dir(tmp / SHARDED)
    fsync_dir(tmp)
    for interrupted in directory.glob("step_??????.old"):  # a kill between the renames below: undo
        if not interrupted.with_suffix("").exists():
            os.replace(interrupted, interrupted.with_suffix(""))
    if final.exists():  # complete (only a finished rename makes it), so its older copy can go
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    write_text_atomic(directory / "latest", final.name)
    for leftover in [*directory.glob("step_??????.old"), *directory.glob("step_??????.tmp")]:
        shutil.rmtree(leftover)
    for stale in sorted(directory.glob("step_??????"))[:-keep]:
        if stale != final:
            shutil.rmtree(stale)


def _refuse_non_finite(directory: Path, step: int, state: dict) -> None:
    bad = non_finite_tensors(state)
    reports = [(len(bad), bad[:1])]
    if dist.is_available() and dist.is_initialized():  # every rank must refuse, or none
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (len(bad), bad[:1]))
    count = sum(n for n, _ in reports)
    if count:
        first = next(names[0] for n, names in reports if n)
        raise CheckpointError(f"{directory}: refusing to save step {step}: NaN or inf in {count} "
                              f"tensor{'s' * (count > 1)} (the first: {first}); {_last_good(directory)}")


def _last_good(directory: Path) -> str:
    latest = directory / "latest"
    if latest.is_file():
        return f"the last good checkpoint is still {directory / latest.read_text().strip()}"
    return "no checkpoint was written"


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def resolve_checkpoint(resume: str, checkpoint_dir: str | Path | None = None) -> Path | None:
    """The step directory to resume from.

    `auto`: the one `latest` in `checkpoint_dir` names, or None if there is no `latest`. Otherwise
    `resume` is a step directory, or a checkpoint directory holding `latest`.
    """
    if resume == "auto":
        directory = Path(checkpoint_dir)
        return _follow_latest(directory) if (directory / "latest").is_file() else None
    path = Path(resume)
    if path.is_dir() and (path / "latest").is_file():
        return _follow_latest(path)
    if not (path / "shared.pt").is_file():
        found = "no such file or directory" if not path.exists() else "no shared.pt there"
        raise CheckpointError(f"{path}: {found}; expected a step directory holding shared.pt, or a "
                              f"checkpoint directory holding `latest`")
    return path


def _follow_latest(directory: Path) -> Path:
    latest = directory / "latest"
    name = latest.read_text().strip()
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{latest}: expected the name of a step directory (step_NNNNNN), "
                              f"found {name[:40]!r}")
    for candidate in (directory / name, directory / f"{name}.old"):  # .old: a kill mid-replacement
        if (candidate / "shared.pt").is_file():
            return candidate
    steps = sorted(p.name for p in directory.glob("step_??????") if (p / "shared.pt").is_file())
    raise CheckpointError(f"{latest}: names {name}, which is missing or incomplete; resume from a step "
                          f"directory that exists ({', '.join(steps) or 'there is none'})")


def load_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> tuple[dict, dict]:
    """(shared, this rank's state); refuses a checkpoint missing a rank's file, or written by a different
    number of ranks."""
    path = Path(path)
    if not (path / "shared.pt").is_file():
        raise CheckpointError(f"{path}: no shared.pt there; expected a complete step directory")
    shared = _load(path / "shared.pt")
    saved_ranks = _writers(path, shared)
    missing = [f"rank{r}.pt" for r in range(saved_ranks) if not (path / f"rank{r}.pt").is_file()]
    if missing:
        raise CheckpointError(f"{path}: {', '.join(missing)} missing, of the {_processes(saved_ranks)} that "
                              f"wrote it; the checkpoint is incomplete: resume from another step directory")
    if saved_ranks != world_size:
        raise CheckpointError(f"{path}: written by {_processes(saved_ranks)}, this run has {world_size}; "
                              f"resume with {_processes(saved_ranks)} (each holds its own optimizer shard)")
    return shared, _load(path / f"rank{rank}.pt")


def _writers(path: Path, shared) -> int:
    """How many processes wrote the step: shared.pt's `world_size` (train_gpt.py records it), else one
    more than the highest rank file's index."""
    if isinstance(shared, dict) and isinstance(shared.get("world_size"), int):
        return shared["world_size"]
    names = (RANK_FILE.fullmatch(f.name) for f in path.glob("rank*.pt"))
    return 1 + max((int(m.group(1)) for m in names if m), default=0)


def is_sharded(path: str | Path) -> bool:
    """Whether the step directory `path` was written with --fsdp (model and optimizer in SHARDED)."""
    return (Path(path) / SHARDED).is_dir()


def load_sharded(path: str | Path, template: dict) -> dict:
    """`template` filled from the step's SHARDED folder, whatever the number of processes that wrote it.

    Under a process group (a resumed --fsdp run) the template holds this run's DTensors and the load is
    collective; in a process without one (tools.sample) it holds whole tensors, read in full.
    """
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # without a process group DCP warns that it loads in one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(template, checkpoint_id=Path(path) / SHARDED)
    except Exception as error:  # DCP raises its own CheckpointException, OS and pickle errors alike
        reason = (str(error).splitlines() or [""])[0][:160]
        raise CheckpointError(f"{Path(path) / SHARDED}: cannot be read ({type(error).__name__}: {reason}); "
                              f"the checkpoint is damaged: resume from another step directory") from None
    return template


def _save_sharded(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp  # only --fsdp runs write one

    dcp.save(state, checkpoint_id=folder)


def _processes(count: int) -> str:
    return f"{count} process{'es' * (count != 1)}"


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """The GPT saved in a checkpoint (a step directory, or a checkpoint directory's latest), in eval mode."""
    from model import GPT, GPTConfig

    path = resolve_checkpoint(str(path))
    shared = _load(path / "shared.pt")
    weights_here = isinstance(shared, dict) and ("model" in shared or is_sharded(path))
    if not weights_here or "model_config" not in shared:
        raise CheckpointError(f"{path / 'shared.pt'}: expected a train_gpt.py checkpoint (model and "
                              f"model_config), found {type(shared).__name__}")
    model = GPT(GPTConfig(**shared["model_config"]))
    if is_sharded(path):  # written with --fsdp: the weights are in SHARDED, read here in full
        shared["model"] = load_sharded(path, {"model": model.state_dict()})["model"]
    model.load_state_dict(shared["model"])
    return model.to(device).eval()


def _load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load fails with zip, pickle, EOF or OS errors alike
        reason = (str(error).splitlines() or [""])[0][:160]
        raise CheckpointError(f"{file}: cannot be read ({type(error).__name__}: {reason}); the "
                              f"checkpoint is damaged: resume from another step directory") from None
