"""Resident memory of this process: current (``/proc/self/statm``), peak (VmHWM) and glibc's reuse of it."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys

MB = 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * MB  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory() -> bool:
    """Make glibc keep the pages a training step frees for the next step (no-op elsewhere; True if applied).

    By default glibc returns the top of the heap to the kernel whenever more than about twice its
    (dynamic) mmap threshold is free, and unmaps every block above that threshold on ``free``: each step's
    activations, freed at the end of the step, are page-faulted in afresh by the next. With the training
    sessions' arena off (``backend.py``) that cost 25-32 % of tokens/s on MiniLM (8 x 128, 16 x 128,
    2 x 512, 3 x 512; ``benchmarks/train_step.py``). A fixed 32 MB mmap threshold and no trimming keep
    those pages resident; the peak grew by 1-2 % at those sizes (measured the same way), because the
    peak already held them. But a causal LM with full logits (tensors near 32 MB) fragmented the
    untrimmed heap: +24 % peak at 1 x 315 tokens, past a 384 MB budget (``benchmarks/memory_budget.py``).
    So the trainer applies it only to runs without a memory budget; budgeted runs keep glibc's default,
    under which the memory model was calibrated.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def current_rss() -> int:
    """Bytes resident now (Linux: statm; elsewhere: the peak, the best portable figure)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Highest resident bytes this process has had.

    Linux: ``VmHWM`` of ``/proc/self/status``. ``getrusage`` is not used there: its ``ru_maxrss`` keeps the
    high-water mark of the image before ``execve``, i.e. of the parent at ``fork`` (a 460 MB test runner
    made a 230 MB training child report 460 MB).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
