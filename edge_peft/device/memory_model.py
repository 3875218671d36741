"""Predict the peak resident memory (RSS) of a training step from manifest figures and run settings.

Structure (what lives at the peak of a step, forward activations kept for backward):

- ``runtime``: the interpreter, numpy, tokenizers and ONNX Runtime after import, the training
  session's graphs and kernels, and a per-step workspace: constants, measured.
- ``weights``: the checkpoint state and the training session built from it: the frozen base
  (int8, int4 or fp32, manifest ``memory.frozen_bytes``; on the portable backend ``memory.step_frozen_bytes``, what
  its step reads) and the trainable tensors, times a measured load factor;
  on the portable backend also a measured cost per node of the step graph (manifest ``memory.step_nodes``: the
  session's per-node structures, which dominate the load of a small model with many blocks).
  ORT's CPU arena is disabled for training sessions (``backends/``): its growth is step-shaped and
  cost up to +60 % RSS on a causal LM, while plain malloc grows linearly with the step.
- ``optimizer``: one gradient and two AdamW moments per trainable value (fp32).
- ``dequantized``: a quantized base is dequantized to fp32 on the fly; ORT kept those fp32 copies from
  forward to backward, so they cost ``4 x quantized values`` (manifest ``memory.quantized_values``; older
  manifests: the quantized bytes, which int8 is close to) times a measured factor during a step.
- ``activations``: per layer and token ``9 h + 2 i`` floats (attention inputs, Q/K/V, context,
  norms; MLP up-projection and activation; the layout of Korthikanti et al. 2022, "Reducing
  Activation Recomputation", ``34 s b h`` 16-bit bytes at ``i = 4h``), plus ``heads x T^2`` floats per
  layer and row for attention scores and probabilities; each term times a measured factor. With block
  checkpointing on a backend that keeps only block inputs between the passes (``checkpointed``): ``h`` floats
  per layer and token, plus one block's ``9 h + 2 i`` and scores.
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
    checkpointed: bool = False  # only block inputs stay between forward and backward (one block's activations live)
    loss_chunks: int = 0  # the chunked LM loss's parts (the portable step reads its head in this many row slices)
    int4: bool = False  # the base is stored in 4 bits (int4.py)
    step_nodes: int = 0  # nodes the portable step loads (its graph or distinct pieces; 0: ``estimated_step_nodes``)

    @classmethod
    def of(cls, manifest: Manifest, backend: str) -> "ModelFigures":
        mem = manifest.memory
        return cls(frozen_bytes=backend_class(backend).frozen_bytes(mem), quantized_bytes=mem.quantized_bytes,
                   trainable_values=mem.trainable_values, layers=manifest.num_layers, hidden=manifest.hidden_size,
                   intermediate=mem.intermediate_size, heads=manifest.num_heads, vocab=manifest.vocab_size,
                   causal=manifest.task == "causal-lm", backend=backend,
                   chunked_loss=backend_class(backend).chunked_loss(mem.loss_chunks),
                   quantized_values=mem.quantized_values,
                   checkpointed=backend_class(backend).checkpointed(mem.checkpointing), loss_chunks=mem.loss_chunks,
                   int4=manifest.quantization == "int4",
                   step_nodes=mem.step_nodes or estimated_step_nodes(manifest.num_layers, mem.checkpointing,
                                                                     manifest.quantization == "int4"))


# Nodes of a Llama-shaped block in the portable step graph (all linear projections adapted), counted on
# SmolLM2-135M and a 1 B Llama: the block itself, what an int4 base adds (unpacking at each use); and the
# embedding, LM head and loss.
BLOCK_NODES, INT4_BLOCK_NODES, OUTER_NODES = 470, 86, 600
# A checkpointed step runs as its pieces (exporter/portable_pieces.py), whatever the depth: two variants of a
# block's forward and backward (each recomputing the mask and positions the stitched step shares), what an int4
# base adds to them, and the prologue and tail; counted on SmolLM2-135M.
PIECE_BLOCK_NODES, PIECE_INT4_NODES, PIECE_OUTER_NODES = 722, 156, 517


def estimated_step_nodes(layers: int, checkpointing: bool, int4: bool) -> int:
    """The nodes a portable step loads, before its graphs exist (export-time planning, older manifests)."""
    if checkpointing:
        return 2 * (PIECE_BLOCK_NODES + PIECE_INT4_NODES * int4) + PIECE_OUTER_NODES
    return layers * (BLOCK_NODES + INT4_BLOCK_NODES * int4) + OUTER_NODES


def load_terms(f: ModelFigures) -> dict[str, float]:
    """What the load factors multiply: weight bytes (``weight_load``) and the step graph's nodes (``node_load``:
    the session's per-node structures)."""
    return {"weights": f.frozen_bytes + FLOAT * f.trainable_values, "nodes": f.step_nodes}


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
    return {"dequantized": FLOAT * (f.quantized_values or f.quantized_bytes),
            # checkpointed: every block's input, plus the activations of the one block being recomputed
            "tokens": FLOAT * tokens * ((f.layers * f.hidden + block) if f.checkpointed else f.layers * block),
            "scores": FLOAT * (1 if f.checkpointed else f.layers) * f.heads * batch * seq_len * seq_len,
            "logits": 0 if chunked else logits,
            "chunked_logits": logits if chunked else 0,
            # a quantized LM head in fp32: whole for full logits, one row slice with the chunked loss (portable)
            "dequantized_head": (FLOAT * f.vocab * f.hidden // (f.loss_chunks if chunked else 1)
                                 if f.causal and f.quantized_bytes else 0)}


def predict_figures(f: ModelFigures, batch: int, seq_len: int) -> Prediction:
    """``predict`` from the figures themselves (export-time planning has no manifest yet)."""
    k, t = memory_factors(f.backend), step_terms(f, batch, seq_len)
    dequantized = k.dequant * t["dequantized"] + k.dequantized_head * t["dequantized_head"]
    activations = k.token * t["tokens"] + k.score * t["scores"]
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
