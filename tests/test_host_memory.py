"""training/runtime.py keep_freed_host_memory: after it, glibc serves a large block from its heap instead of
mapping it on its own, so that a freed logits-sized buffer is reused without the kernel zeroing new pages.
Checked in a fresh process (the suite's own process has it applied, tests/conftest.py) through glibc's
mallinfo2: hblkhd counts the bytes of blocks mapped on their own, arena the heap's. And the suite's own
process hands what it kept back to the kernel between tests (conftest's release_freed_host_memory)."""

import ctypes
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HEAP_KEPT, release_freed_host_memory

ROOT = Path(__file__).resolve().parents[1]
# A 64 MiB block (over glibc's 32 MiB ceiling for its dynamic mmap threshold) allocated, measured and
# freed, before and after keep_freed_host_memory; prints "applied hblkhd arena" before, then after (hblkhd
# also holds what torch's import mapped and still holds).
PROBE = """
import ctypes
from training.runtime import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks",
                                                     "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.mallinfo2.restype = ctypes.c_void_p, MallInfo2
libc.free.argtypes = [ctypes.c_void_p]

def held_while_allocated():
    block = libc.malloc(64 << 20)
    info = libc.mallinfo2()
    libc.free(block)
    return info.hblkhd, info.arena

before = held_while_allocated()
applied = keep_freed_host_memory()
print(applied, *before, *held_while_allocated())
"""


def has_mallinfo2() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018 (glibc >= 2.33)
    except AttributeError:
        return False
    return True


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc's mallinfo2 (glibc >= 2.33)")
def test_a_large_block_comes_from_the_heap_once_freed_memory_is_kept():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    applied, mapped_before, _, mapped_after, heap_after = out.stdout.split()
    assert applied == "True"
    assert int(mapped_before) - int(mapped_after) >= 64 << 20  # glibc's default: the block mapped on its own
    assert int(heap_after) >= 64 << 20  # now: in the heap


def resident_bytes() -> int:
    """This process's resident memory (/proc/self/statm's second field, in pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not (HEAP_KEPT and Path("/proc/self/statm").exists()), reason="needs glibc and Linux")
def test_the_heap_a_test_freed_is_handed_back_before_the_next_test():
    block = torch.ones(256 << 20, dtype=torch.uint8)  # 256 MiB from the heap, every page touched
    kept = resident_bytes()
    del block
    assert resident_bytes() > kept - (64 << 20)  # freed, still resident: the heap keeps it
    release_freed_host_memory()
    assert resident_bytes() < kept - (192 << 20)
