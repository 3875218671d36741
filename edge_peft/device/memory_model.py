"""Predict the peak resident memory (RSS) of a training step from manifest figures and run settings.

Structure (what lives at the peak of a step, forward activations kept for backward):

- ``runtime``: the interpreter, numpy, tokenizers and ONNX Runtime after import, the training
  session's graphs and kernels, and a per-step workspace: constants, measured.
- ``weights``: the checkpoint state and the training session built from it: the frozen base
  (int8, int4 or fp32, manifest ``memory.frozen_bytes``; on the portable backend ``memory.step_frozen_bytes``, what
  its step reads) and the trainable tensors, times a measured load factor;
  plus a measured cost per node of the training graph the backend loads (manifest ``memory.train_nodes`` for
  ORT's, ``memory.step_nodes`` for the portable step's: the session's per-node structures, which dominate the
  load of a small model with many blocks).
  ORT's CPU arena is disabled for training sessions (``backends/``): its growth is step-shaped and
  cost up to +60 % RSS on a causal LM, while plain malloc grows linearly with the step.
- ``optimizer``: one gradient and two AdamW moments per trainable value (fp32).
- ``dequantized``: a quantized base is dequantized to fp32 where each matrix is read (``exporter/recompute.py``),
  so at any time about one block's worth is in fp32: ``4 x quantized values / layers`` (manifest
  ``memory.quantized_values``; older manifests: the quantized bytes, which int8 is close to) times a measured
  factor; a causal LM's quantized head in fp32, whole or one row slice (the backend's ``head_slices``); and a
  measured cost per block of an int4 base (``int4_block``).
- ``activations``: per layer and token ``9 h + 2 i`` floats (attention inputs, Q/K/V, context,
  norms; MLP up-projection and activation; the layout of Korthikanti et al. 2022, "Reducing
  Activation Recomputation", ``34 s b h`` 16-bit bytes at ``i = 4h``), plus ``heads x T^2`` floats per
  layer and row for attention scores and probabilities, or one layer's where the training graphs recompute them
  in the backward (``attention_recomputed``, the default); each term times a measured factor. With block
  checkpointing (``checkpointed``): one block's ``9 h + 2 i`` and scores, plus the blocks' inputs (``h`` floats
  per layer and token) times their own factor (the ORT graph keeps several hidden-sized values per block).
- ``logits``: ``B x T x V`` fp32 for a causal LM (logits, log-softmax, their gradient), times a
  measured factor; negligible for a classifier. Artifacts with the target-only chunked LM head and
  loss (manifest ``memory.loss_chunks`` > 0) keep only the log-softmax for backward, plus one chunk's
  logits and gradient: their own, smaller factor (the ``_chunk8`` points). Planning assumes every
  position is a target (padding would only lower the peak).

Calibration (``benchmarks/calibrate_memory.py``, which also holds the fit): each point is a fresh
process without torch, with glibc set up as for every budgeted run (``memory.predictable_memory``),
that loads the artifact and runs three full steps on random tokens of exactly ``B x T`` with 2 threads;
each backend's factors (``backends.base.MemoryFactors``, on the backend class) are the non-negative
least-squares fit of the measured high-water marks. The measured points are data files in
``benchmarks/calibration/``; the fit and its errors are described in ``docs/memory.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..artifact.manifest import Manifest
from ..backends import backend_class, memory_factors

MB = 1024 * 1024
FLOAT = 4


@dataclass(frozen=True)
class Prediction:
    """Predicted peak RSS of one training step, by component, in bytes."""

    runtime: int
    weights: int
    optimizer: int
    dequantized: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.optimizer + self.dequantized + self.activations + self.logits

    def breakdown(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class ModelFigures:
    """The artifact figures the model needs: from a manifest, or computed at export time before one exists."""

    frozen_bytes: int  # of the frozen tensors, those the backend's training graph reads
    quantized_bytes: int
    trainable_values: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    causal: bool
    backend: str  # which backend trains (its factors apply)
    chunked_loss: bool = False  # the backend trains with the target-only chunked LM head and loss
    quantized_values: int = 0  # values stored quantized (0: take quantized_bytes, as int8 nearly is)
    checkpointed: bool = False  # exported with --checkpointing: each block recomputed in the backward
    attention_recomputed: bool = False  # one attention's probabilities kept at a time (manifest attention_recompute)
    head_slices: int = 1  # the row slices a quantized LM head is read in (backend's ``head_slices``)
    int4: bool = False  # the base is stored in 4 bits (int4.py)
    nodes: int = 0  # nodes of the training graph(s) the backend loads (recorded, or the backend's estimate)

    @classmethod
    def of(cls, manifest: Manifest, backend: str) -> "ModelFigures":
        mem, kind, int4 = manifest.memory, backend_class(backend), manifest.quantization == "int4"
        return cls(frozen_bytes=kind.frozen_bytes(mem), quantized_bytes=mem.quantized_bytes,
                   trainable_values=mem.trainable_values, layers=manifest.num_layers, hidden=manifest.hidden_size,
                   intermediate=mem.intermediate_size, heads=manifest.num_heads, vocab=manifest.vocab_size,
                   causal=manifest.task == "causal-lm", backend=backend,
                   chunked_loss=kind.chunked_loss(mem.loss_chunks), quantized_values=mem.quantized_values,
                   checkpointed=mem.checkpointing, attention_recomputed=mem.attention_recompute,
                   head_slices=kind.head_slices(mem.loss_chunks, mem), int4=int4,
                   nodes=kind.graph_nodes(mem) or kind.estimated_nodes(manifest.num_layers, mem.checkpointing, int4))


def load_terms(f: ModelFigures) -> dict[str, float]:
    """What the load factors multiply: weight bytes (``weight_load``) and the training graph's nodes
    (``node_load``: the session's per-node structures)."""
    return {"weights": f.frozen_bytes + FLOAT * f.trainable_values, "nodes": f.nodes}


def _weights(f: ModelFigures, k) -> float:
    t = load_terms(f)
    return k.weight_load * t["weights"] + k.node_load * t["nodes"]


def loaded_bytes(manifest: Manifest, backend: str) -> int:
    """Predicted RSS once the training session is loaded, before the first step."""
    f, k = ModelFigures.of(manifest, backend), memory_factors(backend)
    return int(k.runtime + k.session + _weights(f, k))


def predict(manifest: Manifest, batch: int, seq_len: int, backend: str) -> Prediction:
    """Peak RSS of a training step on ``batch`` rows padded to ``seq_len`` tokens, on ``backend``."""
    return predict_figures(ModelFigures.of(manifest, backend), batch, seq_len)


def step_terms(f: ModelFigures, batch: int, seq_len: int) -> dict[str, float]:
    """The byte counts the step factors multiply (what ``benchmarks/calibrate_memory.py`` fits them to)."""
    tokens = batch * seq_len
    logits = FLOAT * tokens * f.vocab if f.causal else 0
    chunked = f.chunked_loss
    block = 9 * f.hidden + 2 * f.intermediate
    return {"dequantized": FLOAT * (f.quantized_values or f.quantized_bytes) // max(f.layers, 1),  # one block's
            # checkpointed: the activations of the one block being recomputed, and every block's input
            "tokens": FLOAT * tokens * (block if f.checkpointed else f.layers * block),
            "block_inputs": FLOAT * tokens * f.layers * f.hidden if f.checkpointed else 0,
            # one attention's probabilities where they are recomputed in the backward (or the block is)
            "scores": FLOAT * (1 if f.checkpointed or f.attention_recomputed else f.layers) * f.heads * batch
                      * seq_len * seq_len,
            "logits": 0 if chunked else logits,
            "chunked_logits": logits if chunked else 0,
            # a quantized LM head in fp32: whole, or one row slice where the backend's chunked loss reads slices
            "dequantized_head": (FLOAT * f.vocab * f.hidden // (f.head_slices if chunked else 1)
                                 if f.causal and f.quantized_bytes else 0),
            "int4_blocks": f.layers if f.int4 else 0}  # what an int4 base costs a step per block beyond the above


def predict_figures(f: ModelFigures, batch: int, seq_len: int) -> Prediction:
    """``predict`` from the figures themselves (export-time planning has no manifest yet)."""
    k, t = memory_factors(f.backend), step_terms(f, batch, seq_len)
    dequantized = (k.dequant * t["dequantized"] + k.dequantized_head * t["dequantized_head"]
                   + k.int4_block * t["int4_blocks"])
    activations = k.token * t["tokens"] + k.block_input * t["block_inputs"] + k.score * t["scores"]
    logits = k.logit * t["logits"] + k.chunked_logit * t["chunked_logits"]
    step = k.step + dequantized + activations + logits
    workspace = max(0.0, k.fp32_floor * (f.frozen_bytes - f.quantized_bytes) - step)
    return Prediction(
        runtime=int(k.runtime + k.session + k.step + workspace),
        weights=int(_weights(f, k)),
        optimizer=int(3 * FLOAT * f.trainable_values),
        dequantized=int(dequantized),
        activations=int(activations),
        logits=int(logits),
    )
