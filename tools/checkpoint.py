"""Checkpoints that a crash cannot corrupt, for one process or many.

Layout under a run's checkpoint directory:

    step_000120/shared.pt     rank 0: model weights, model config, train config, step, loader position
    step_000120/rank0.pt      every rank: its optimizer state (sharded under torchrun) and RNG states
    step_000120/rank1.pt
    latest                    text file naming the newest complete step directory

A checkpoint is written into `step_XXXXXX.tmp/`, which is renamed to `step_XXXXXX/` only once every
rank's file is on disk, and `latest` is replaced atomically after that; a kill at any moment leaves
the previous checkpoint complete and `latest` pointing at it.
"""

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data.shards import fsync_dir


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_checkpoint(directory: str | Path, step: int, shared: dict, per_rank: dict, rank: int = 0,
                    keep: int = 2) -> Path:
    """Collective under torchrun: every rank calls it. Returns the step directory; keeps the newest `keep`."""
    directory = Path(directory)
    final = directory / f"step_{step:06d}"
    tmp = directory / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed mid-save
        tmp.mkdir(parents=True)
    _barrier()
    _save_file(per_rank, tmp / f"rank{rank}.pt")
    if rank == 0:
        _save_file(shared, tmp / "shared.pt")
    _barrier()
    if rank == 0:
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(directory / "latest", final.name)
        for old in sorted(directory.glob("step_??????"))[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def resolve_checkpoint(resume: str, checkpoint_dir: str | Path | None = None) -> Path | None:
    """`auto` -> the run's latest checkpoint if any (None otherwise); else the given step directory."""
    if resume == "auto":
        latest = Path(checkpoint_dir) / "latest"
        return Path(checkpoint_dir) / latest.read_text().strip() if latest.is_file() else None
    path = Path(resume)
    if path.is_dir() and (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "shared.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected a step directory "
                                f"holding shared.pt, or a checkpoint directory holding `latest`)")
    return path


def load_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> tuple[dict, dict]:
    """(shared, this rank's state); refuses a checkpoint written by a different number of ranks."""
    path = Path(path)
    saved_ranks = len(list(path.glob("rank*.pt")))
    if saved_ranks != world_size:
        raise ValueError(f"{path}: written by {saved_ranks} ranks, this run has {world_size}; "
                         f"resume with the same number of processes (optimizer state is sharded)")
    shared = torch.load(path / "shared.pt", map_location="cpu", weights_only=False)
    per_rank = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    return shared, per_rank


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """The GPT saved in a checkpoint (a step directory, or a checkpoint directory's latest), in eval mode."""
    from model import GPT, GPTConfig

    path = resolve_checkpoint(str(path))
    shared = torch.load(path / "shared.pt", map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**shared["model_config"]))
    model.load_state_dict(shared["model"])
    return model.to(device).eval()
