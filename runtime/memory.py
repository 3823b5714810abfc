"""glibc malloc settings that keep a small device's resident memory flat (no numpy, grpc or torch).

A device server's allocations are mostly short-lived inference buffers. With glibc's defaults,
three things make its resident memory ratchet up and never come back:

- every thread that allocates may get its own malloc arena (M_ARENA_MAX);
- the mmap threshold adapts upwards: once a large buffer (say a batch-8 activation) has been
  freed, buffers of that size are carved from the heap instead of mmap'd, and the heap keeps
  the pages after they are freed (M_MMAP_THRESHOLD fixed at a value disables that);
- memory freed after start-up (import-time garbage, the model's load buffers) stays in the heap
  until something calls malloc_trim.

The price: a batch whose buffers are above the threshold pays page faults for fresh pages on
every run (about +20% time for a batch-8 WRN-16-1 run; batch-1 buffers stay below 128 KiB and
cost nothing). A setting given in glibc's own environment variables (MALLOC_ARENA_MAX,
MALLOC_MMAP_THRESHOLD_) is left as the user set it. Everything here is a no-op returning False
where the C library is not glibc.
"""

from __future__ import annotations

import gc
import os
import sys
from functools import lru_cache
from typing import Any

__all__ = ["DEFAULT_MMAP_THRESHOLD", "tune_malloc", "release_free_memory"]

# glibc's own starting value: buffers from 128 KiB up are mmap'd, and unmapped when freed.
DEFAULT_MMAP_THRESHOLD = 128 * 1024

# mallopt parameters, from glibc's malloc.h.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@lru_cache(maxsize=1)
def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (absent on musl)
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc(arenas: int | None = 1, mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Cap malloc arenas at `arenas` and fix the mmap threshold at `mmap_threshold` bytes.

    Call it before the server starts its threads. None, or glibc's environment variable for
    it being set, leaves a setting alone.
    Returns True if every setting applied took.
    """
    for name, value in (("arenas", arenas), ("mmap_threshold", mmap_threshold)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    libc = _glibc()
    if libc is None:
        return False
    ok = True
    for param, value, env in ((_M_ARENA_MAX, arenas, "MALLOC_ARENA_MAX"), (_M_MMAP_THRESHOLD, mmap_threshold, "MALLOC_MMAP_THRESHOLD_")):
        if value is not None and env not in os.environ:
            ok &= bool(libc.mallopt(param, value))
    return ok


def release_free_memory() -> bool:
    """Collect garbage, then hand the heap's free pages back to the system (malloc_trim(0)).

    Worth calling once after loading, when start-up garbage is gone for good. Returns True if
    glibc released anything.
    """
    gc.collect()
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
