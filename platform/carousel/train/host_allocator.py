"""Keep a training process's large host buffers for the next step instead of handing them back to
the kernel after every step.

glibc serves large allocations with ``mmap`` (from 128 KiB, rising to at most 32 MiB as it sees
them freed) and trims the heap's free top above 128 KiB (twice the current mmap threshold). A CPU
training step allocates and frees the same large tensors every step (the LM's logits and their
gradients: 16 MB each in the benchmark job), so each of them comes back as fresh pages and
every page faults on first touch: 2 900-9 200 minor faults a step, and a 16 MB zero-fill took 7 ms
instead of ~1 ms (docs/performance.md, kernel). Raising both thresholds once, before torch loads,
keeps those pages in the process: 150-450 faults a step, and steps 7-9 % faster (median).

Why not a library allocator: tcmalloc (Debian ``libtcmalloc-minimal4``) measured about the same
(9 faults a step, 1-2 % faster again in the main thread), but it has to be in ``LD_PRELOAD`` when each worker process
is exec'd, i.e. in the environment of the whole Ray node, which Carousel does not own; this needs
three ``mallopt`` calls in the worker. A user who preloads an allocator, or sets glibc's own malloc
variables, keeps them: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit. Larger buffers are
# still mmap'ed (and faulted in) every time; on such sizes a preloaded tcmalloc helps more.
MMAP_THRESHOLD = 32 << 20
# The free top of the heap kept before trimming: a step's transient buffers, with room to spare.
# Freed memory up to this size stays in the process's RSS between steps (not its peak).
TRIM_THRESHOLD = 512 << 20
# Threads other than the main one (Ray Train runs the train function in one) allocate from arenas
# of 64 MiB heaps, and glibc unmaps a heap as soon as it is free unless the pad says to keep it:
# without this the thresholds above save only three quarters of the faults in such a thread.
TOP_PAD = 64 << 20

_GLIBC_MALLOC_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                      "MALLOC_ARENA_MAX")


def user_choice(env) -> str | None:
    """Why the allocator is left alone, or None when Carousel may tune it."""
    preload = env.get("LD_PRELOAD", "")
    if any(name in preload for name in ("malloc", "jemalloc", "mimalloc")):
        return f"LD_PRELOAD={preload}"
    for k in _GLIBC_MALLOC_VARS:
        if k in env:
            return f"{k}={env[k]}"
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


_applied: str | None = None


def apply(env) -> str:
    """Tune this process's allocator once (the first call decides); returns what it did."""
    global _applied
    if _applied is None:
        _applied = tune(env)
    return _applied


def applied() -> str:
    """What ``apply`` did in this process, for rank 0's start-up line."""
    return _applied or "system default"


def tune(env) -> str:
    """Raise glibc's mmap and trim thresholds and its top pad in this process; returns what it did."""
    if (why := user_choice(env)) is not None:
        return f"left as set ({why})"
    if not sys.platform.startswith("linux"):
        return "system default (not glibc)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return "system default (no mallopt)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    if not all(mallopt(param, value) == 1 for param, value in settings):
        return "system default (mallopt refused)"
    return (f"glibc, large buffers kept (mmap from {MMAP_THRESHOLD >> 20} MiB, trim above {TRIM_THRESHOLD >> 20} MiB, "
            f"top pad {TOP_PAD >> 20} MiB)")
