"""The memory budget as a loop callback: record what RSS exceeds the model by, split micro-batches that
would not fit the plan, and learn from the measured peak (``planner.BudgetGuard``)."""

from __future__ import annotations

from .data import Batch
from .loop import Callback
from .memory import MB, peak_rss
from .planner import BudgetGuard


class MemoryWatch(Callback):
    """Adds ``notes`` (the measured overhead, a re-plan) to the first step's record; with a ``guard``, splits
    each step's micro-batches to fit and records splits and corrections."""

    def __init__(self, guard: BudgetGuard | None, notes: dict):
        self.guard, self._notes = guard, dict(notes)
        self._parts: list[Batch] = []
        self._peak_before = 0

    def on_batches(self, step: int, parts: list[Batch]) -> list[Batch]:
        self._peak_before = peak_rss()
        if self.guard is not None:
            parts = [q for p in parts for q in self.guard.split(p)]
        self._parts = parts
        return parts

    def on_step_end(self, step: int, record: dict) -> None:
        record.update(self._notes)
        self._notes = {}
        if self.guard is None:
            return
        plan = self.guard.plan
        if len(self._parts) > plan.accumulation:
            record["memory_split"] = len(self._parts) - plan.accumulation
        peak = peak_rss()
        if peak > self._peak_before and self.guard.observe(self._parts, peak):
            record["memory_correction_mb"] = round(self.guard.correction / MB, 1)
