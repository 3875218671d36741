"""``--layers auto:N``: choose the N blocks to adapt by a short probe on the user's data.

The probe exports the model with adapters on every block, runs a few steps of the device loop and
scores each block by the mean squared norm of its adapters' gradients: a first-order estimate of
how much the loss can move by adapting that block (the Fisher information of its adapter at the
start). The N best blocks are then exported for real.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..artifact.files import LAYER_PROBE
from ..artifact.manifest import Manifest
from ..artifact.names import is_b, layer_index
from ..device.trainer import TrainConfig, open_run
from ..errors import UserError
from ..fileio import atomic_write_json
from .pipeline import ExportOptions, export_artifact


class GradientProbe:
    """Step hook: accumulates squared gradient norms of every B, per block."""

    def __init__(self, backend):
        self.backend = backend
        self.names = [n for n in backend.names if is_b(n)]
        self.scores: dict[int, float] = {}
        self.steps = 0

    def before_step(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        for name, grad in self.backend.gradients(self.names).items():
            block = layer_index(name)
            self.scores[block] = self.scores.get(block, 0.0) + float(np.square(grad).sum())
        self.steps += 1

    def after_update(self, step: int) -> None:
        pass

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        pass


def probe_layers(model_dir: str | Path, data: str | Path, opts: ExportOptions, steps: int = 8,
                 batch_size: int = 8) -> dict[int, float]:
    """Block index -> importance (mean squared adapter-gradient norm over ``steps`` probe steps)."""
    work = Path(tempfile.mkdtemp(prefix="edge-peft-probe-"))
    try:
        export_artifact(model_dir, work / "artifact", replace(opts, layers=None), quiet=True)
        config = TrainConfig(data=str(data), steps=steps, batch_size=batch_size, lr=1e-3, eval_fraction=0.0,
                             eval_every=0, checkpoint_every=0)
        run = open_run(work / "artifact", config, work / "run", extra_hooks={"probe": GradientProbe})
        probe = run.hooks["probe"]
        for step in range(steps):
            run.train_step(step)
        return {block: score / probe.steps for block, score in sorted(probe.scores.items())}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_best_layers(model_dir: str | Path, out: str | Path, opts: ExportOptions, count: int, data: str | Path | None,
                       steps: int = 8, overwrite: bool = False) -> Manifest:
    """Probe, keep the ``count`` most important blocks, export them; ``layer_probe.json`` records why."""
    if data is None:
        raise UserError("--layers auto:N probes your data: pass --probe-data FILE (the training .jsonl/.txt)")
    scores = probe_layers(model_dir, data, opts, steps)
    if count > len(scores):
        raise UserError(f"--layers auto:{count} asks for more blocks than the model's {len(scores)}")
    best = sorted(sorted(scores, key=lambda b: -scores[b])[:count])
    manifest = export_artifact(model_dir, out, replace(opts, layers=",".join(map(str, best))), overwrite=overwrite)
    atomic_write_json(Path(out) / LAYER_PROBE, {"steps": steps, "importance": {str(b): s for b, s in scores.items()},
                                                       "chosen": best})
    return manifest
