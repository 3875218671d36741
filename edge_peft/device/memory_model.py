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
  logits and gradient: their own, smaller factor (``CALIBRATION_CHUNKED``). Planning assumes every
  position is a target (padding would only lower the peak).

Calibration (``benchmarks/calibrate_memory.py``): each point is a fresh process without torch
that loads the artifact and runs three full steps on random tokens of exactly ``B x T`` with 2
threads; the factors below are the least-squares fit of the measured high-water marks (getrusage)
on this machine (x86-64, Python 3.11, onnxruntime-training-cpu 1.19.2). The data points are in
``CALIBRATION``; re-run the script on a new device class and refit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..manifest import Manifest

MB = 1024 * 1024
FLOAT = 4

# Least-squares fit of CALIBRATION (2 threads; thread count was not varied):
RUNTIME_BYTES = int(38.5 * MB)  # RSS after importing edge_peft, numpy, tokenizers and ORT (all 32 runs: 38.4-38.6)
SESSION_BYTES = int(44.0 * MB)  # load intercept: training session, graphs, kernels
WEIGHT_LOAD_FACTOR = 1.042  # load slope per checkpoint byte
STEP_BYTES = int(28.2 * MB)  # step intercept
DEQUANT_FACTOR = 0.311  # per fp32 byte of the dequantized int8 base
TOKEN_FACTOR = 1.266  # per byte of the 9h + 2i token activations
SCORE_FACTOR = 1.789  # per byte of heads x T^2 attention scores
LOGIT_FACTOR = 3.208  # per byte of B x T x V logits
CHUNKED_LOGIT_FACTOR = 1.351  # the same with the target-only LM head and loss in 8 chunks: fit of CALIBRATION_CHUNKED
FP32_FLOOR_FACTOR = 0.8  # a step of an fp32 base never costs less than 0.8 x its weights (MiniLM fp32: 72 MB at 1x32..1x128)

# (artifact, B, T, measured peak MB) with ``enable_cpu_mem_arena = False``, 2 threads. minilm: all-MiniLM-L6-v2
# classifier (6 layers, h 384, 12 heads, V 30522); gpt2m: random GPT-2 (4 layers, h 256, 4 heads, V 32000,
# c_attn adapted); int8 / fp32 ("none") bases; rank 8 LoRA-FA. Fit error: -7 %..+10.5 % (prediction - measured).
CALIBRATION: list[tuple[str, int, int, float]] = [
    ("minilm_int8", 1, 32, 161.7),
    ("minilm_int8", 8, 32, 211.4),
    ("minilm_int8", 1, 128, 185.3),
    ("minilm_int8", 8, 128, 422.9),
    ("minilm_int8", 4, 256, 519.4),
    ("minilm_int8", 16, 128, 688.5),
    ("minilm_int8", 2, 512, 558.7),
    ("minilm_int8", 32, 64, 619.1),
    ("minilm_fp32", 1, 32, 246.2),
    ("minilm_fp32", 8, 32, 246.2),
    ("minilm_fp32", 1, 128, 246.2),
    ("minilm_fp32", 8, 128, 451.7),
    ("minilm_fp32", 4, 256, 544.6),
    ("minilm_fp32", 16, 128, 698.0),
    ("minilm_fp32", 2, 512, 702.0),
    ("minilm_fp32", 32, 64, 645.4),
    ("gpt2m_int8", 1, 32, 169.4),
    ("gpt2m_int8", 8, 32, 274.8),
    ("gpt2m_int8", 1, 128, 230.0),
    ("gpt2m_int8", 8, 128, 659.5),
    ("gpt2m_int8", 4, 256, 669.5),
    ("gpt2m_int8", 16, 128, 1168.4),
    ("gpt2m_int8", 2, 512, 682.9),
    ("gpt2m_int8", 32, 64, 1160.8),
    ("gpt2m_none", 1, 32, 155.4),
    ("gpt2m_none", 8, 32, 257.8),
    ("gpt2m_none", 1, 128, 226.7),
    ("gpt2m_none", 8, 128, 647.1),
    ("gpt2m_none", 4, 256, 654.3),
    ("gpt2m_none", 16, 128, 1156.3),
    ("gpt2m_none", 2, 512, 667.7),
    ("gpt2m_none", 32, 64, 1142.1),
]


# Target-only LM head and loss (``exporter/loss_graph.py``), gpt2m int8, rank 8, 2 threads, all B x T tokens
# are targets: (artifact, B, T, measured peak MB). Only CHUNKED_LOGIT_FACTOR was fitted (least squares, the other
# factors held): residuals -11..+14 MB. With 1 chunk the peaks equal the naive graph's (229.5, 665.0, 670.6,
# 1167.7, 689.6 MB at the points below): gathering alone saves nothing without padding; the chunks do it.
# With 32 chunks the factor is 1.248 (174.2, 415.3, 420.6, 672.7, 443.5 MB): little more, so 8 is the default.
CALIBRATION_CHUNKED: list[tuple[str, int, int, float]] = [
    ("gpt2m_int8_chunk8", 1, 128, 186.1),
    ("gpt2m_int8_chunk8", 8, 128, 423.2),
    ("gpt2m_int8_chunk8", 4, 256, 431.5),
    ("gpt2m_int8_chunk8", 16, 128, 703.6),
    ("gpt2m_int8_chunk8", 2, 512, 452.3),
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


def predict_figures(f: ModelFigures, batch: int, seq_len: int) -> Prediction:
    """``predict`` from the figures themselves (export-time planning has no manifest yet)."""
    tokens = batch * seq_len
    token_bytes = FLOAT * f.layers * (9 * f.hidden + 2 * f.intermediate) * tokens
    score_bytes = FLOAT * f.layers * f.heads * batch * seq_len * seq_len
    dequantized = DEQUANT_FACTOR * FLOAT * f.quantized_bytes
    activations = TOKEN_FACTOR * token_bytes + SCORE_FACTOR * score_bytes
    logit_factor = CHUNKED_LOGIT_FACTOR if f.loss_chunks else LOGIT_FACTOR
    logits = logit_factor * FLOAT * tokens * f.vocab if f.causal else 0
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
