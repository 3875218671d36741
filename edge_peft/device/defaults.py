"""Per-task defaults of `edge-peft train` (learning rate, sequence length, steps), used where the user gave none.

The values come from the measured sweep in ``docs/defaults.md`` (``benchmarks/default_sweep.py``): the
bundled classifier task (all-MiniLM-L6-v2 on BBC News topics) and a causal LM (SmolLM2-135M-Instruct on
BBC News prose), LoRA-FA rank 8 on an int8 base.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer import TrainConfig


@dataclass(frozen=True)
class TaskDefaults:
    lr: float
    max_seq_len: int
    steps: int


TASK_DEFAULTS = {
    "sequence-classification": TaskDefaults(lr=1e-2, max_seq_len=128, steps=60),
    "causal-lm": TaskDefaults(lr=2e-2, max_seq_len=256, steps=200),
}


def with_task_defaults(config: "TrainConfig", task: str, artifact_seq_len: int) -> tuple["TrainConfig", dict]:
    """``config`` with every unset (None) default-bearing field filled for ``task``; and what was filled.

    The sequence-length default never exceeds the artifact's own maximum."""
    defaults = TASK_DEFAULTS[task]
    filled = {}
    for f in fields(TaskDefaults):
        if getattr(config, f.name) is None:
            value = getattr(defaults, f.name)
            filled[f.name] = min(value, artifact_seq_len) if f.name == "max_seq_len" else value
    return replace(config, **filled), filled


def describe(task: str, filled: dict) -> str:
    """One line naming the defaults a run took, as the options that would set them."""
    options = ", ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in filled.items())
    return f"defaults for a {task} artifact: {options} (measured in docs/defaults.md; pass an option to change it)"
