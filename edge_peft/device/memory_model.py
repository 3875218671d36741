"""Predict the peak resident memory (RSS) of a training step from manifest figures and run settings.

Structure (what lives at the peak of a step, forward activations kept for backward):

- ``runtime``: the interpreter, numpy, tokenizers and ONNX Runtime after import, the training
  session's graphs and kernels, and a per-step workspace: constants, measured.
- ``weights``: the checkpoint state and the training session built from it: the frozen base
  (int8 or fp32, ``frozen_weight_bytes``) and the trainable tensors, times a measured load factor.
  ORT's CPU arena is disabled for training sessions (``backend.py``): its growth is step-shaped and
  cost up to +60 % RSS on a causal LM, while plain malloc grows linearly with the step.
- ``optimizer``: one gradient and two AdamW moments per trainable value (fp32).
- ``dequantized``: an int8 base is dequantized to fp32 on the fly; ORT keeps those fp32 copies from
  forward to backward, so they cost ``4 x int8 bytes`` times a measured factor during a step.
- ``activations``: per layer and token ``9 h + 2 i`` floats (attention inputs, Q/K/V, context,
  norms; MLP up-projection and activation; the layout of Korthikanti et al. 2022, "Reducing
  Activation Recomputation", ``34 s b h`` 16-bit bytes at ``i = 4h``), plus ``heads x T^2`` floats per
  layer and row for attention scores and probabilities; each term times a measured factor.
- ``logits``: ``B x T x V`` fp32 for a causal LM (logits, log-softmax, their gradient), times a
  measured factor; negligible for a classifier. Artifacts with the target-only chunked LM head and
  loss (manifest ``memory.loss_chunks`` > 0) keep only the log-softmax for backward, plus one chunk's
  logits and gradient: their own, smaller factor (the ``_chunk8`` points). Planning assumes every
  position is a target (padding would only lower the peak).

Calibration (``benchmarks/calibrate_memory.py``, which also holds the fit): each point is a fresh
process without torch, with glibc set up as for every budgeted run (``memory.predictable_memory``:
RSS follows the live tensors), that loads the artifact and runs three full steps on random tokens of
exactly ``B x T`` with 2 threads; the factors below are the least-squares fit (non-negative) of the
measured high-water marks on this machine (x86-64, Python 3.11, onnxruntime-training-cpu 1.19.2).
The data points are in ``CALIBRATION``; re-run the script on a new device class and refit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..manifest import Manifest

MB = 1024 * 1024
FLOAT = 4

# Fit of CALIBRATION by ``calibrate_memory.fit`` (2 threads; thread count was not varied), 2026-11-25:
RUNTIME_BYTES = int(39.8 * MB)  # RSS after importing edge_peft, numpy, tokenizers and ORT (all 45 runs: 39.7-39.8)
SESSION_BYTES = int(44.0 * MB)  # load intercept: training session, graphs, kernels
WEIGHT_LOAD_FACTOR = 1.046  # load slope per checkpoint byte
STEP_BYTES = int(21.2 * MB)  # step intercept
DEQUANT_FACTOR = 0.413  # per fp32 byte of the dequantized int8 base
TOKEN_FACTOR = 1.071  # per byte of the 9h + 2i token activations
SCORE_FACTOR = 1.169  # per byte of heads x T^2 attention scores
LOGIT_FACTOR = 3.090  # per byte of B x T x V logits
CHUNKED_LOGIT_FACTOR = 0.522  # the same with the target-only LM head and loss in 8 chunks
FP32_FLOOR_FACTOR = 0.8  # a step of an fp32 base never costs less than 0.8 x its weights (MiniLM fp32: 247 MB at 1x32..8x32)

# (artifact, B, T, measured peak MB), ORT training API, arena off, ``predictable_memory``, 2 threads, rank 8
# LoRA-FA. minilm: all-MiniLM-L6-v2 classifier (6 layers, h 384, 12 heads, V 30522); gpt2m: random GPT-2
# (4 layers, h 256, 4 heads, V 30522, c_attn adapted) with the naive LM loss (``--loss-chunks 0``) or the
# target-only one in 8 chunks (``_chunk8``); int8 / fp32 ("none") bases. Error of ``predict`` over the 45
# points: -1.6 % .. +6.5 % (prediction - measured), mean |error| 1.4 %.
CALIBRATION: list[tuple[str, int, int, float]] = [
    ("minilm_int8", 1, 32, 162.3),
    ("minilm_int8", 1, 128, 188.2),
    ("minilm_int8", 8, 32, 208.8),
    ("minilm_int8", 8, 128, 366.9),
    ("minilm_int8", 4, 256, 402.3),
    ("minilm_int8", 16, 128, 578.0),
    ("minilm_int8", 2, 512, 499.6),
    ("minilm_int8", 32, 64, 543.0),
    ("minilm_int8", 4, 512, 838.8),
    ("minilm_fp32", 1, 32, 247.2),
    ("minilm_fp32", 1, 128, 247.3),
    ("minilm_fp32", 8, 32, 247.2),
    ("minilm_fp32", 8, 128, 394.6),
    ("minilm_fp32", 4, 256, 429.8),
    ("minilm_fp32", 16, 128, 607.2),
    ("minilm_fp32", 2, 512, 525.4),
    ("minilm_fp32", 32, 64, 571.8),
    ("minilm_fp32", 4, 512, 868.5),
    ("gpt2m_int8", 1, 32, 163.9),
    ("gpt2m_int8", 1, 128, 210.6),
    ("gpt2m_int8", 8, 32, 269.2),
    ("gpt2m_int8", 8, 128, 608.3),
    ("gpt2m_int8", 4, 256, 614.6),
    ("gpt2m_int8", 16, 128, 1063.5),
    ("gpt2m_int8", 2, 512, 631.5),
    ("gpt2m_int8", 32, 64, 1056.7),
    ("gpt2m_int8", 4, 512, 1113.0),
    ("gpt2m_none", 1, 32, 153.7),
    ("gpt2m_none", 1, 128, 193.4),
    ("gpt2m_none", 8, 32, 252.6),
    ("gpt2m_none", 8, 128, 590.3),
    ("gpt2m_none", 4, 256, 596.9),
    ("gpt2m_none", 16, 128, 1046.5),
    ("gpt2m_none", 2, 512, 614.2),
    ("gpt2m_none", 32, 64, 1039.5),
    ("gpt2m_none", 4, 512, 1094.6),
    ("gpt2m_int8_chunk8", 1, 32, 155.2),
    ("gpt2m_int8_chunk8", 1, 128, 173.1),
    ("gpt2m_int8_chunk8", 8, 32, 191.0),
    ("gpt2m_int8_chunk8", 8, 128, 297.3),
    ("gpt2m_int8_chunk8", 4, 256, 303.9),
    ("gpt2m_int8_chunk8", 16, 128, 445.9),
    ("gpt2m_int8_chunk8", 2, 512, 323.2),
    ("gpt2m_int8_chunk8", 32, 64, 437.8),
    ("gpt2m_int8_chunk8", 4, 512, 493.9),
]


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
    """The manifest figures the model needs (with fallbacks for artifacts exported before they were recorded)."""

    frozen_bytes: int
    quantized_bytes: int
    trainable_values: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    causal: bool
    loss_chunks: int = 0  # > 0: target-only, chunked LM head and loss (``exporter/loss_graph.py``)

    @classmethod
    def of(cls, manifest: Manifest) -> "ModelFigures":
        mem = manifest.memory
        trainable = mem.get("trainable_values")
        if trainable is None:
            factors = 2 if manifest.variant == "lora" else 1
            trainable = sum(m.rank * (m.out_features + (m.in_features if factors == 2 else 0)) for m in manifest.modules)
            trainable += sum(_prod(t.shape) for t in manifest.modules_to_save)
        frozen = int(mem.get("frozen_weight_bytes", 0))
        by_dtype = mem.get("frozen_bytes_by_dtype") or {}
        quantized = int(by_dtype.get("int8", frozen * 0.98 if manifest.quantization == "int8" else 0))
        return cls(frozen_bytes=frozen, quantized_bytes=quantized, trainable_values=int(trainable),
                   layers=manifest.num_layers, hidden=manifest.hidden_size,
                   intermediate=int(mem.get("intermediate_size") or 4 * manifest.hidden_size),
                   heads=manifest.num_heads, vocab=manifest.vocab_size, causal=manifest.task == "causal-lm",
                   # the portable graphs compute full logits: an artifact carrying them is planned as naive
                   loss_chunks=0 if "portable" in manifest.backends else int(mem.get("loss_chunks", 0)))


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def loaded_bytes(manifest: Manifest) -> int:
    """Predicted RSS once the training session is loaded, before the first step."""
    f = ModelFigures.of(manifest)
    return int(RUNTIME_BYTES + SESSION_BYTES + WEIGHT_LOAD_FACTOR * (f.frozen_bytes + FLOAT * f.trainable_values))


def predict(manifest: Manifest, batch: int, seq_len: int) -> Prediction:
    """Peak RSS of a training step on ``batch`` rows padded to ``seq_len`` tokens."""
    return predict_figures(ModelFigures.of(manifest), batch, seq_len)


def step_terms(f: ModelFigures, batch: int, seq_len: int) -> dict[str, float]:
    """The byte counts the step factors multiply (what ``benchmarks/calibrate_memory.py`` fits them to)."""
    tokens = batch * seq_len
    logits = FLOAT * tokens * f.vocab if f.causal else 0
    return {"dequantized": FLOAT * f.quantized_bytes,
            "tokens": FLOAT * f.layers * (9 * f.hidden + 2 * f.intermediate) * tokens,
            "scores": FLOAT * f.layers * f.heads * batch * seq_len * seq_len,
            "logits": 0 if f.loss_chunks else logits,
            "chunked_logits": logits if f.loss_chunks else 0}


def predict_figures(f: ModelFigures, batch: int, seq_len: int) -> Prediction:
    """``predict`` from the figures themselves (export-time planning has no manifest yet)."""
    t = step_terms(f, batch, seq_len)
    dequantized = DEQUANT_FACTOR * t["dequantized"]
    activations = TOKEN_FACTOR * t["tokens"] + SCORE_FACTOR * t["scores"]
    logits = LOGIT_FACTOR * t["logits"] + CHUNKED_LOGIT_FACTOR * t["chunked_logits"]
    step = STEP_BYTES + dequantized + activations + logits
    workspace = max(0.0, FP32_FLOOR_FACTOR * (f.frozen_bytes - f.quantized_bytes) - step)
    return Prediction(
        runtime=int(RUNTIME_BYTES + SESSION_BYTES + STEP_BYTES + workspace),
        weights=int(WEIGHT_LOAD_FACTOR * (f.frozen_bytes + FLOAT * f.trainable_values)),
        optimizer=int(3 * FLOAT * f.trainable_values),
        dequantized=int(dequantized),
        activations=int(activations),
        logits=int(logits),
    )
