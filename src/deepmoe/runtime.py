"""Process-wide settings that make MoE workloads faster; called by the CLI, never on import."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed memory back to the OS after every large tensor.

    MoE layers allocate and free buffers of hundreds of MB per step (permuted tokens,
    expert activations); by default glibc serves each from fresh mmap pages and the
    page faults cost 15–50% of CPU time. Keeping freed memory in the heap removes them,
    at the price of a resident size that stays at its peak. Returns False where the C
    library is not glibc (nothing is changed then).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30)  # allocations up to 1 GiB come from the heap ...
    ok &= mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)  # ... which is never trimmed back
    ok &= mallopt(_M_TOP_PAD, 1 << 28)  # and grows in 256 MiB steps
    return bool(ok)
