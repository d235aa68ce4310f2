"""Process-wide settings: what makes MoE workloads faster (called by the CLI, never on import), and the switch
for the forward pass's debug checks (`set_debug_checks`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

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


# ---- debug checks -------------------------------------------------------------------------------------------
_debug_checks = os.environ.get("DEEPMOE_DEBUG_CHECKS", "").strip().lower() in ("1", "true", "yes", "on")


def set_debug_checks(enabled: bool) -> None:
    """Turn the forward pass's debug checks on or off, process-wide (default: off, or on when the environment
    variable DEEPMOE_DEBUG_CHECKS is 1 / true / yes / on at import).

    The forward pass never reads a tensor's values on the host by default: on an accelerator each such read
    (`.item()`, `bool(t)`, `int(t)`) waits for the device, once per layer and step. The checks that need one
    run only when switched on here, and only in eager mode (never while `torch.compile` traces):

    - the MoE router refuses non-finite logits (ValueError), in every layer;
    - the router asserts that an expert mask never made it choose a disabled or out-of-group expert
      (RuntimeError; `Router.set_expert_mask` already refuses every mask for which that could happen);
    - `MoE.forward` checks that its input is finite even when a model calls it (see its `check_finite`).

    The entry points validate their input's values in eager mode whatever this says: `DeepSeekForCausalLM`
    checks token ids and the attention mask once per call, a directly called `MoE` that its input is finite.
    """
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks_enabled() -> bool:
    """Whether the debug checks run now: switched on (`set_debug_checks`) and not inside `torch.compile`."""
    return _debug_checks and not torch.compiler.is_compiling()


@contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """`set_debug_checks(enabled)` for the duration of a `with` block, then the previous setting."""
    before = _debug_checks
    set_debug_checks(enabled)
    try:
        yield
    finally:
        set_debug_checks(before)
