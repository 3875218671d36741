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
PREDICTABLE_MMAP_THRESHOLD = 1 * MB


def _mallopt():
    """glibc's ``mallopt`` or None (not Linux, or a libc without it such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def predictable_memory() -> bool:
    """Make RSS follow the live tensors (no-op where glibc is absent; True if applied). For budgeted runs.

    glibc's mmap threshold is dynamic: it rises to the size of the largest block freed so far (up to
    32 MB), after which such blocks come from the heap, whose freed holes stay resident and fragment.
    The same run then peaked at 559 MB or 668 MB (MiniLM int8, 2 x 512) depending on the order of frees.
    A fixed 1 MB threshold maps every activation-sized block on its own and unmaps it when freed: the
    peak is the live tensors, linear in micro-batch x sequence, and 13-27 % lower (MiniLM int8: 8 x 128
    417 -> 362 MB, 8 x 256 884 -> 644 MB, 2 x 512 673 -> 492 MB), at the cost of page faults on every
    step. The memory model (``memory_model.py``) is calibrated under this setting.
    """
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, PREDICTABLE_MMAP_THRESHOLD))


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
    So the trainer applies it only to runs without a memory budget; budgeted runs use
    ``predictable_memory``, under which the memory model is calibrated.
    """
    mallopt = _mallopt()
    if mallopt is None:
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
