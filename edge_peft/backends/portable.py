"""The portable training backend: the artifact's training-step graph on plain, current onnxruntime.

No ``onnxruntime-training`` and no torch: frozen weights are initializers of ``portable_step.onnx``
(int8 behind ``DequantizeLinear``); the trainable tensors, their AdamW moments and the step live here
as numpy arrays and are fed in each call. Every micro-batch runs the one graph, which returns the
gradients accumulated so far; the step's update is AdamW in numpy (``adamw.py``), with the weight decay and
clipping the manifest records. State files are safetensors with the step in the header.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from ..adapters.channels import copy_channels, gate, ungate
from ..artifact.files import PORTABLE_INITIAL_STATE, PORTABLE_INT8_STEP_MODEL, PORTABLE_PIECES, PORTABLE_STEP_MODEL
from ..artifact.manifest import ADAMW_BETAS, Manifest
from ..artifact.names import (ATTENTION_MASK, BATCH_INPUTS, INPUT_IDS, LABELS, LOSS, LOSS_SCALE, a_name,
                              accumulated, b_name, moment_names, updated)
from ..errors import UserError
from ..fileio import atomic_write_bytes
from ..variants import lora_a_from_seed
from .adamw import adamw_step
from .base import MemoryFactors
from .compute import FP32, INT8
from .names import PORTABLE
from .pieces import PieceSession
from .runtime import onnxruntime_module, quiet_logs, session_options

if TYPE_CHECKING:
    from ..artifact.memory_section import MemoryFigures
    from ..device.data import Batch

MB = 1024 * 1024
STATE_FORMAT = "edge-peft-portable-state-1"
# ConstantFolding would run DequantizeLinear once at load and keep fp32 copies of the int8 weights; the
# transpose optimizer would push the weights' transposes through DequantizeLinear as uint8 Q/DQ pairs,
# which ORT 1.19 rejects for int8.
DISABLED_OPTIMIZERS = ["ConstantFolding", "TransposeOptimizer"]
# Nodes of a Llama-shaped block in the step graph (all linear projections adapted), counted on SmolLM2-135M and a
# 1 B Llama: the block itself, what an int4 base adds (unpacking at each use); the embedding, LM head and loss.
BLOCK_NODES, INT4_BLOCK_NODES, OUTER_NODES = 470, 86, 600
# A checkpointed step runs as its pieces (exporter/portable_pieces.py), whatever the depth: two variants of a
# block's forward and backward (each recomputing the mask and positions the stitched step shares), what an int4
# base adds to them, and the prologue and tail; counted on SmolLM2-135M.
PIECE_BLOCK_NODES, PIECE_INT4_NODES, PIECE_OUTER_NODES = 722, 156, 517


class PortableBackend:
    """``TrainingBackend`` over the one plain ONNX training-step graph."""

    name = PORTABLE
    # Fit of benchmarks/calibration/memory_portable.json, 2026-12-01 (block-wise step graphs, LM head read in row
    # slices, glibc's mmap threshold fixed at 128 KB; MiniLM, a 4-layer GPT-2, a SmolLM2-135M-shaped Llama int8 /
    # int8 checkpointed / int4 checkpointed and a 1 B Llama int4 checkpointed; 21 points; the load term counts the
    # step graph's nodes). The naive-logit factor and the fp32 floor are the 2026-11-25 fit's (whole-model
    # graphs; floor fitted by hand to MiniLM fp32 at 1x32..8x32). The fit's 5,499 bytes a node, less 1,527: what the
    # tracer's per-node debug records and intermediate shapes cost at load, measured when the export stopped saving
    # them (SmolLM2 int4 checkpointed -31.8 MB over 21,788 nodes, 0.5 B -25.5 MB over 17,558; docs/memory.md).
    memory_factors = MemoryFactors(runtime=int(40.2 * MB), session=int(27.2 * MB), weight_load=1.047,
                                   step=0, dequant=0.0, token=1.123, block_input=1.123, score=0.901, logit=4.428,
                                   chunked_logit=0.171, fp32_floor=0.4, dequantized_head=1.523, node_load=3972.0)

    def __init__(self, artifact: Path, manifest: Manifest, state_path: Path | None = None, threads: int = 0,
                 provider: str = "CPUExecutionProvider", compute: str = FP32):
        step_model = PORTABLE_INT8_STEP_MODEL if compute == INT8 else PORTABLE_STEP_MODEL
        if not (artifact / step_model).is_file():
            raise UserError(f"{artifact} has no portable training-step graph: re-export it with "
                            "`edge-peft export --backend portable` (or both)")
        ort = onnxruntime_module()
        quiet_logs()
        self.manifest = manifest
        self.artifact = artifact
        providers = [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider]
        options = session_options(threads)
        options.enable_cpu_mem_arena = False  # as the ORT backend: linear, predictable RSS
        options.enable_mem_reuse = False  # as the ORT backend: a buffer kept for a later tensor is held till then
        options.add_session_config_entry("session.disable_prepacking", "1")  # prepacking copies every weight
        # A memory pattern preallocates one block for all of a run's activations: past glibc's mmap threshold
        # it is page-faulted in afresh every step; per-tensor allocations reuse the pages the last step freed.
        options.enable_mem_pattern = False
        if compute != INT8 and (artifact / PORTABLE_PIECES).is_file():  # a checkpointed step, cut into pieces
            self._session = PieceSession(artifact, options, providers, DISABLED_OPTIMIZERS)
        else:
            self._session = ort.InferenceSession(str(artifact / step_model), options, providers=providers,
                                                 disabled_optimizers=DISABLED_OPTIMIZERS)
        inputs = {i.name for i in self._session.get_inputs()}
        self.names = [i.name for i in self._session.get_inputs()
                      if i.name not in BATCH_INPUTS and accumulated(i.name) in inputs]
        self._overridable = {i.name for i in self._session.get_overridable_initializers()}
        self._outputs = [LOSS, *[updated(accumulated(n)) for n in self.names]]
        self._load(state_path or artifact / PORTABLE_INITIAL_STATE)
        self._lr = 0.0
        self._pending: dict[str, np.ndarray] | None = None  # outputs of the step's latest micro-batch
        self._gated: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # name -> (old, gated, gains)
        self._moments: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # gated tensors' moments before the step
        self._frozen_feeds: dict[str, np.ndarray] = {}  # gated LoRA-FA A factors, fed in place of the graph's own
        self._seeded: dict[str, np.ndarray] = {}  # LoRA-FA's seeded A factors, once gating needs them

    # -- the backend as a kind ----------------------------------------------------------------
    @classmethod
    def installed(cls) -> bool:
        return True  # plain onnxruntime: a dependency of every device install

    @classmethod
    def chunked_loss(cls, loss_chunks: int) -> bool:
        return loss_chunks > 0

    @classmethod
    def head_slices(cls, loss_chunks: int, memory: MemoryFigures | None = None) -> int:
        return max(loss_chunks, 1)  # the chunked loss reads the head one row slice at a time

    @classmethod
    def graph_nodes(cls, memory: MemoryFigures) -> int:
        return memory.step_nodes  # the step graph's, or a checkpointed step's distinct pieces'

    @classmethod
    def estimated_nodes(cls, layers: int, checkpointing: bool, int4: bool) -> int:
        if checkpointing:  # the step runs as its pieces, whatever the depth
            return 2 * (PIECE_BLOCK_NODES + PIECE_INT4_NODES * int4) + PIECE_OUTER_NODES
        return layers * (BLOCK_NODES + INT4_BLOCK_NODES * int4) + OUTER_NODES

    @classmethod
    def frozen_bytes(cls, memory: MemoryFigures) -> int:
        return memory.step_frozen_bytes or memory.frozen_bytes  # 0: exported before the step's own was recorded

    @classmethod
    def owns_state(cls, path: Path) -> bool:
        """True when ``path`` is a state file this backend wrote (safetensors with our format tag)."""
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                return 0 < size < 1 << 26 and STATE_FORMAT.encode() in f.read(size)
        except OSError:
            return False

    @classmethod
    def initial_trainable(cls, artifact: Path, manifest: Manifest) -> dict[str, np.ndarray]:
        return dict(load((artifact / PORTABLE_INITIAL_STATE).read_bytes()))

    @classmethod
    def write_initial_trainable(cls, artifact: Path, manifest: Manifest, tensors: dict[str, np.ndarray]) -> list[str]:
        current = cls.initial_trainable(artifact, manifest)
        names = [n for n in current if n in tensors]
        current.update({n: np.ascontiguousarray(tensors[n], dtype=np.float32).reshape(current[n].shape)
                        for n in names})
        atomic_write_bytes(artifact / PORTABLE_INITIAL_STATE, save(current))
        return names

    def _load(self, path: Path) -> None:
        try:
            data = path.read_bytes()
            tensors = load(data)
        except (OSError, SafetensorError) as exc:
            raise UserError(f"{path} is not a readable portable training state ({exc}): "
                            "start the run again without --resume") from None
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise UserError(f"{path} lacks trainable tensor {missing[0]}: it belongs to another artifact; "
                            "start a new run")
        self.values = {n: tensors[n].astype(np.float32) for n in self.names}
        zeros = {n: np.zeros_like(v) for n, v in self.values.items()}
        self.m = {n: tensors.get(moment_names(n)[0], zeros[n]).astype(np.float32) for n in self.names}
        self.v = {n: tensors.get(moment_names(n)[1], zeros[n]).astype(np.float32) for n in self.names}
        self.step = int(_header(data).get("step", "0"))
        self._zeros = zeros

    def save_state(self, path: Path, include_optimizer: bool = True) -> None:
        tensors = dict(self.values)
        if include_optimizer:
            for n in self.names:
                m, v = moment_names(n)
                tensors[m], tensors[v] = self.m[n], self.v[n]
        step = self.step if include_optimizer else 0
        atomic_write_bytes(Path(path), save(tensors, metadata={"format": STATE_FORMAT, "step": str(step)}))

    # -- training ------------------------------------------------------------------------------
    def start_step(self, lr: float) -> None:
        self._lr, self._pending = lr, None

    def _run(self, batch: "Batch", scale: float, outputs: list[str]) -> tuple[float, dict[str, np.ndarray]]:
        acc = self._pending or {}
        feeds = {INPUT_IDS: batch.input_ids.astype(np.int64), ATTENTION_MASK: batch.attention_mask.astype(np.int64),
                 LABELS: batch.labels.astype(np.int64), LOSS_SCALE: np.array(scale, dtype=np.float32)}
        for n in self.names:
            feeds.update({n: self.values[n], accumulated(n): acc.get(updated(accumulated(n)), self._zeros[n])})
        feeds.update(self._frozen_feeds)
        loss, *rest = self._session.run(outputs, feeds)
        return float(loss), dict(zip(outputs[1:], rest))

    def forward_backward(self, batch: "Batch", scale: float = 1.0) -> float:
        loss, self._pending = self._run(batch, scale, self._outputs)
        return loss

    def clear_gradients(self) -> None:
        self._pending = None

    def set_gradients(self, tensors: dict[str, np.ndarray]) -> None:
        """Replace the step's accumulated gradients (what ``optimizer_step`` updates with)."""
        if self._pending is None:
            raise RuntimeError("set_gradients needs a forward_backward in this step first")
        for name, value in tensors.items():
            self._pending[updated(accumulated(name))] = np.ascontiguousarray(value, dtype=np.float32)

    def optimizer_step(self) -> None:
        """AdamW with the step's accumulated gradients (a step without any target changes nothing)."""
        stepped = self._pending is not None
        if stepped:
            grads = {n: self._pending[updated(accumulated(n))] for n in self.names}
            adamw_step(self.values, self.m, self.v, grads, self._lr, self.step + 1, self.manifest.weight_decay,
                       self.manifest.max_grad_norm)
            self.step += 1
        self._pending = None
        for n, (old, gated, gains) in self._gated.items():
            self.values[n] = ungate(old, gated, self.values[n], n, gains)
            if stepped:
                m, v = self._moments[n]
                self.m[n] = copy_channels(self.m[n], ADAMW_BETAS[0] * m, n, gains == 0)
                self.v[n] = copy_channels(self.v[n], ADAMW_BETAS[1] * v, n, gains == 0)
        self._gated, self._moments, self._frozen_feeds = {}, {}, {}

    def gate_channels(self, gains: dict[str, np.ndarray]) -> None:
        """Gate the trained B (and A) in place for the step, and feed a gated copy of a frozen A (a graph
        input whose default is the seeded A); ``optimizer_step`` ungates and gives gain-0 channels the
        moments of a zero gradient."""
        for module, g in gains.items():
            for n in (b_name(module), a_name(module)):
                if n in self.values:
                    self._gated[n] = (self.values[n], gate(self.values[n], n, g), g)
                    self._moments[n] = (self.m[n], self.v[n])
                    self.values[n] = self._gated[n][1]
                else:
                    self._frozen_feeds[n] = gate(self._seeded_a(n), n, g)

    def _seeded_a(self, name: str) -> np.ndarray:
        """A frozen LoRA-FA A as exported (regenerated from its seed), if the graph lets the loop feed it."""
        if name not in self._overridable:
            raise UserError(f"{self.artifact / PORTABLE_STEP_MODEL} does not let the loop scale rank channels ({name} is a "
                            "constant): re-export the artifact with this version of edge-peft")
        if not self._seeded:  # every module is gated together: regenerate them all once
            self._seeded = {a_name(m.name): lora_a_from_seed(m.a_seed, m.rank, m.in_features)
                            for m in self.manifest.adapter.modules}
        return self._seeded[name]

    def eval_loss(self, batch: "Batch") -> float:
        """Loss through the step graph (its update is discarded): no second copy of the weights."""
        return self._run(batch, 1.0, [LOSS])[0]

    # -- tensors by name -----------------------------------------------------------------------
    def trainable(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self.values.items()}

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        if self._pending is not None:
            raise RuntimeError("trainable tensors changed between a step's backward and its update")
        for name, value in tensors.items():
            if name not in self.values:
                raise UserError(f"{name} is not a trainable tensor of this artifact: check the adapter's targets")
            self.values[name] = np.ascontiguousarray(value, dtype=np.float32).reshape(self.values[name].shape)

    def gradients(self, names: list[str]) -> dict[str, np.ndarray]:
        """Accumulated gradients of trainable tensors (read between backward and the optimizer step)."""
        acc = self._pending or {}
        return {n: acc[updated(accumulated(n))].copy() if acc else np.zeros_like(self.values[n]) for n in names}

    def frozen(self, name: str) -> np.ndarray:
        """A frozen initializer of the step graph, read with the ``onnx`` package (workstation/tests)."""
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            raise UserError("reading frozen tensors of a portable artifact needs the onnx package: "
                            "pip install onnx") from None
        model = onnx.load(str(self.artifact / PORTABLE_STEP_MODEL))
        for init in model.graph.initializer:
            if init.name == name:
                return numpy_helper.to_array(init).copy()
        raise UserError(f"{name} is not a frozen tensor of {self.artifact / PORTABLE_STEP_MODEL}: check the name")


def _header(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {}) or {}
