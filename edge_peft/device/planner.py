"""Turn ``--memory-budget`` into a plan before a run (micro-batch, accumulation, sequence length) and keep it during one.

A plan fits when ``(predicted peak + overhead) x (1 + margin) <= budget``. ``overhead`` is what the
run measures beyond the model once data and session are loaded (tokenizer, tokenized data); the
margin covers the model's measured error several times over (``docs/memory.md``). Budgeted runs
allocate with ``memory.predictable_memory``, the setting the model was fitted in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError
from ..artifact.manifest import Manifest
from .data import Batch
from .memory_model import MB, Prediction, predict

DEFAULT_MARGIN = 0.15
MIN_USEFUL_SEQ_LEN = 32
_UNITS = {"K": 1024, "KB": 1024, "KIB": 1024, "M": MB, "MB": MB, "MIB": MB, "G": 1024 * MB, "GB": 1024 * MB,
          "GIB": 1024 * MB}


def parse_budget(text: str) -> int:
    """``"512MB"``, ``"1.5GB"`` -> bytes (binary units: 1 MB = 2^20 bytes, as RSS is reported); a unit is required."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match and not unit and float(match.group(1)) > 0:
        raise UserError(f"--memory-budget {text!r} has no unit: write {match.group(1)}MB or {match.group(1)}GB")
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--memory-budget {text!r} is not a memory size: write e.g. 512MB or 2GB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Plan:
    """What fits: ``micro_batch`` rows of up to ``seq_len`` tokens, ``accumulation`` micro-batches per step."""

    budget: int
    margin: float
    batch_size: int
    micro_batch: int
    seq_len: int
    requested_seq_len: int
    prediction: Prediction
    backend: str  # whose memory factors it was planned with
    overhead: int = 0

    @property
    def accumulation(self) -> int:
        return -(-self.batch_size // self.micro_batch)

    def describe(self) -> list[str]:
        """Human-readable lines: the plan, then the predicted breakdown."""
        p = self.prediction
        lines = [f"memory budget {self.budget / MB:.0f} MB, safety margin {self.margin:.0%}: "
                 f"micro-batch {self.micro_batch} x {self.accumulation} accumulation = batch {self.batch_size}, "
                 f"max-seq-len {self.seq_len}"
                 + (f", {self.overhead / MB:.0f} MB measured overhead" if self.overhead else "")
                 + (f" (cut from {self.requested_seq_len})" if self.seq_len < self.requested_seq_len else "")
                 + f", {self.backend} backend",
                 f"predicted peak {p.total / MB:.0f} MB (+{self.margin:.0%} = {p.total * (1 + self.margin) / MB:.0f} MB):"]
        for key, value in p.breakdown().items():
            if key != "total":
                lines.append(f"  {key:<12}{value / MB:8.1f} MB")
        return lines


def _needed(manifest: Manifest, rows: int, width: int, margin: float, overhead: int, backend: str) -> float:
    return (predict(manifest, rows, width, backend).total + overhead) * (1 + margin)


def make_plan(manifest: Manifest, budget: int, batch_size: int, seq_len: int, backend: str,
              margin: float = DEFAULT_MARGIN, micro_batch: int | None = None, overhead: int = 0) -> Plan:
    """The largest micro-batch (up to ``micro_batch`` or ``batch_size``) at the longest sequence that fits
    when ``backend`` trains (each backend has its own fitted memory factors).

    Raises UserError, with the numbers and the cheapest fix, when micro-batch 1 at the shortest useful
    sequence does not fit either. Uses only the manifest: nothing is loaded.
    """
    def needed(rows: int, width: int) -> float:
        return _needed(manifest, rows, width, margin, overhead, backend)

    shortest = min(MIN_USEFUL_SEQ_LEN, seq_len)
    if needed(1, shortest) > budget:
        raise UserError(_refusal(manifest, budget, shortest, margin, overhead, backend))
    width = seq_len
    if needed(1, width) > budget:  # longest width that fits at micro-batch 1
        low, high = shortest, seq_len
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if needed(1, mid) <= budget else (low, mid - 1)
        width = low
    limit = min(micro_batch or batch_size, batch_size)
    rows = max(r for r in range(1, limit + 1) if r == 1 or needed(r, width) <= budget)
    return Plan(budget, margin, batch_size, rows, width, seq_len, predict(manifest, rows, width, backend), backend,
                overhead)


def plan_first_fit(manifest: Manifest, budget: int, batch_size: int, seq_len: int, backends: list[str],
                   margin: float = DEFAULT_MARGIN, micro_batch: int | None = None) -> Plan:
    """``make_plan`` for the first of ``backends`` (preferred first) whose plan keeps the whole ``seq_len``, else for
    the one that keeps the longest sequence (then the largest micro-batch). When none fits at all, the one-line
    refusal of the backend that needs the least. Each backend is planned with its own memory factors."""
    plans, refusals = [], {}
    for backend in backends:
        try:
            plans.append(make_plan(manifest, budget, batch_size, seq_len, backend, margin, micro_batch))
        except UserError as exc:
            refusals[backend] = exc
    if not plans:
        shortest = min(MIN_USEFUL_SEQ_LEN, seq_len)
        raise refusals[min(backends, key=lambda b: _needed(manifest, 1, shortest, margin, 0, b))]
    return next((p for p in plans if p.seq_len == seq_len), max(plans, key=lambda p: (p.seq_len, p.micro_batch)))


def _refusal(manifest: Manifest, budget: int, shortest: int, margin: float, overhead: int, backend: str) -> str:
    p = predict(manifest, 1, shortest, backend)
    items = {**p.breakdown(), "measured overhead": overhead}
    parts = ", ".join(f"{k} {v / MB:.0f}" for k, v in items.items() if k != "total" and v >= MB / 2)
    fixes = []
    if manifest.quantization == "none":
        fixes.append("--quantize int8 at export")
    needed = (p.total + overhead) * (1 + margin) / MB
    fixes.append(f"a --memory-budget of at least {needed:.0f}MB")
    return (f"--memory-budget {budget / MB:.0f} MB cannot be met: micro-batch 1 at {shortest} tokens needs "
            f"{needed:.0f} MB with the {margin:.0%} margin ({parts} MB); try "
            + ", or ".join(fixes))


class BudgetGuard:
    """During a run: split micro-batches that would not fit and learn from the measured RSS."""

    def __init__(self, manifest: Manifest, plan: Plan):
        self.manifest, self.plan = manifest, plan
        self.correction = 0  # bytes the model under-predicted by, as measured in this process

    def fits(self, batch: Batch) -> bool:
        rows, width = batch.input_ids.shape
        needed = _needed(self.manifest, rows, width, self.plan.margin, self.plan.overhead, self.plan.backend)
        return needed + self.correction <= self.plan.budget

    def split(self, batch: Batch) -> list[Batch]:
        """``batch`` as is when it fits, else halves (recursively) down to single rows."""
        rows = batch.input_ids.shape[0]
        if rows == 1 or self.fits(batch):
            return [batch]
        half = (rows + 1) // 2
        return self.split(batch.rows(0, half)) + self.split(batch.rows(half, rows))

    def observe(self, parts: list[Batch], peak: int) -> bool:
        """Compare the measured peak RSS with the prediction for the step's largest part; True if corrected."""
        predicted = max(predict(self.manifest, *p.input_ids.shape, self.plan.backend).total
                        for p in parts) + self.plan.overhead
        if peak > predicted + self.correction:
            self.correction = peak - predicted
            return True
        return False
