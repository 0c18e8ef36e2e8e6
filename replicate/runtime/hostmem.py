"""Host-memory allocator setting for CPU training: recycle freed activation memory instead of page-faulting it in.

PyTorch's CPU tensors come straight from malloc. glibc serves blocks above its mmap threshold (128 KiB, adapting
upward) with fresh ``mmap`` pages and unmaps them on free, so every training step page-faults its activations in
anew, in system time while the other OpenMP thread waits. Raising the threshold to glibc's 32 MiB maximum and never
trimming the heap top makes malloc reuse those pages, and the faults all but vanish (fault counts:
docs/code-measurements.md; tests/test_hostmem.py checks the drop). The process keeps its peak heap: fine for a
training run.

Linux/glibc only (a no-op elsewhere); ``REPLICATE_MALLOC=default`` leaves the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "REPLICATE_MALLOC"
# mallopt(3) parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's HEAP_MAX-derived cap on 64-bit: larger blocks are always mmap'ed
TOP_PAD = 64 * 1024 * 1024  # grow the heap in 64 MiB steps: fewer brk calls while a step's activations build up

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Apply the setting once per process; True if glibc accepted it."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    ok &= mallopt(M_TOP_PAD, TOP_PAD) == 1
    _applied = bool(ok)
    return _applied
