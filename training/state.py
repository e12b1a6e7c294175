"""The state of a training run, in one place: what a checkpoint holds, a resume loads and the kernel
warm-up puts back.

    model        weights (the same on every rank; with --fsdp each rank's rows, as DTensors)
    optimizer    momentum buffers, Adam moments, param groups (under torchrun each rank's own shard;
                 with --fsdp each rank's rows, as DTensors), and after a step at which the Adam groups
                 rested (--adam-step-every) the gradients they accumulated (each rank its own, whole)
    loader       the training stream's position
    rng          torch's CPU generator
    step         optimizer steps done
    train_time   seconds spent in training steps

On disk (training/checkpoint.py, which imports this module, never the reverse) rank 0 writes the
shared part and every rank its own (optimizer, rng); the shared part also carries the model and train
configs, so a resume can refuse another model's weights. With --fsdp the model and optimizer go through
torch.distributed.checkpoint instead, every rank writing its rows, and a resume loads them into this
run's shards.
"""

import torch

from optim import is_dtensor


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

