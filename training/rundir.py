"""A run's folder, claimed before the run writes in it: one live run per --out-dir, and never a new run
over what an earlier run left there.

    <out-dir>/run.lock    "PID HOST" of the live run: created with O_EXCL (two runs cannot both create
                          it), removed when the run ends. A lock whose process is gone (same host, no
                          such pid: a kill -9) is stale and taken over.

A run without --resume refuses a folder holding an earlier run's log.txt, metrics.jsonl or checkpoints
(one line: continue it with --resume auto, or pass a new --out-dir); a resumed run appends to them.
Under torchrun rank 0 claims the folder for the job and every rank ends with its answer.
"""

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from training.checkpoint import remove_unfinished_saves

LOCK = "run.lock"
RUN_FILES = ("log.txt", "metrics.jsonl")


def earlier_run(out_dir: Path) -> list[str]:
    """What an earlier run left in `out_dir`: its log files, and checkpoints/ if it holds a checkpoint."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    checkpoints = out_dir / "checkpoints"
    if (checkpoints / "latest").exists() or any(checkpoints.glob("step_??????*")):
        found.append("checkpoints/")
    return found


def refuse_earlier_run(out_dir: Path, resuming: bool) -> None:
    """One-line SystemExit if a run that does not resume would write over an earlier run in `out_dir`."""
    found = [] if resuming else earlier_run(out_dir)
    if found:
        raise SystemExit(f"error: --out-dir {out_dir} holds an earlier run ({', '.join(found)}); continue it "
                         f"with --resume auto, or pass a new --out-dir")


def lock_holder(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in `lock`, or None where it cannot be read (being written, or not a lock)."""
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def is_stale(holder: tuple[int, str] | None) -> bool:
    """Whether the lock's process is gone: only knowable for a process of this host."""
    if holder is None or holder[1] != socket.gethostname():
        return False
    try:
        os.kill(holder[0], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def take_lock(out_dir: Path) -> Path:
    """Create <out_dir>/run.lock naming this process; a one-line SystemExit naming the holder if a live
    process holds it. A stale lock is taken over."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = lock_holder(lock)
            if not is_stale(holder):
                who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
                raise SystemExit(f"error: --out-dir {out_dir} is in use by {who} ({lock}); wait for that "
                                 f"run to end, or pass another --out-dir (delete {LOCK} if no run uses "
                                 f"it)") from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return lock


def _claim(out_dir: Path, resuming: bool) -> tuple[Path | None, str | None]:
    """(the lock taken, None), or (None, the refusal's line)."""
    lock = None
    try:
        lock = take_lock(out_dir)
        refuse_earlier_run(out_dir, resuming)
        remove_unfinished_saves(out_dir / "checkpoints")
        return lock, None
    except SystemExit as refusal:
        if lock is not None:
            lock.unlink(missing_ok=True)
        return None, str(refusal.code)


@contextmanager
def claim_out_dir(out_dir: Path, rank: int, resuming: bool) -> Iterator[None]:
    """Hold `out_dir` for this run (the module docstring): rank 0 takes the lock and checks the folder,
    every rank raises its one-line SystemExit if that was refused. The lock goes when the block ends."""
    lock, refusal = _claim(out_dir, resuming) if rank == 0 else (None, None)
    if dist.is_available() and dist.is_initialized():
        answer = [refusal]
        dist.broadcast_object_list(answer, src=0)
        refusal = answer[0]
    if refusal is not None:
        raise SystemExit(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
