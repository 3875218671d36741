"""edge-peft: personalise models on the device with LoRA-FA adapters and ONNX Runtime training.

The Python API (the command line calls the same functions)::

    import edge_peft
    manifest = edge_peft.export("my-model", "artifact", rank=8, quantize="int8")    # workstation: needs torch
    summary = edge_peft.train("artifact", "notes.jsonl", "run", steps=200, lr=5e-3)  # device: no torch
    edge_peft.Predictor("run").generate("Dear team,")                               # or .classify([...])
    edge_peft.save_adapter("run", "my-adapter")                                      # Hugging Face PEFT format
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .artifact.manifest import Manifest
    from .device.inference import Predictor


def export(model_dir: str | Path, out: str | Path, *, overwrite: bool = False, quiet: bool = True,
           **options: Any) -> "Manifest":
    """Export a Hugging Face model directory to an artifact; ``options`` are ``exporter.pipeline.ExportOptions``
    fields (rank, alpha, quantize, variant, targets, layers, labels, max_seq_len, backend, ...)."""
    from .exporter.pipeline import ExportOptions, export_artifact

    return export_artifact(model_dir, out, ExportOptions(**options), quiet=quiet, overwrite=overwrite)


def train(artifact: str | Path, data: str | Path, out: str | Path, *, resume: bool = False, progress: bool = False,
          **options: Any) -> dict:
    """Train an artifact's adapters on ``data`` into the run directory ``out``; returns the run's summary.
    ``options`` are ``device.trainer.TrainConfig`` fields (steps, batch_size, lr, memory_budget, backend, ...).
    Sets the process's allocator up for the run (``device.memory.configure_allocator``): call once per process."""
    from .device.memory import configure_allocator
    from .device.trainer import TrainConfig, open_run

    config = TrainConfig(data=str(data), **options)
    configure_allocator(budgeted=bool(config.memory_budget))
    return open_run(artifact, config, out, resume=resume).run(progress=progress)


def save_adapter(run: str | Path, out: str | Path, rank: int | None = None) -> Path:
    """Write a run's adapter as a Hugging Face PEFT directory (``rank``: a nested-rank run's rank-k adapter)."""
    from .device.adapter_io import save_run_adapter

    return save_run_adapter(run, out, rank)


def load_manifest(artifact: str | Path) -> "Manifest":
    """The validated manifest of an artifact (or run) directory."""
    from .artifact.manifest import load_manifest as load

    return load(artifact)


def __getattr__(name: str) -> Any:
    if name == "Predictor":  # imported on first use: it loads onnxruntime
        from .device.inference import Predictor

        return Predictor
    raise AttributeError(f"module 'edge_peft' has no attribute {name!r}")


__all__ = ["Predictor", "export", "load_manifest", "save_adapter", "train"]
