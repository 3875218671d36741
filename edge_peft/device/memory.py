"""Resident memory of this process: current (``/proc/self/statm``) and peak (``getrusage``)."""

from __future__ import annotations

import os
import resource
import sys

MB = 1024 * 1024


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
