"""Tiny real transformers models (random weights, real architectures) and learnable toy data for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

POSITIVE = ["good", "great", "lovely", "superb", "happy"]
NEGATIVE = ["bad", "awful", "sad", "poor", "horrid"]
FILLER = ["the", "a", "day", "film", "food", "was", "it", "so", "very", "and", "we", "saw", "ate", "then", "our"]
SENTENCES = [
    "the cat sat on the mat and the dog ate the food .",
    "we saw a film and then we ate our food .",
    "it was a very good day and the cat was happy .",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]


def vocabulary() -> list[str]:
    words = set(POSITIVE + NEGATIVE + FILLER)
    for s in SENTENCES:
        words.update(s.split())
    return SPECIALS + sorted(words)


def save_tokenizer(model_dir: Path, classifier: bool) -> int:
    """A word-level tokenizer (tokenizers + PreTrainedTokenizerFast) saved into ``model_dir``; returns vocab size."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    if classifier:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="<eos>",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(model_dir)
    return len(vocab)


def make_model(kind: str, out: Path) -> Path:
    """Save a tiny ``bert`` classifier, ``gpt2`` or ``llama`` causal LM with its tokenizer into ``out``."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(out, classifier=kind == "bert")
    if kind == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, num_labels=2,
                            id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                            pad_token_id=0)
        model = BertForSequenceClassification(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                            bos_token_id=4, eos_token_id=4, pad_token_id=0, initializer_range=0.2)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=4, eos_token_id=4, pad_token_id=0, tie_word_embeddings=True,
                             initializer_range=0.2)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return out


# Tiny random LMs learn in a few dozen steps only when every block linear layer is adapted.
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def classification_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=int(rng.integers(4, 9))))
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE if label else NEGATIVE)))
        rows.append({"text": " ".join(words), "label": ["negative", "positive"][label]})
    return rows


def lm_rows(n: int) -> list[dict]:
    return [{"text": SENTENCES[i % len(SENTENCES)]} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
