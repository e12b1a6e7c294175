"""A run's checkpoints, in one place: save, load and resolve, for one process or many.

    save_checkpoint(run, folder, **meta)       collective: the RunState at its step (and `meta`) into
                                               folder/step_XXXXXX; returns that step directory
    load_checkpoint(run, path, model_config)   the RunState back from a step directory (collective with
                                               --fsdp); returns the plan it was saved with (config, data)
    resolve_checkpoint(spec, folder)           the step directory --resume SPEC names (`auto`: the one
                                               folder/latest names, or None)
    load_model(path, device)                   the GPT of a checkpoint, in eval mode (sampling, evals)
    CheckpointError                            every failure a user can meet, in one line naming the path

Below them, the format (write_step, read_step): any state split into a shared part and each rank's.

Layout under a run's checkpoint directory:

    step_000120/shared.pt     rank 0: model weights, model config, train config, data fingerprint, step,
                              loader position, world_size (the processes that wrote the step)
    step_000120/rank0.pt      every rank: its optimizer state (sharded under torchrun) and RNG states
    step_000120/rank1.pt
    step_000120/sharded/      with --fsdp: model weights and optimizer state as DTensors, written by
                              torch.distributed.checkpoint (each rank its rows), instead of the above
    latest                    text file naming the newest complete step directory

A checkpoint is written into `step_XXXXXX.tmp/`, which is renamed to `step_XXXXXX/` only once every
rank's file is on disk (data/durable.py), and `latest` is replaced atomically after that; a kill at any
moment leaves the previous checkpoint complete and `latest` naming it. Saving a step again (a signal
right after a periodic save) first moves the old copy to `step_XXXXXX.old/`, which `latest` then falls
back to if the kill lands between the two renames. The newest KEEP steps are kept.

A state with a non-finite floating-point tensor is refused on every rank, so the checkpoint `latest`
names is always finite. A save that fails on any rank (a full disk: an OSError, or torch.save's
RuntimeError) fails on every rank, and its `.tmp` folder is deleted; the `.tmp` folders of saves a
kill cut short are deleted when a run claims its folder (remove_unfinished_saves, training/rundir.py).
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

from data.durable import fsync_dir, write_durably, write_text_atomic
from optim import is_dtensor
from training.state import RunState

STEP_NAME = re.compile(r"step_\d{6}")
RANK_FILE = re.compile(r"rank(\d+)\.pt")
SHARDED = "sharded"  # the torch.distributed.checkpoint folder of a step written with --fsdp
KEEP = 2  # step directories kept after a save: the newest ones
RANK_KEYS = ("optimizer", "rng")  # RunState keys that differ between ranks; the rest is shared (rank 0)
SHARDED_KEYS = ("model", "optimizer")  # with --fsdp: DTensors, through torch.distributed.checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message is one line naming the path."""


def save_checkpoint(run: RunState, folder: Path, **meta) -> Path:
    """Checkpoint `run` at its step into `folder`, with `meta` beside the shared part; returns the step
    directory. Collective under torchrun (every rank calls it); CheckpointError on every rank if any
    rank's state is not finite or cannot be written."""
    state = run.state_dict()
    sharded = {key: state.pop(key) for key in SHARDED_KEYS} if run.sharded else None
    own = {key: state.pop(key) for key in RANK_KEYS if key in state}  # with --fsdp: the RNG only
    return write_step(folder, run.step, {**state, **meta, "world_size": _ranks()[1]}, own, sharded)


def load_checkpoint(run: RunState, path: Path, model_config: dict) -> dict:
    """Restore `run` from the step directory `path`, refusing one saved for another model shape or with
    another --fsdp; returns the checkpoint's train config and data fingerprint ({} and None where an
    older checkpoint has none). Collective under --fsdp."""
    shared, own = read_step(path, *_ranks())
    if shared["model_config"] != model_config:
        raise SystemExit(f"error: --resume {path}: saved for model {shared['model_config']}, but this "
                         f"run builds {model_config}; use the run's original flags")
    if is_sharded(path) != run.sharded:
        saved, now = ("with", "without") if is_sharded(path) else ("without", "with")
        raise SystemExit(f"error: --resume {path}: saved {saved} --fsdp, but this run is {now} it; resume "
                         f"{saved} --fsdp")
    if run.sharded:  # a template of this run's shards, filled in place
        state = run.state_dict()
        own |= load_sharded(path, {key: state[key] for key in SHARDED_KEYS})
    run.load_state_dict({**shared, **own})
    return dict(config=shared.get("config") or {}, data=shared.get("data"))


def _ranks() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def write_step(directory: str | Path, step: int, shared: dict, own: dict,
               sharded: dict | None = None) -> Path:
    """Write step `step`; returns its directory and keeps the newest KEEP steps.

    Collective under torchrun: every rank calls it, with its `own` part; `shared` is written (and
    checked) by rank 0 only; `sharded` (DTensors, every rank its rows) goes through
    torch.distributed.checkpoint into SHARDED. Raises CheckpointError on every rank, writing nothing,
    if any rank's state is not finite.
    """
    directory, rank = Path(directory), _ranks()[0]
    parts = {"shared": shared, "rank0": own} if rank == 0 else {f"rank{rank}": own}
    _refuse_non_finite(directory, step, parts if sharded is None else {**parts, SHARDED: sharded})
    final = directory / f"step_{step:06d}"
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")

    def write() -> None:
        if sharded is not None:
            _save_sharded(sharded, tmp / SHARDED)
        _save_file(own, tmp / f"rank{rank}.pt")
        if rank == 0:
            _save_file(shared, tmp / "shared.pt")

    failure = _first_failure(_attempt(partial(_fresh_folder, tmp)) if rank == 0 else None)
    if failure is None:  # every rank's file on disk, or every rank knows one is not
        failure = _first_failure(_attempt(write))
    if failure is None:
        failure = _first_failure(_attempt(partial(_publish, directory, tmp, final, old)) if rank == 0
                                 else None)
    if failure is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a part-written step would hold the disk
        raise CheckpointError(f"{directory}: cannot write step {step} ({failure}); {_last_good(directory)}")
    return final


def remove_unfinished_saves(checkpoints: Path) -> None:
    """Delete step_XXXXXX.tmp folders: saves that never completed (a kill, a full disk). Nothing names
    them, and on a full disk they hold the space the next save needs."""
    for unfinished in checkpoints.glob("step_??????.tmp"):
        shutil.rmtree(unfinished, ignore_errors=True)


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


def _publish(directory: Path, tmp: Path, final: Path, old: Path) -> None:
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
    for stale in sorted(directory.glob("step_??????"))[:-KEEP]:
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
    write_durably(path, lambda f: torch.save(obj, f))  # torch.save looked up at the call: tests replace it


def resolve_checkpoint(spec: str, folder: str | Path | None = None) -> Path | None:
    """The step directory to resume from.

    `auto`: the one `latest` in the checkpoint directory `folder` names, or None if there is no
    `latest`. Otherwise `spec` is a step directory, or a checkpoint directory holding `latest`.
    """
    if spec == "auto":
        directory = Path(folder)
        return _follow_latest(directory) if (directory / "latest").is_file() else None
    path = Path(spec)
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


def read_step(path: str | Path, rank: int = 0, world_size: int = 1) -> tuple[dict, dict]:
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
    collective; in a process without one (load_model) it holds whole tensors, read in full.
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
    """The GPT saved in a checkpoint, in eval mode on `device`: `path` is a step directory, a checkpoint
    directory (its latest), or a run's --out-dir (holding checkpoints/)."""
    from model import GPT, GPTConfig

    path = Path(path)
    path = resolve_checkpoint(str(path / "checkpoints" if (path / "checkpoints").is_dir() else path))
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
