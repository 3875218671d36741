"""What a run directory says about its training: per-step records, the plan's memory figures, the summary.

Reads ``metrics.jsonl`` again on every call, so a run still training reports the steps done so far; a last
line the trainer is still writing (no newline yet) is left for the next read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifact.files import METRICS, RUN_INFO, SUMMARY
from ..errors import UserError


@dataclass(frozen=True)
class RunData:
    """A run's per-step records and the figures its charts are drawn against."""

    records: list[dict[str, Any]]
    summary: dict[str, Any] | None  # None while the run is still training
    plan: dict[str, Any] | None  # run.json's memory plan (None without --memory-budget)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def series(self, key: str) -> tuple[list[int], list[float | int]]:
        """(steps, values) of the records that hold ``key`` with a finite number."""
        pairs = [(r["step"], r[key]) for r in self.records
                 if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [s for s, _ in pairs], [v for _, v in pairs]


def read_run(run: Path) -> RunData:
    """Read ``run``; UserError naming the file and the fix when it is not a run directory or a line is bad."""
    metrics = run / METRICS
    if not run.is_dir():
        raise UserError(f"{run} is not a directory: pass a run directory written by `edge-peft train`")
    if not metrics.is_file():
        raise UserError(f"{run} has no {METRICS} yet: pass a run directory written by `edge-peft train` "
                        "(the file appears after its first step)")
    text = metrics.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # the trainer is writing this line right now
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{metrics} line {number} is not JSON ({exc}): the file was edited or damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{metrics} line {number} has no integer 'step': the file was edited or damaged")
        records.append(record)
    info = _json_or_none(run / RUN_INFO) or {}
    return RunData(records, _json_or_none(run / SUMMARY), info.get("plan"), info.get("config") or {})


def _json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise UserError(f"{path} is not JSON ({exc}): the file was edited or damaged") from None
    return value if isinstance(value, dict) else None
