"""Tiny random causal LMs of every supported decoder family (real transformers architectures), for tests.

Each is 2 blocks, hidden 32, 4 query and 2 key/value heads, the toy tokenizer's vocabulary, and keeps
what makes its family special: Qwen2's q/k/v biases, Qwen3's q_norm/k_norm, Phi-3's fused qkv_proj and
gate_up_proj with partial rotary, Gemma's soft-capping, scaled embeddings and sliding-window layers
(window 4, shorter than the toy sentences), tied or untied embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path

import toy

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, bos_token_id=4, eos_token_id=4, pad_token_id=0, initializer_range=0.2)


def _config(family: str, vocab: int, **overrides):
    """The tiny transformers config of ``family`` (``overrides``: other common settings, e.g. more blocks)."""
    import transformers as tf

    common = dict(_COMMON, vocab_size=vocab, **overrides)
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=4, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8, tie_word_embeddings=True)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                               final_logit_softcapping=3.0, attn_logit_softcapping=5.0)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":
        return tf.Phi3Config(**common, partial_rotary_factor=0.5, tie_word_embeddings=False)
    raise ValueError(f"unknown family {family}")


def make_family_model(family: str, out: Path, **overrides) -> Path:
    """Save the tiny random ``family`` causal LM (``overrides``: of its common settings) and the toy tokenizer
    into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    vocab = toy.save_tokenizer(out, classifier=False)
    model = AutoModelForCausalLM.from_config(_config(family, vocab, **overrides))
    model.save_pretrained(out)
    return out



def portable_families() -> tuple[str, ...]:
    """Families whose portable step graphs the suite exports: ``EDGE_PEFT_PORTABLE_FAMILIES`` (a comma list or
    ``all``); by default Gemma 2 and Phi-3 (soft-capping in the chunked loss, fused projections), the others
    by hand, since each portable export takes about a minute on 2 cores."""
    chosen = os.environ.get("EDGE_PEFT_PORTABLE_FAMILIES", "gemma2,phi3")
    return FAMILIES if chosen == "all" else tuple(f for f in chosen.split(",") if f in FAMILIES)
