"""Stage-by-stage progress lines for long commands (export, benchmarks)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class Stages:
    """Prints ``[i/n] what ... done (1.2 s)`` to stderr for each stage of a fixed plan."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.index, self.quiet = total, 0, quiet

    @contextmanager
    def stage(self, what: str) -> Iterator[None]:
        self.index += 1
        start = time.perf_counter()
        if not self.quiet:
            print(f"[{self.index}/{self.total}] {what} ...", end="", file=sys.stderr, flush=True)
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(file=sys.stderr, flush=True)  # the error message gets a line of its own
            raise
        if not self.quiet:
            print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
