"""Process set-up for a training run: the device and its precision, the process group under torchrun,
stop signals and their agreement across ranks, the clock."""

import ctypes
import importlib
import os
import resource
import signal
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

# A rank that waits longer than this in a collective raises instead of hanging, while the run compiles
# (until the warm-up is done; shorten_collective_timeout then takes over). torchrun already ends
# the job when a rank exits; this covers a peer that is stuck, or gone where this node's torchrun
# cannot see it. It must outlast the longest wait of a healthy run: the warm-up's compilation on a cold
# cache, where each rank compiles the training graph (forward and backward), the validation graph and
# its Newton-Schulz stacks, minutes each, and 8 ranks compiling at once share the host's CPUs, so the
# first rank done can wait for the last for most of that time. NCCL's own default (10 minutes) is
# about what a cold 8-rank compile takes; 30 minutes is three times that, and a checkpoint write on
# rank 0 is far shorter.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


# glibc's mallopt parameters (malloc.h) and the values keep_freed_host_memory gives them: no block is
# mapped on its own, and the heap's free top is never handed back (2³¹ − 1 bytes, mallopt's largest).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_SETTINGS = ((M_MMAP_THRESHOLD, 2**31 - 1), (M_TRIM_THRESHOLD, 2**31 - 1))


def keep_freed_host_memory() -> bool:
    """glibc's malloc serves every block from its heap and keeps what is freed there for the next
    allocation, instead of mapping each block over 32 MiB afresh and unmapping it when freed. A CPU run
    allocates its large temporaries (the 50304-wide logits, their gradients) at every step; mapped afresh,
    each 4 KiB page faults and is zeroed by the kernel, most of the CPU demo's system time (measured in
    docs/BENCHMARKS.md). The heap then stays at the run's peak until the process ends (the CPU demo's
    resident memory 2.4–2.8 GB where it was 1.4). Called before the run allocates; True where it applied,
    False where the C library is not glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in HEAP_SETTINGS)


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


LAUNCHED = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")  # set by torchrun in each process it starts
JOB = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")  # read by init_process_group


def world_size_from_env() -> int:
    """Processes in the job: torchrun's WORLD_SIZE, 1 when not under torchrun.

    A one-line SystemExit where WORLD_SIZE, RANK or MASTER_* are set but torchrun did not start this
    process (left in the shell by another job): the process group would wait for peers that never come.
    """
    stray = [f"{name}={os.environ[name]}" for name in JOB if name in os.environ]
    if stray and not any(name in os.environ for name in LAUNCHED):
        raise SystemExit(f"error: {' '.join(stray)} set, but torchrun did not start this process (no "
                         f"LOCAL_RANK): unset them to run one process, or launch with torchrun")
    return int(os.environ.get("WORLD_SIZE", "1"))


class Process(NamedTuple):
    """This process of a run: its rank among world_size processes, and its device."""

    rank: int
    world_size: int
    device: torch.device


def init_distributed(device: torch.device, group_of_one: bool = False) -> Process:
    """This Process from torchrun's environment: rank 0 of 1 on `device` if not under torchrun.

    NCCL on GPUs, gloo on CPU processes: the same code either way, one node or many (torchrun's c10d
    rendezvous flags). The optimizer then owns gradient synchronization (optim/distributed.py).
    One process gets a process group (of one, on an in-memory store) only with group_of_one: --fsdp
    shards over a group whatever its size.
    """
    world_size = world_size_from_env()
    if world_size == 1 and not group_of_one:
        return Process(0, 1, device)
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
    return Process(rank, world_size, device)


def shorten_collective_timeout(seconds: float) -> None:
    """Once nothing is left to compile, a rank waits at most `seconds` (--collective-timeout-s) in a
    collective instead of COLLECTIVE_TIMEOUT: a peer that stops answering is then reported, as a failed
    collective (one line from train_gpt.cli), within that time. Under torchrun only. Every group this
    process holds: the default one, and the optimizer's own (optim/distributed.py), which a group made
    with new_group() only inherits at its creation."""
    if dist.is_available() and dist.is_initialized():
        for group in list(dist.distributed_c10d._world.pg_map):
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)


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


def autocast_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype | None:
    """bf16 for a model whose residual stream is float32 on CUDA (run it under autocast), else None.

    The stream takes the token embedding's dtype. With bf16 tables (GPT.to_device, cuda_dtype
    "bfloat16": the record's dtypes) the stream and every matmul already run in bf16 and the loss in
    float32, so autocast stays off; off CUDA the models stay float32, without autocast.
    """
    stream = model.embed.weight.dtype
    return torch.bfloat16 if device.type == "cuda" and stream == torch.float32 else None


def synchronize(device: torch.device) -> None:
    """Wait until the device has done all the work queued on it (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def wait_for_all_ranks(device: torch.device) -> None:
    """This device idle, and every rank at this point (a barrier under torchrun)."""
    synchronize(device)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Stopwatch:
    """Wall time of a stretch of work on the device: start() and stop() each wait for the device, so
    steps in between run unsynchronized and are timed together, the host reading nothing per step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.started = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def stop(self) -> float:
        """Seconds since start(), once the device has finished the stretch's work."""
        synchronize(self.device)
        return time.perf_counter() - self.started


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """`value` averaged over every rank, in place (collective under torchrun; one process: itself)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class StopRequest:
    """SIGTERM/SIGINT set a flag; the ranks agree on it where they meet anyway (`agree`, at the loop's
    logged steps), then save a checkpoint and exit together."""

    def __init__(self):
        self.signal_name = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def agree(loss: torch.Tensor, stopping: bool) -> tuple[float, bool]:
    """(loss averaged over ranks, whether any rank is stopping): one all-reduce, one host read.

    The flag joins the loss on the device by a fill (a kernel argument, no host-to-device copy); one
    process reads its loss alone.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return loss.item(), stopping
    packet = torch.stack([loss.float(), torch.full((), float(stopping), device=loss.device)])
    dist.all_reduce(packet)
    total, stopping_ranks = packet.tolist()
    return total / dist.get_world_size(), stopping_ranks > 0


def peak_memory_gib(device: torch.device) -> float:
    """GiB: the most allocated on a GPU since the process began, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory(device: torch.device) -> str:
    what = "allocated (CUDA)" if device.type == "cuda" else "resident (process)"
    return f"{peak_memory_gib(device):.2f} GiB {what}"
