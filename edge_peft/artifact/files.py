"""File names of an artifact directory, a run directory and a PEFT adapter directory: the one place they are spelled.

```
artifact/                       written by `edge-peft export`
  manifest.json                 MANIFEST
  tokenizer.json                TOKENIZER
  chat_template.json            CHAT_TEMPLATE: the tokenizer's chat template and special tokens' strings
  inference_model.onnx          INFERENCE_MODEL: forward graph, adapters as inputs
  generation_model.onnx         GENERATION_MODEL: causal LMs, one step with a KV cache, adapters as inputs
  training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint      ORT_* (backend "ort")
  portable_step.onnx, portable_init.safetensors                                PORTABLE_* (backend "portable")
  portable_step_int8.onnx       PORTABLE_INT8_STEP_MODEL: the step with int8 products (--compute int8)
  portable_pieces.json          PORTABLE_PIECES: a checkpointed step cut into pieces, run one after another
  portable_piece.<digest>.onnx  portable_piece(): each distinct piece once (exporter/portable_pieces.py)
  weights.data                  WEIGHTS_DATA: the weights of the ONNX graphs above, each tensor once
  warm_start.json               WARM_START: the adapter `adapter load` warm-started it from
  warm_start.safetensors        WARM_START_WEIGHTS: that adapter's tensors (what a top-k push is a delta against)
  layer_probe.json              LAYER_PROBE: why `--layers auto:N` chose its blocks

run/                            written by `edge-peft train`
  run.json                      RUN_INFO: artifact, data fingerprint, options, memory plan
  manifest.json                 MANIFEST (copy of the artifact's)
  checkpoint/                   CHECKPOINT: state, trainer.json, hooks.safetensors
  adapter/                      ADAPTER: the current adapter, PEFT format
  metrics.jsonl, summary.json   METRICS, SUMMARY
  outbox/                       OUTBOX: pushes queued while the store was unreachable

adapter/                        PEFT format
  adapter_config.json           ADAPTER_CONFIG
  adapter_model.safetensors     ADAPTER_WEIGHTS
  checksums.json                ADAPTER_CHECKSUMS: the sha256 of the two (edge_peft/checksums.py)
  pulled.json                   PULLED: what `edge-peft pull` fetched (kind, version, device, sha256, store)
```
"""

from __future__ import annotations

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.json"
INFERENCE_MODEL = "inference_model.onnx"
GENERATION_MODEL = "generation_model.onnx"
ORT_TRAINING_MODEL = "training_model.onnx"
ORT_EVAL_MODEL = "eval_model.onnx"
ORT_OPTIMIZER_MODEL = "optimizer_model.onnx"
ORT_CHECKPOINT = "checkpoint"
PORTABLE_STEP_MODEL = "portable_step.onnx"
PORTABLE_INT8_STEP_MODEL = "portable_step_int8.onnx"  # the same step, frozen-base products in int8 (--compute int8)
PORTABLE_PIECES = "portable_pieces.json"  # the plan of the checkpointed step's pieces (exporter/portable_pieces.py)
PORTABLE_PIECES_FORMAT = "edge-peft-portable-pieces-1"  # its "format"
WEIGHTS_DATA = "weights.data"  # the inference, generation and portable step graphs' weights (exporter/onnx_files.py)
PORTABLE_INITIAL_STATE = "portable_init.safetensors"  # the trainable tensors a fresh portable run starts from
WARM_START = "warm_start.json"
WARM_START_WEIGHTS = "warm_start.safetensors"
LAYER_PROBE = "layer_probe.json"

RUN_INFO = "run.json"
CHECKPOINT = "checkpoint"
CHECKPOINT_STATE = "state"  # inside CHECKPOINT: the backend's training state
CHECKPOINT_TRAINER = "trainer.json"  # inside CHECKPOINT: step and totals
CHECKPOINT_HOOKS = "hooks.safetensors"  # inside CHECKPOINT: the step hooks' arrays
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
OUTBOX = "outbox"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CHECKSUMS = "checksums.json"
PULLED = "pulled.json"


def portable_piece(digest: str) -> str:
    """The file of one distinct piece of a checkpointed portable step (``PORTABLE_PIECES``), by its graph's digest."""
    return f"portable_piece.{digest}.onnx"
