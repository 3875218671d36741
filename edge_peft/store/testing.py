"""Building blocks for the store's tests and benchmark: synthetic manifests, adapters and run directories."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..adapters.peft_format import save_adapter
from ..artifact.adapter_section import AdapterModule, AdapterSpec, ExtraTensor
from ..artifact.files import ADAPTER
from ..artifact.manifest import Manifest
from ..artifact.memory_section import MemoryFigures
from ..artifact.names import PEFT_PREFIX, lora_key
from ..backends.names import ORT
from ..variants import DEFAULT as DEFAULT_VARIANT
from ..variants import lora_a_from_seed


def make_manifest(layers: int = 2, hidden: int = 32, targets: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 4,
                  variant: str = DEFAULT_VARIANT, seed: int = 0, labels: int = 0, fingerprint: str | None = None) -> Manifest:
    """A small valid manifest: ``layers`` x ``targets`` square attention projections, optional classifier head."""
    modules = [AdapterModule(f"model.layers.{i}.self_attn.{t}", hidden, hidden, rank, a_seed=seed * 1_000_003 + i * 16 + j)
               for i in range(layers) for j, t in enumerate(targets)]
    task = "sequence-classification" if labels else "causal-lm"
    fingerprint = fingerprint or "sha256:" + hashlib.sha256(f"base-{layers}-{hidden}".encode()).hexdigest()
    spec = AdapterSpec(
        base_fingerprint=fingerprint, model_type="llama", architecture="LlamaForCausalLM", task=task, variant=variant,
        rank=rank, alpha=2.0 * rank, seed=seed, target_modules=list(targets), modules=modules,
        modules_to_save=[ExtraTensor("score.weight", [labels, hidden])] if labels else [])
    memory = MemoryFigures(frozen_bytes=0, quantized_bytes=0, trainable_values=spec.trainable_values(),
                           intermediate_size=4 * hidden)
    return Manifest(
        adapter=spec, quantization="none", max_seq_len=128, vocab_size=1000, hidden_size=hidden, num_layers=layers,
        num_heads=4, input_names=["input_ids", "attention_mask"], opset=17, ort_version="1.19.2", memory=memory,
        backends=[ORT], labels=[f"label{i}" for i in range(labels)],
    )


def random_tensors(spec: AdapterSpec, rng: np.random.Generator, scale: float = 0.02) -> dict[str, np.ndarray]:
    """A full adapter for ``spec``: seeded A (frozen-A variants) or random A, random B and modules_to_save."""
    tensors = {}
    for m in spec.modules:
        if not spec.kind.trains_a:
            tensors[lora_key(m.name, "A")] = lora_a_from_seed(m.a_seed, m.rank, m.in_features)
        else:
            tensors[lora_key(m.name, "A")] = (rng.standard_normal((m.rank, m.in_features)) * scale).astype(np.float32)
        tensors[lora_key(m.name, "B")] = (rng.standard_normal((m.out_features, m.rank)) * scale).astype(np.float32)
    for t in spec.modules_to_save:
        tensors[PEFT_PREFIX + t.name] = (rng.standard_normal(t.shape) * scale).astype(np.float32)
    return tensors


def write_run(run_dir: str | os.PathLike, manifest: Manifest, tensors: dict[str, np.ndarray], samples: int,
              steps: int = 10, parent: dict | None = None, meta: dict | None = None) -> Path:
    """A run directory as `edge-peft train` writes it: manifest.json, adapter/ (with ``meta`` in its
    edge-peft metadata), summary.json."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    manifest.save(run)
    save_adapter(run / ADAPTER, manifest.adapter, tensors, extra_meta=meta)
    summary = {"steps": steps, "samples": samples, "tokens": samples * 64, "final_loss": 1.5, "eval_loss": None,
               "peak_rss_mb": 512.0, "parent": parent}
    (run / "summary.json").write_text(json.dumps(summary))
    return run
