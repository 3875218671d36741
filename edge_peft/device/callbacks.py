"""The loop's standard callbacks: the metrics log, the progress bar and checkpoints (memory: ``budget.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from ..artifact.files import METRICS
from .loop import Callback


class MetricsLog(Callback):
    """Appends each step's record to ``metrics.jsonl`` (flushed every step)."""

    def __init__(self, run: Path):
        self._file = (run / METRICS).open("a")

    def on_step_end(self, step: int, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self) -> None:
        self._file.close()


class ProgressBar(Callback):
    """A tqdm bar on stderr with loss, tokens/s and peak RSS."""

    def __init__(self, total: int, initial: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, file=sys.stderr, unit="step", dynamic_ncols=True)

    def on_train_begin(self, step: int, eval_loss: float | None) -> None:
        if eval_loss is not None:
            self._bar.write(f"held-out loss before training: {eval_loss:.4f}", file=sys.stderr)

    def on_step_end(self, step: int, record: dict) -> None:
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                              peak=f"{record['peak_rss_mb']:.0f}MB", refresh=False)
        self._bar.update(1)

    def on_train_end(self) -> None:
        self._bar.close()


class Checkpoints(Callback):
    """Calls ``save(done, loss, eval_loss)`` every ``every`` steps and after the last one."""

    def __init__(self, every: int, steps: int, save: Callable[[int, float, float | None], None]):
        self.every, self.steps, self.save = every, steps, save
        self.eval_loss: float | None = None

    def on_step_end(self, step: int, record: dict) -> None:
        self.eval_loss = record.get("eval_loss", self.eval_loss)
        done = step + 1
        if (self.every and done % self.every == 0) or done == self.steps:
            self.save(done, record["loss"], self.eval_loss)
