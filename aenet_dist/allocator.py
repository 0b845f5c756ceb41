"""Keep freed memory for reuse: the C allocator setting of our long-running commands.

glibc's malloc serves every allocation above its mmap threshold (128 KiB, adapting up to
32 MiB) with fresh pages from the kernel and gives them back when they are freed, and it trims
the top of its heap back to the kernel too. A training step allocates and frees the same
few-MB temporaries (gathered rows, force contributions, activations) every time, so each step
pays for faulting every page of them in again. On the 2-vCPU VM of bench/RESULTS.md a sparse
force contraction of 100,000 rows took 29 ms that way and 7.4 ms with the freed memory kept,
against 1.2 ms to read its data once.

:func:`keep_freed_memory` raises both thresholds (``mallopt``), so freed memory stays in the
process and the next step reuses it. The process's resident memory then stays near its peak
instead of falling between steps; the peak itself does not grow. It is called by the
``train`` command only: a library does not change the allocator of its host process. Set
``AENET_DIST_MALLOC=system`` to leave glibc's defaults; other C libraries (musl, macOS) are left
alone. :func:`release_freed_memory` hands what is free back to the kernel at the few points where
a large amount was freed for good (the pieces of a resident shard once they are joined).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

from .log import get_logger

log = get_logger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 2**31 - 1  # the largest value mallopt takes: never trim, never mmap below 2 GiB


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; whether the setting took effect."""
    if os.environ.get("AENET_DIST_MALLOC", "").lower() == "system":
        return False
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:  # not glibc
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library, once per process (``find_library`` runs ``ldconfig``)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return the allocator's free memory to the kernel now (glibc's ``malloc_trim``; elsewhere nothing)."""
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
