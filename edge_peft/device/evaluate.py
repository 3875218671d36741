"""``edge-peft eval``: score a model on a whole data file: accuracy with per-class precision and recall for a
classifier, mean loss and perplexity over the target tokens for a causal LM."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..artifact.manifest import IGNORE_INDEX
from .chat_template import ChatTemplate
from .data import Tokenized, read_examples
from .inference import Predictor


def evaluate_file(predictor: Predictor, data: str | Path, batch_size: int = 16) -> dict:
    """The scores of ``predictor`` on every example of ``data`` (the same formats as ``train --data``)."""
    m = predictor.manifest
    examples = read_examples(data, m.task, m.labels)
    if m.task == "sequence-classification":
        predicted = [label for label, _ in predictor.classify([e.text for e in examples], batch_size)]
        return classification_scores([m.labels[e.label] for e in examples], predicted, m.labels)
    tokenized = Tokenized(predictor.tokenizer, examples, m.task, predictor.max_seq_len, m.pad_token_id,
                          m.eos_token_id, ChatTemplate.load(predictor.artifact))
    total, count = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        batch = tokenized.batch(list(range(start, min(start + batch_size, len(tokenized)))))
        logits = predictor.logits(batch.input_ids, batch.attention_mask)
        for row, labels in zip(logits, batch.labels):  # one row at a time in float64: T x V, not B x T x V
            valid = labels != IGNORE_INDEX
            row = row[valid].astype(np.float64)
            row -= row.max(axis=-1, keepdims=True)
            log_probs = row - np.log(np.exp(row).sum(axis=-1, keepdims=True))
            total -= float(np.take_along_axis(log_probs, labels[valid][:, None], axis=-1).sum())
            count += int(valid.sum())
    loss = total / count if count else float("nan")
    return {"examples": len(examples), "tokens": count, "loss": loss, "perplexity": math.exp(loss) if count else None}


def classification_scores(truth: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, and precision, recall and support of every class."""
    per_class = {}
    for label in labels:
        hits = sum(t == p == label for t, p in zip(truth, predicted))
        said = sum(p == label for p in predicted)
        support = sum(t == label for t in truth)
        per_class[label] = {"precision": hits / said if said else None, "recall": hits / support if support else None,
                            "support": support}
    accuracy = sum(t == p for t, p in zip(truth, predicted)) / len(truth)
    return {"examples": len(truth), "accuracy": accuracy, "classes": per_class}


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 of two texts over lower-cased whitespace words (longest common subsequence)."""
    ref, cand = reference.lower().split(), candidate.lower().split()
    if not ref or not cand:
        return 0.0
    previous = [0] * (len(cand) + 1)
    for r in ref:
        current = [0]
        for j, c in enumerate(cand):
            current.append(previous[j] + 1 if r == c else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
