"""The state of a training run, in one place: what a checkpoint holds, a resume loads and the kernel
warm-up puts back.

    model        weights (the same on every rank)
    optimizer    momentum buffers, Adam moments, param groups (under torchrun each rank's own shard)
    loader       the training stream's position
    rng          torch's CPU generator
    step         optimizer steps done
    train_time   seconds spent in training steps

On disk (tools/checkpoint.py) rank 0 writes the shared part and every rank its own (RANK_KEYS); the
shared part also carries the model and train configs, so a resume can refuse another model's weights.
"""

from pathlib import Path

import torch

from tools.checkpoint import load_checkpoint, save_checkpoint

RANK_KEYS = ("optimizer", "rng")  # differ between ranks; the rest is shared and written by rank 0


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


def save_run(run: RunState, directory: Path, rank: int, **meta) -> Path:
    """Checkpoint `run` at its step into `directory` (collective), with `meta` beside the shared part."""
    state = run.state_dict()
    own = {key: state.pop(key) for key in RANK_KEYS}
    return save_checkpoint(directory, run.step, {**state, **meta}, own, rank)


def load_run(run: RunState, path: Path, rank: int, world_size: int, model_config: dict) -> None:
    """Restore `run` from the checkpoint at `path`, refusing one saved for another model shape."""
    shared, own = load_checkpoint(path, rank, world_size)
    if shared["model_config"] != model_config:
        raise SystemExit(f"--resume {path}: saved for model {shared['model_config']}, but this "
                         f"run builds {model_config}; use the run's original flags")
    run.load_state_dict({**shared, **own})
