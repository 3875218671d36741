"""Resident memory of this process: current (``/proc/self/statm``), peak (VmHWM) and glibc's reuse of it."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from pathlib import Path
from typing import Mapping

MB = 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * MB  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30
PREDICTABLE_MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, held fixed


def _mallopt():
    """glibc's ``mallopt`` or None (not Linux, or a libc without it such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def configure_allocator(budgeted: bool) -> bool:
    """Set glibc up for a training process, once, before it loads anything (True if applied): a budgeted
    run needs a predictable peak (``predictable_memory``), an unbudgeted one speed (``reuse_freed_memory``)."""
    return predictable_memory() if budgeted else reuse_freed_memory()


def predictable_memory() -> bool:
    """Make RSS follow the live tensors (no-op where glibc is absent; True if applied). For budgeted runs.

    glibc's mmap threshold is dynamic: it rises to the size of the largest block freed so far (up to
    32 MB), after which such blocks come from the heap, whose freed holes stay resident and fragment,
    so the same run's peak depends on the order of frees. A fixed 128 KB threshold maps every block
    of that size or more on its own and unmaps it when freed: the peak is the live tensors, with smaller
    blocks only in the heap. The price is page faults on every step. The memory model
    (``memory_model.py``) is calibrated under this setting (measurements: ``docs/memory.md``).
    """
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, PREDICTABLE_MMAP_THRESHOLD))


def reuse_freed_memory() -> bool:
    """Make glibc keep the pages a training step frees for the next step (no-op elsewhere; True if applied).

    By default glibc returns the top of the heap to the kernel whenever more than about twice its
    (dynamic) mmap threshold is free, and unmaps every block above that threshold on ``free``: each step's
    activations, freed at the end of the step, are page-faulted in afresh by the next (the training
    sessions' arena is off, ``backends/``). A fixed 32 MB mmap threshold and no trimming keep those pages
    resident. But a causal LM with full logits (tensors near 32 MB) fragments the untrimmed heap, so
    only runs without a memory budget use it; budgeted runs use ``predictable_memory``, under which the
    memory model is calibrated (measurements: ``docs/memory.md``).
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
_THP = Path("/sys/kernel/mm/transparent_hugepage")


def huge_pages_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` plus glibc's tunable that backs malloc's mapped blocks with 2 MiB huge pages, or None
    where it does not apply: not Linux/glibc, transparent huge pages off or not 2 MiB (a 16 KiB-page kernel,
    as on some Raspberry Pi 5 images, has 32 MiB ones, which would swell small mappings), or the user set
    the tunable already (``GLIBC_TUNABLES=glibc.malloc.hugetlb=0`` opts out). A tunable is read when the
    process starts, so ``edge-peft train`` re-executes itself with it (``cli.train``).

    For budgeted runs: ``predictable_memory`` maps every activation-sized block on its own, so every step
    page-faults its activations in afresh; with huge pages that is 512 times fewer faults. Not for runs
    without a budget: those keep freed pages resident (``reuse_freed_memory``), where huge pages cost
    speed and peak. Measured side by side in ``benchmarks/huge_pages.py`` (``docs/memory.md``).
    """
    if _mallopt() is None or HUGETLB_TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        mode = (_THP / "enabled").read_text()
        size = int((_THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return None
    if "[never]" in mode or size != 2 * MB:
        return None
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), f"{HUGETLB_TUNABLE}=1") if t)
    return {**environ, "GLIBC_TUNABLES": tunables}


def huge_pages_active() -> bool:
    """Whether this process started with malloc's huge pages on (``huge_pages_env``)."""
    return f"{HUGETLB_TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "")


def current_rss() -> int:
    """Bytes resident now (Linux: statm; elsewhere: the peak, the best portable figure)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def _proc_kb(path: str, key: str) -> int | None:
    """Bytes of the ``key:  N kB`` line of a /proc file; None where there is none (not Linux)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """Bytes the system can give a new allocation without swapping (Linux: ``MemAvailable``); None elsewhere."""
    return _proc_kb("/proc/meminfo", "MemAvailable")


def peak_rss() -> int:
    """Highest resident bytes this process has had.

    Linux: ``VmHWM`` of ``/proc/self/status``. ``getrusage`` is not used there: its ``ru_maxrss`` keeps the
    high-water mark of the image before ``execve``, i.e. of the parent at ``fork`` (a 460 MB test runner
    made a 230 MB training child report 460 MB).
    """
    hwm = _proc_kb("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
