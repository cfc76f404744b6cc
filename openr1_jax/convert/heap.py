"""Give the heap's free pages back to the kernel between conversion groups.

A streaming converter frees a group of tensors (tens of MB) after every step. glibc's malloc keeps freed heap
memory mapped for reuse, and after the first large block is freed it serves blocks of up to 32 MiB from the
heap rather than from fresh mappings, so the next groups land among the fragments of the last ones and the peak
RSS follows the allocation order more than the group and shard sizes (`bench/convert_memory.py`, jax-to-hf of a
1 GB checkpoint: 491-561 MiB from run to run). `malloc_trim(0)` after each group returns every free page.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        trim = None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the heap's free pages to the kernel (glibc); a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
