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
RSS follows the live tensors) but without the huge pages budgeted runs now start with
(``memory.huge_pages_env``: 0.4-1.8 % more peak, measured; the budget benchmark stays within 6 %),
that loads the artifact and runs three full steps on random tokens of exactly ``B x T`` with 2 threads;
the factors below are the least-squares fit (non-negative) of the measured high-water marks on this
machine (x86-64, Python 3.11): one set of factors per training backend (``ORT_FACTORS``:
onnxruntime-training-cpu 1.19.2; ``PORTABLE_FACTORS``: onnxruntime 1.32), the backend being resolved
before planning. The data points are in ``CALIBRATION`` and
``CALIBRATION_PORTABLE``; re-run the script on a new device class and refit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..manifest import Manifest

MB = 1024 * 1024
FLOAT = 4

@dataclass(frozen=True)
class Factors:
    """One backend's fitted constants (``benchmarks/calibrate_memory.py --fit``; 2 threads, not varied)."""

    runtime: int  # RSS after importing edge_peft, numpy, tokenizers and onnxruntime
    session: int  # load intercept: session, graphs, kernels
    weight_load: float  # load slope per byte of frozen weights and trainable values
    step: int  # step intercept
    dequant: float  # per fp32 byte of the dequantized int8 base
    token: float  # per byte of the 9h + 2i token activations
    score: float  # per byte of heads x T^2 attention scores
    logit: float  # per byte of B x T x V logits
    chunked_logit: float  # the same with the target-only LM head and loss in 8 chunks
    fp32_floor: float = 0.8  # a step of an fp32 base never costs less than this x its weights
    dequantized_head: float = 0.0  # per fp32 byte of an int8 causal LM head (vocab x hidden)


# Fit of CALIBRATION (ORT training API), 2026-11-25. The fp32 floor: MiniLM fp32 peaked at 247 MB from 1x32 to 8x32.
ORT_FACTORS = Factors(runtime=int(39.8 * MB), session=int(44.0 * MB), weight_load=1.046, step=int(21.2 * MB),
                      dequant=0.413, token=1.071, score=1.169, logit=3.090, chunked_logit=0.522)
# Fit of CALIBRATION_PORTABLE (plain onnxruntime 1.32), 2026-11-25: it keeps the int8 LM head's fp32 copy and the
# full logits longer (causal LMs cost more than on the ORT API), the rest less; fp32 floor fitted by hand to
# MiniLM fp32 at 1x32..8x32 (211-218 MB). Error of ``predict`` over its 36 points: -6.2 % .. +8.4 %, mean 2.5 %.
PORTABLE_FACTORS = Factors(runtime=int(39.6 * MB), session=int(57.4 * MB), weight_load=0.841, step=int(9.0 * MB),
                           dequant=0.0, token=0.649, score=1.475, logit=4.428, chunked_logit=0.0, fp32_floor=0.4,
                           dequantized_head=1.126)

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


# The same measurements on the portable backend (``calibrate_memory.py --backend portable``), naive LM loss.
CALIBRATION_PORTABLE: list[tuple[str, int, int, float]] = [
    ("minilm_int8", 1, 32, 136.0),
    ("minilm_int8", 1, 128, 151.2),
    ("minilm_int8", 8, 32, 158.3),
    ("minilm_int8", 8, 128, 288.6),
    ("minilm_int8", 4, 256, 340.8),
    ("minilm_int8", 16, 128, 442.1),
    ("minilm_int8", 2, 512, 448.9),
    ("minilm_int8", 32, 64, 393.7),
    ("minilm_int8", 4, 512, 765.1),
    ("minilm_fp32", 1, 32, 211.1),
    ("minilm_fp32", 1, 128, 213.5),
    ("minilm_fp32", 8, 32, 217.7),
    ("minilm_fp32", 8, 128, 328.5),
    ("minilm_fp32", 4, 256, 381.2),
    ("minilm_fp32", 16, 128, 481.6),
    ("minilm_fp32", 2, 512, 490.7),
    ("minilm_fp32", 32, 64, 433.1),
    ("minilm_fp32", 4, 512, 801.0),
    ("gpt2m_int8", 1, 32, 184.8),
    ("gpt2m_int8", 1, 128, 218.3),
    ("gpt2m_int8", 8, 32, 290.7),
    ("gpt2m_int8", 8, 128, 734.4),
    ("gpt2m_int8", 4, 256, 745.6),
    ("gpt2m_int8", 16, 128, 1320.5),
    ("gpt2m_int8", 2, 512, 770.1),
    ("gpt2m_int8", 32, 64, 1308.7),
    ("gpt2m_int8", 4, 512, 1392.5),
    ("gpt2m_none", 1, 32, 150.5),
    ("gpt2m_none", 1, 128, 198.3),
    ("gpt2m_none", 8, 32, 269.5),
    ("gpt2m_none", 8, 128, 713.5),
    ("gpt2m_none", 4, 256, 724.1),
    ("gpt2m_none", 16, 128, 1299.2),
    ("gpt2m_none", 2, 512, 748.8),
    ("gpt2m_none", 32, 64, 1287.8),
    ("gpt2m_none", 4, 512, 1371.2),
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
    backend: str = "ort"  # which backend trains: ``ort`` or ``portable`` (``backend.resolve_backend``)

    @classmethod
    def of(cls, manifest: Manifest, backend: str = "ort") -> "ModelFigures":
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
                   loss_chunks=int(mem.get("loss_chunks", 0)), backend=backend)


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def factors(backend: str) -> Factors:
    """The fitted constants of ``backend``."""
    return PORTABLE_FACTORS if backend == "portable" else ORT_FACTORS


def loaded_bytes(manifest: Manifest, backend: str = "ort") -> int:
    """Predicted RSS once the training session is loaded, before the first step."""
    f, k = ModelFigures.of(manifest, backend), factors(backend)
    return int(k.runtime + k.session + k.weight_load * (f.frozen_bytes + FLOAT * f.trainable_values))


def predict(manifest: Manifest, batch: int, seq_len: int, backend: str = "ort") -> Prediction:
    """Peak RSS of a training step on ``batch`` rows padded to ``seq_len`` tokens, on ``backend``."""
    return predict_figures(ModelFigures.of(manifest, backend), batch, seq_len)


def step_terms(f: ModelFigures, batch: int, seq_len: int) -> dict[str, float]:
    """The byte counts the step factors multiply (what ``benchmarks/calibrate_memory.py`` fits them to)."""
    tokens = batch * seq_len
    logits = FLOAT * tokens * f.vocab if f.causal else 0
    chunked = f.loss_chunks and f.backend == "ort"  # the portable graph computes full logits
    return {"dequantized": FLOAT * f.quantized_bytes,
            "tokens": FLOAT * f.layers * (9 * f.hidden + 2 * f.intermediate) * tokens,
            "scores": FLOAT * f.layers * f.heads * batch * seq_len * seq_len,
            "logits": 0 if chunked else logits,
            "chunked_logits": logits if chunked else 0,
            # an int8 LM head dequantized to fp32 for the full logits (the portable graph keeps it for backward)
            "dequantized_head": FLOAT * f.vocab * f.hidden if f.causal and f.quantized_bytes else 0}


def predict_figures(f: ModelFigures, batch: int, seq_len: int) -> Prediction:
    """``predict`` from the figures themselves (export-time planning has no manifest yet)."""
    k, t = factors(f.backend), step_terms(f, batch, seq_len)
    dequantized = k.dequant * t["dequantized"] + k.dequantized_head * t["dequantized_head"]
    activations = k.token * t["tokens"] + k.score * t["scores"]
    logits = k.logit * t["logits"] + k.chunked_logit * t["chunked_logits"]
    step = k.step + dequantized + activations + logits
    workspace = max(0.0, k.fp32_floor * (f.frozen_bytes - f.quantized_bytes) - step)
    return Prediction(
        runtime=int(k.runtime + k.session + k.step + workspace),
        weights=int(k.weight_load * (f.frozen_bytes + FLOAT * f.trainable_values)),
        optimizer=int(3 * FLOAT * f.trainable_values),
        dequantized=int(dequantized),
        activations=int(activations),
        logits=int(logits),
    )
