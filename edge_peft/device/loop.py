"""The training loop, given its collaborators (after mlx-lm's ``train(model, optimizer, train_set, val_set,
args, loss, iterate_batches, training_callback)``): a backend, step hooks, a function giving each step's
micro-batches, an evaluation function, a learning-rate schedule and callbacks. It owns nothing else:
memory budgets, metrics, progress and checkpoints are callbacks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ..artifact.manifest import IGNORE_INDEX
from ..backends import TrainingBackend
from ..errors import UserError
from .data import Batch
from .hooks import StepHooks
from .memory import MB, current_rss, peak_rss
from .run_dir import Totals


class Callback:
    """Called around every optimizer step; override what you need (every method is a no-op here)."""

    def on_train_begin(self, step: int, eval_loss: float | None) -> None:
        """Before step ``step`` runs; ``eval_loss`` is the held-out loss before training (None when not scored)."""

    def on_batches(self, step: int, parts: list[Batch]) -> list[Batch]:
        """The step's micro-batches, before they run (a memory budget may split them further)."""
        return parts

    def on_step_end(self, step: int, record: dict) -> None:
        """``record`` is the step's metrics line (``step``, ``loss``, ``lr``, ...); callbacks may add to it,
        in order."""

    def on_train_end(self) -> None:
        """After the last step, also when training stops on an exception."""


@dataclass(frozen=True)
class Schedule:
    """How long to train and when to evaluate (0: never; the last step always evaluates when > 0)."""

    steps: int
    eval_every: int


def targets(batch: Batch) -> int:
    """Number of loss targets in a batch (tokens with a label, or rows for classification)."""
    if batch.labels.ndim == 2:
        return int((batch.labels != IGNORE_INDEX).sum())
    return int(batch.labels.shape[0])


def train_step(backend: TrainingBackend, hooks: StepHooks, parts: list[Batch], lr: float,
               step: int) -> tuple[float, int, int]:
    """One optimizer step over ``parts`` (each weighted by its share of the step's targets);
    returns (loss, tokens, samples)."""
    weights = [targets(p) for p in parts]
    total = sum(weights) or 1
    loss, tokens, samples = 0.0, 0, 0
    backend.start_step(lr)
    hooks.before_step(step)
    for part, weight in zip(parts, weights):
        if weight == 0:
            continue
        share = weight / total
        try:
            loss += share * backend.forward_backward(part, share)
        except (MemoryError, RuntimeError) as exc:  # onnxruntime's allocation failures are RuntimeErrors
            if not _out_of_memory(exc):
                raise
            rows, width = part.input_ids.shape
            raise UserError(f"step {step} ran out of memory on a micro-batch of {rows} x {width} tokens: set "
                            "--memory-budget (it plans micro-batch and sequence length) or a smaller "
                            "--micro-batch-size / --max-seq-len") from None
        tokens += part.tokens
        samples += part.input_ids.shape[0]
    hooks.after_backward(step)
    backend.optimizer_step()
    hooks.after_update(step)
    return loss, tokens, samples


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "bad_alloc" in text or "Failed to allocate" in text


StepFn = Callable[[TrainingBackend, StepHooks, list[Batch], float, int], tuple[float, int, int]]


def train(backend: TrainingBackend, hooks: StepHooks, batches: Callable[[int], list[Batch]],
          evaluate: Callable[[], float | None], lr_at: Callable[[int], float], schedule: Schedule,
          callbacks: Sequence[Callback] = (), start: int = 0, totals: Totals | None = None,
          step_fn: StepFn = train_step) -> Totals:
    """Train from step ``start`` to ``schedule.steps`` with ``step_fn`` (``train_step``, or DP-SGD's step from
    ``privacy.dp_step``); returns the updated totals."""
    totals = totals or Totals()
    try:
        for step in range(start, schedule.steps):
            parts = batches(step)
            for callback in callbacks:
                parts = callback.on_batches(step, parts)
            began = time.perf_counter()
            loss, tokens, samples = step_fn(backend, hooks, parts, lr_at(step), step)
            if not math.isfinite(loss):
                raise UserError(f"step {step} has loss {loss}: training diverged and stopped; the last good "
                                "checkpoint is kept: lower --lr and start again (or --resume from it)")
            elapsed = time.perf_counter() - began
            totals.samples += samples
            totals.tokens += tokens
            totals.wall_s += elapsed
            record = {"step": step, "loss": round(loss, 6), "lr": lr_at(step),
                      "tokens_per_s": round(tokens / elapsed, 1), "rss_mb": round(current_rss() / MB, 1),
                      "peak_rss_mb": round(peak_rss() / MB, 1), **hooks.metrics(step)}
            done = step + 1
            if schedule.eval_every and (done % schedule.eval_every == 0 or done == schedule.steps):
                record["eval_loss"] = evaluate()
            for callback in callbacks:
                callback.on_step_end(step, record)
    finally:
        for callback in callbacks:
            callback.on_train_end()
    return totals
