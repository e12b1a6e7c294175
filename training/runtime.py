"""Process set-up for a training run: the device, the process group under torchrun, stop signals."""

import importlib
import os
import resource
import signal
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# A rank that waits longer than this in a collective raises instead of hanging. torchrun already ends
# the job when a rank exits; this covers a peer that is stuck, or gone where this node's torchrun
# cannot see it. Long enough for the first step's torch.compile and a checkpoint write on rank 0.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def resolve_device(name: str) -> torch.device:
    """--device: auto (CUDA if visible, else CPU), cpu, cuda, cuda:N or mps; one-line SystemExit if absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: no CUDA device is visible (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA devices are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name}: MPS is not available here (use --device cpu)")
    return device


def world_size_from_env() -> int:
    """Processes in the job: torchrun's WORLD_SIZE, 1 when not under torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device, group_of_one: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; one process if not under torchrun.

    NCCL on GPUs, gloo on CPU processes: the same code either way, one node or many (torchrun's c10d
    rendezvous flags). The optimizer then owns gradient synchronization (optim/distributed.py).
    One process gets a process group (of one, on an in-memory store) only with group_of_one: --fsdp
    shards over a group whatever its size.
    """
    world_size = world_size_from_env()
    if world_size == 1 and not group_of_one:
        return 0, 1, device
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # torch._dynamo, imported for the first time after the group exists (torch.optim.Optimizer imports
    # it lazily), keeps references to the group: destroy_process_group() then cannot join gloo's
    # threads, and one of them can abort the interpreter at exit. Imported first, it cannot.
    importlib.import_module("torch._dynamo")
    alone = dict(store=dist.HashStore(), rank=0, world_size=1) if world_size == 1 else {}
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None, **alone)
    return rank, world_size, device


def check_writable(folder: Path, what: str) -> None:
    """One-line SystemExit naming `what` unless `folder` is, or can be made, a folder this process can
    write in: checked before a run writes anything, so a bad --out-dir costs nothing."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"{existing} is a file"
        raise SystemExit(f"error: {what} {folder}: {where}, expected a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise SystemExit(f"error: {what} {folder}: cannot write in {existing} ({error.strerror})") from None


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
