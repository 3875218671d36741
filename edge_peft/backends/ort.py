"""The ``ort`` backend: ONNX Runtime's on-device training API (``onnxruntime-training-cpu==1.19.2``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..adapters.channels import gate, ungate
from ..artifact.files import ORT_CHECKPOINT, ORT_EVAL_MODEL, ORT_OPTIMIZER_MODEL, ORT_TRAINING_MODEL
from ..artifact.manifest import Manifest
from ..artifact.names import ATTENTION_MASK, INPUT_IDS, LABELS, LOSS_SCALE, a_name, b_name
from .base import MemoryFactors
from .names import ORT
from .runtime import quiet_logs, session_options, training_api, training_api_installed

if TYPE_CHECKING:
    from ..artifact.memory_section import MemoryFigures
    from ..device.data import Batch

MB = 1024 * 1024
CHECKPOINT_MAGIC = b"ODTC"  # the flatbuffer file identifier of ORT training checkpoints (bytes 4-8)
# Nodes of a Llama-shaped block in the training graph (all linear projections adapted), fitted to the counts of
# SmolLM2-135M, a 0.5 B Llama and a 2-layer one: the block, what checkpointing adds (the recomputed forward), what an
# int4 base adds; the rest (embedding, and the chunked loss with its head slices dequantized at each read). The
# block's count includes the 15 nodes of its attention probabilities' recompute (``recompute_attention``).
BLOCK_NODES, CHECKPOINT_NODES, INT4_NODES, OUTER_NODES = 395, 210, 170, 1580


class OrtTrainingBackend:
    """``TrainingBackend`` over ORT's ``Module``/``Optimizer``/``CheckpointState``."""

    name = ORT
    # Fit of benchmarks/calibration/memory_ort.json, 2026-12-02 (arena off, no memory reuse, memory pattern off as
    # under a budget, predictable_memory, 2 threads; graphs dequantizing at each use, a quantized LM head read in
    # vocabulary slices, weight gradients accumulated in the backward's order; the SmolLM2 and 0.5 B ones also
    # recomputing attention probabilities): 39 points, MiniLM and a 4-layer GPT-2 to SmolLM2-135M and 0.5 B.
    memory_factors = MemoryFactors(runtime=int(43.6 * MB), session=int(34.0 * MB), weight_load=1.104,
                                   node_load=8751.0, step=int(2.2 * MB), dequant=0.966, token=0.832,
                                   block_input=1.061, score=0.901, logit=2.824, chunked_logit=0.184,
                                   dequantized_head=0.041, int4_block=0)

    def __init__(self, artifact: Path, manifest: Manifest, state_path: Path | None = None, threads: int = 0,
                 provider: str = "CPUExecutionProvider", low_memory: bool = False):
        api = training_api()
        quiet_logs()
        self._api = api
        self.manifest = manifest
        options = session_options(threads)
        options.enable_cpu_mem_arena = False  # arena growth is step-shaped; malloc is linear and predictable
        # ORT's planner keeps a freed tensor's buffer for a later tensor of the same size (a forward activation
        # for its recomputed copy in the backward): without the arena that holds it the whole way.
        options.enable_mem_reuse = False
        # ORT's memory pattern lays the step's tensors out in blocks planned from the first run: without reuse those
        # hold more than the live tensors (most for an int4 base's dequantizations), but spare a page fault per
        # tensor. Off under a memory budget, on otherwise (docs/memory.md, "The ORT memory model at scale").
        options.enable_mem_pattern = not low_memory
        self.state = api.CheckpointState.load_checkpoint(os.fspath(state_path or artifact / ORT_CHECKPOINT))
        self.module = api.Module(os.fspath(artifact / ORT_TRAINING_MODEL), self.state,
                                 os.fspath(artifact / ORT_EVAL_MODEL), session_options=options)
        self.optimizer = api.Optimizer(os.fspath(artifact / ORT_OPTIMIZER_MODEL), self.module)
        self.names = [name for name, param in self.state.parameters if param.requires_grad]
        self._gated: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # name -> (old, gated, gains)

    # -- the backend as a kind ----------------------------------------------------------------
    @classmethod
    def installed(cls) -> bool:
        return training_api_installed()

    @classmethod
    def chunked_loss(cls, loss_chunks: int) -> bool:
        return loss_chunks > 0

    @classmethod
    def head_slices(cls, loss_chunks: int, memory: MemoryFigures | None = None) -> int:
        if memory is not None:  # an artifact exported before the head was sliced read it whole (0)
            return max(memory.head_slices, 1)
        return max(loss_chunks, 1)  # each chunk of the loss reads the head a vocabulary slice at a time

    @classmethod
    def graph_nodes(cls, memory: MemoryFigures) -> int:
        return memory.train_nodes

    @classmethod
    def estimated_nodes(cls, layers: int, checkpointing: bool, int4: bool) -> int:
        return layers * (BLOCK_NODES + CHECKPOINT_NODES * checkpointing + INT4_NODES * int4) + OUTER_NODES

    @classmethod
    def frozen_bytes(cls, memory: MemoryFigures) -> int:
        return memory.frozen_bytes

    @classmethod
    def owns_state(cls, path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                return fh.read(8)[4:8] == CHECKPOINT_MAGIC
        except OSError:
            return False

    @classmethod
    def initial_trainable(cls, artifact: Path, manifest: Manifest) -> dict[str, np.ndarray]:
        state = training_api().CheckpointState.load_checkpoint(os.fspath(artifact / ORT_CHECKPOINT))
        return {name: np.array(p.data) for name, p in state.parameters if p.requires_grad}

    @classmethod
    def write_initial_trainable(cls, artifact: Path, manifest: Manifest, tensors: dict[str, np.ndarray]) -> list[str]:
        """Written through a live training session (writing into a bare loaded ``CheckpointState`` crashes
        ORT 1.19.2); the checkpoint is replaced atomically."""
        backend = cls(artifact, manifest, threads=1)
        names = [n for n in backend.names if n in tensors]
        backend.set_trainable({n: tensors[n] for n in names})
        tmp = artifact / f".{ORT_CHECKPOINT}.tmp"
        backend.save_state(tmp, include_optimizer=False)
        os.replace(tmp, artifact / ORT_CHECKPOINT)
        return names

    # -- training -----------------------------------------------------------------------------
    def _inputs(self, batch: "Batch", scale: float) -> list[np.ndarray]:
        feeds = {INPUT_IDS: batch.input_ids, ATTENTION_MASK: batch.attention_mask,
                 LABELS: batch.labels.reshape(-1), LOSS_SCALE: np.array(scale, dtype=np.float32)}
        return [feeds[name] for name in self.module.input_names()]

    def forward_backward(self, batch: "Batch", scale: float = 1.0) -> float:
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

    def eval_loss(self, batch: "Batch") -> float:
        self.module.eval()
        return float(self.module(*self._inputs(batch, 1.0)))

    # -- tensors by name ----------------------------------------------------------------------
    def trainable(self) -> dict[str, np.ndarray]:
        return {name: np.array(self.state.parameters[name].data, copy=True) for name in self.names}

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            self.state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)

    def frozen(self, name: str) -> np.ndarray:
        return np.array(self.state.parameters[name].data, copy=True)

    def gradients(self, names: list[str]) -> dict[str, np.ndarray]:
        return {name: np.array(self.state.parameters[name].grad, copy=True) for name in names}

    def clear_gradients(self) -> None:
        self.module.lazy_reset_grad()

    def set_gradients(self, tensors: dict[str, np.ndarray]) -> None:
        """Written in place: a parameter's ``grad`` is a view of the buffer the optimizer reads."""
        for name, value in tensors.items():
            np.copyto(self.state.parameters[name].grad, value)

    def save_state(self, path: Path, include_optimizer: bool = True) -> None:
        self._api.CheckpointState.save_checkpoint(self.state, os.fspath(path), include_optimizer_state=include_optimizer)
