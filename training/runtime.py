"""Process set-up for a training run: the device, the process group under torchrun, stop signals."""

import os
import resource
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

# A rank that waits longer than this in a collective raises instead of hanging. torchrun already ends
# the job when a rank exits; this covers a peer that is stuck, or gone where this node's torchrun
# cannot see it. Long enough for the first step's torch.compile and a checkpoint write on rank 0.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible (use --device cpu)")
    return device


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; one process if not under torchrun.

    NCCL on GPUs, gloo on CPU processes: the same code either way, one node or many (torchrun's c10d
    rendezvous flags). The optimizer then owns gradient synchronization (optim/distributed.py).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """`value` averaged over every rank, in place (collective under torchrun; one process: itself)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal_name = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (ranks must leave the loop together)."""
        flag = torch.tensor(float(self.signal_name is not None), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag)
        return flag.item() > 0

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated (CUDA)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process)"
