"""The state of a training run, in one place: what a checkpoint holds, a resume loads and the kernel
warm-up puts back.

    model        weights (the same on every rank; with --fsdp each rank's rows, as DTensors)
    optimizer    momentum buffers, Adam moments, param groups (under torchrun each rank's own shard;
                 with --fsdp each rank's rows, as DTensors)
    loader       the training stream's position
    rng          torch's CPU generator
    step         optimizer steps done
    train_time   seconds spent in training steps

On disk (tools/checkpoint.py) rank 0 writes the shared part and every rank its own (RANK_KEYS); the
shared part also carries the model and train configs, so a resume can refuse another model's weights.
With --fsdp the model and optimizer (SHARDED_KEYS) go through torch.distributed.checkpoint instead,
every rank writing its rows, and a resume loads them into this run's shards.
"""

from pathlib import Path

import torch
import torch.distributed as dist

from optim import is_dtensor
from tools.checkpoint import is_sharded, load_checkpoint, load_sharded, save_checkpoint

RANK_KEYS = ("optimizer", "rng")  # differ between ranks; the rest is shared and written by rank 0
SHARDED_KEYS = ("model", "optimizer")  # with --fsdp: DTensors, through torch.distributed.checkpoint


class RunState:
    """A run's model, optimizer, loader position, RNG, step and train time (the module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader):
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.step = 0
        self.train_time = 0.0

    def state_dict(self) -> dict:
        """References to the live tensors, as torch's state_dict(): deep-copy to keep a snapshot."""
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    loader=self.loader.state_dict(), rng=torch.get_rng_state(), step=self.step,
                    train_time=self.train_time)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        self.step, self.train_time = state["step"], state["train_time"]

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded with fully_shard (--fsdp): its parameters are DTensors."""
        return any(is_dtensor(p) for p in self.model.parameters())


def save_run(run: RunState, directory: Path, rank: int, **meta) -> Path:
    """Checkpoint `run` at its step into `directory` (collective), with `meta` beside the shared part."""
    state = run.state_dict()
    sharded = {key: state.pop(key) for key in SHARDED_KEYS} if run.sharded else None
    own = {key: state.pop(key) for key in RANK_KEYS if key in state}
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return save_checkpoint(directory, run.step, {**state, **meta, "world_size": world_size}, own, rank,
                           sharded=sharded)


def load_run(run: RunState, path: Path, rank: int, world_size: int, model_config: dict) -> dict:
    """Restore `run` from the checkpoint at `path`, refusing one saved for another model shape; returns
    the checkpoint's train config and data fingerprint ({} where an older checkpoint has none)."""
    shared, own = load_checkpoint(path, rank, world_size)
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
