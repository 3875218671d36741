"""Training backends behind one interface (``base.TrainingBackend``), chosen by name (``names``).

Callers ask this package which backend trains an artifact (``resolve``), open it (``open_backend``)
and read or write an artifact's initial trainable tensors; nothing outside compares backend names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact.manifest import Manifest
from ..errors import UserError
from .base import MemoryFactors, TrainingBackend
from .compute import FP32
from .names import AUTO, BACKENDS, ORT, PORTABLE, TRAIN_CHOICES


def backend_class(name: str) -> type[TrainingBackend]:
    """The class of backend ``name`` (imported lazily: ``ort`` needs onnxruntime-training only when used)."""
    if name == ORT:
        from .ort import OrtTrainingBackend

        return OrtTrainingBackend
    if name == PORTABLE:
        from .portable import PortableBackend

        return PortableBackend
    raise UserError(f"backend {name!r} is not supported: use one of {', '.join(BACKENDS)}")


def memory_factors(name: str) -> MemoryFactors:
    return backend_class(name).memory_factors


def candidates(manifest: Manifest, choice: str = AUTO, state_path: Path | None = None) -> list[str]:
    """The backends that may train ``manifest``'s artifact, preferred first: the one that wrote a run's saved state
    when resuming, ``choice`` when it names one; for ``auto`` every carried backend whose runtime is installed
    (ORT's training API before the portable graph), or the portable one when none is."""
    if choice not in TRAIN_CHOICES:
        raise UserError(f"--backend {choice} is not supported: use {', '.join(TRAIN_CHOICES)}")
    if state_path is not None and state_path.exists():
        saved = next((b for b in BACKENDS if backend_class(b).owns_state(state_path)), None)
        if saved is None:
            raise UserError(f"{state_path} is not a training state of any backend: start the run again without --resume")
        if choice not in (AUTO, saved):
            raise UserError(f"the run's checkpoint was written by the {saved} backend: resume with --backend {saved}")
        return [saved]
    if choice == AUTO:
        return [b for b in BACKENDS if b in manifest.backends and backend_class(b).installed()] or [PORTABLE]
    return [choice]


def resolve(manifest: Manifest, choice: str = AUTO, state_path: Path | None = None) -> str:
    """The backend that trains ``manifest``'s artifact without a memory budget: the first of ``candidates``."""
    return candidates(manifest, choice, state_path)[0]


def open_backend(artifact: Path, manifest: Manifest, state_path: Path | None = None, threads: int = 0,
                 choice: str = AUTO, provider: str = "CPUExecutionProvider", compute: str = FP32,
                 low_memory: bool = False) -> TrainingBackend:
    """The training backend for ``artifact`` (``resolve`` picks which); ``compute`` int8 (portable only: see
    ``compute.choose_compute``) opens its int8-product step graph; ``low_memory`` (a run under a memory budget)
    trades step time for a lower peak where the backend has such a choice (ORT's memory pattern)."""
    name = resolve(manifest, choice, state_path)
    if name not in manifest.backends:
        raise UserError(f"{artifact} carries no {name} training graphs (it has {', '.join(manifest.backends)}): "
                        f"re-export with `edge-peft export --backend {name}` or pick another --backend")
    if name == PORTABLE:
        return backend_class(name)(artifact, manifest, state_path, threads, provider, compute)
    return backend_class(name)(artifact, manifest, state_path, threads, provider, low_memory)


def initial_trainable(artifact: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The trainable tensors a fresh run of ``artifact`` starts from, read by a carried, installed backend."""
    return backend_class(resolve(manifest)).initial_trainable(artifact, manifest)


def write_initial_trainable(artifact: Path, manifest: Manifest, tensors: dict[str, np.ndarray]) -> list[str]:
    """Write the named trainable tensors into every backend's initial state the artifact carries."""
    names: list[str] = []
    for name in manifest.backends:
        names = backend_class(name).write_initial_trainable(artifact, manifest, tensors)
    return names


__all__ = ["TrainingBackend", "backend_class", "initial_trainable", "memory_factors", "open_backend", "resolve",
           "write_initial_trainable"]
