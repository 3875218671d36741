"""The training backend interface the device loop depends on, and the ORT training-API backend.

The loop, the budget planner and sync talk only to ``TrainingBackend``: a second backend (the
portable training-step graph) implements the same few methods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import UserError
from ..manifest import Manifest
from .channels import a_name, b_name, gate, ungate
from .data import Batch
from .ort_api import quiet_logs, session_options, training_api, training_api_installed


class TrainingBackend(Protocol):
    """What the device loop needs from a backend. One optimizer step is ``start_step(lr)``, then
    ``forward_backward`` per micro-batch, then ``optimizer_step()``."""

    def start_step(self, lr: float) -> None:
        """Begin an optimizer step at learning rate ``lr`` (no gradients accumulated yet)."""

    def forward_backward(self, batch: Batch, scale: float = 1.0) -> float:
        """Mean loss of ``batch``; ``scale`` times its gradient is added to the accumulated one."""

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients with AdamW and clear them."""

    def eval_loss(self, batch: Batch) -> float:
        """Loss of ``batch`` without touching gradients or weights."""

    def trainable(self) -> dict[str, np.ndarray]:
        """Current trainable tensors by ONNX name (copies)."""

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite trainable tensors by name."""

    def frozen(self, name: str) -> np.ndarray:
        """A frozen tensor by name (a copy)."""

    def gradients(self, names: list[str]) -> dict[str, np.ndarray]:
        """Gradients accumulated so far in this step, by name (read between backward and the update)."""

    def gate_channels(self, gains: dict[str, np.ndarray]) -> None:
        """Scale rank channels for this step (``gains``: module -> a float per channel; call before the
        first ``forward_backward``): channel k adds ``gains[k]`` times its update to the forward pass, as
        if the module's ``alpha / r`` were that much larger (exact when A is frozen; a trained A takes
        its AdamW step on the scaled rows, see ``channels.ungate``). Gain-0 channels sit the step out:
        they keep their values through ``optimizer_step`` and their AdamW moments decay as for a zero
        gradient."""

    def save_state(self, path: Path, include_optimizer: bool = True) -> None:
        """Write the training state (weights, and AdamW moments and step unless told not) to ``path``."""


class OrtTrainingBackend:
    """ONNX Runtime's on-device training API (``onnxruntime-training-cpu==1.19.2``)."""

    def __init__(self, artifact: Path, manifest: Manifest, state_path: Path | None = None, threads: int = 0):
        api = training_api()
        quiet_logs()
        self._api = api
        self.manifest = manifest
        options = session_options(threads)
        options.enable_cpu_mem_arena = False  # arena growth is step-shaped (up to +60 % RSS on a causal LM); malloc is linear and predictable
        self.state = api.CheckpointState.load_checkpoint(os.fspath(state_path or artifact / "checkpoint"))
        self.module = api.Module(os.fspath(artifact / "training_model.onnx"), self.state,
                                 os.fspath(artifact / "eval_model.onnx"), session_options=options)
        self.optimizer = api.Optimizer(os.fspath(artifact / "optimizer_model.onnx"), self.module)
        self.names = [name for name, param in self.state.parameters if param.requires_grad]
        self._gated: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # name -> (old, gated, gains)

    def _inputs(self, batch: Batch, scale: float) -> list[np.ndarray]:
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                 "labels": batch.labels.reshape(-1), "loss_scale": np.array(scale, dtype=np.float32)}
        return [feeds[name] for name in self.module.input_names()]

    def forward_backward(self, batch: Batch, scale: float = 1.0) -> float:
        self.module.train()
        return float(self.module(*self._inputs(batch, scale))) / scale

    def start_step(self, lr: float) -> None:
        self.optimizer.set_learning_rate(float(lr))

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.module.lazy_reset_grad()
        for name, (old, gated, gains) in self._gated.items():
            self.state.parameters[name] = ungate(old, gated, self.state.parameters[name].data, name, gains)
        self._gated = {}

    def gate_channels(self, gains: dict[str, np.ndarray]) -> None:
        """Write the gated A (frozen or not: the checkpoint state holds both) and B for the step: gain-0
        channels then have exactly zero contribution and gradients; ``optimizer_step`` ungates."""
        for module, g in gains.items():
            for name in (b_name(module), a_name(module)):
                old = np.array(self.state.parameters[name].data, copy=True)
                self._gated[name] = (old, gate(old, name, g), g)
                self.state.parameters[name] = self._gated[name][1]

    def eval_loss(self, batch: Batch) -> float:
        self.module.eval()
        return float(self.module(*self._inputs(batch, 1.0)))

    def trainable(self) -> dict[str, np.ndarray]:
        return {name: np.array(self.state.parameters[name].data, copy=True) for name in self.names}

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            self.state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)

    def frozen(self, name: str) -> np.ndarray:
        return np.array(self.state.parameters[name].data, copy=True)

    def gradients(self, names: list[str]) -> dict[str, np.ndarray]:
        """Accumulated gradients of trainable tensors (read between backward and the optimizer step)."""
        return {name: np.array(self.state.parameters[name].grad, copy=True) for name in names}

    def save_state(self, path: Path, include_optimizer: bool = True) -> None:
        self._api.CheckpointState.save_checkpoint(self.state, os.fspath(path), include_optimizer_state=include_optimizer)


BACKEND_CHOICES = ("auto", "ort", "portable")


def resolve_backend(manifest: Manifest, backend: str = "auto", state_path: Path | None = None) -> str:
    """``ort`` or ``portable``: ``auto`` takes ORT's training API where it is installed and the artifact
    carries its graphs, else the portable graph; a run's saved state decides when resuming."""
    from .portable_backend import is_portable_state

    if backend not in BACKEND_CHOICES:
        raise UserError(f"--backend {backend} is not supported: use {', '.join(BACKEND_CHOICES)}")
    if state_path is not None and state_path.exists():
        saved = "portable" if is_portable_state(state_path) else "ort"
        if backend not in ("auto", saved):
            raise UserError(f"the run's checkpoint was written by the {saved} backend: resume with --backend {saved}")
        return saved
    if backend == "auto":
        return "ort" if "ort-training" in manifest.backends and training_api_installed() else "portable"
    return backend


def open_backend(artifact: Path, manifest: Manifest, state_path: Path | None = None, threads: int = 0,
                 backend: str = "auto", provider: str = "CPUExecutionProvider") -> TrainingBackend:
    """The training backend for ``artifact`` (``resolve_backend`` picks which)."""
    from .portable_backend import PortableBackend

    backend = resolve_backend(manifest, backend, state_path)
    carried = {"ort": "ort-training", "portable": "portable"}[backend]
    if carried not in manifest.backends:
        raise UserError(f"{artifact} carries no {carried} training graphs (it has {', '.join(manifest.backends)}): "
                        f"re-export with `edge-peft export --backend {backend}` or pick another --backend")
    if backend == "ort":
        return OrtTrainingBackend(artifact, manifest, state_path, threads)
    return PortableBackend(artifact, manifest, state_path, threads, provider)
