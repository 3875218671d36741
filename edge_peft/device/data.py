"""Local training data: ``.jsonl`` (``{"text"}`` or ``{"text", "label"}``) and ``.txt``; tokenization and batches.

Batches are padded to their longest example (dynamic axes), padding is masked and its labels are
-100 (ignored by the loss). Causal-LM labels are the next token; documents longer than the
maximum sequence length are cut into consecutive windows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..artifact.manifest import IGNORE_INDEX


@dataclass
class Example:
    text: str
    label: int | None = None


@dataclass
class Batch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.attention_mask.sum())

    def rows(self, start: int, stop: int) -> "Batch":
        """A sub-batch of rows ``start:stop`` trimmed to its own longest example."""
        mask = self.attention_mask[start:stop]
        width = max(1, int(mask.sum(axis=1).max()))
        labels = self.labels[start:stop]
        return Batch(self.input_ids[start:stop, :width], mask[:, :width], labels[:, :width] if labels.ndim == 2 else labels)


def read_examples(path: str | Path, task: str, labels: list[str]) -> list[Example]:
    """Parse a data file; one-line errors name the file (and line) and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: pass --data with a .jsonl or .txt file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it to UTF-8") from None
    if path.suffix == ".jsonl":
        examples = _read_jsonl(path, raw, task, labels)
    elif path.suffix == ".txt":
        if task != "causal-lm":
            raise UserError(f"{path}: a classifier needs labels; use a .jsonl file with {{\"text\", \"label\"}} lines")
        examples = [Example(block.strip()) for block in raw.split("\n\n") if block.strip()]
    else:
        raise UserError(f"{path} has suffix {path.suffix!r}: use .jsonl or .txt")
    if not examples:
        raise UserError(f"{path} holds no examples: add at least one non-empty text")
    return examples


def _read_jsonl(path: Path, raw: str, task: str, labels: list[str]) -> list[Example]:
    examples = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: malformed JSON ({exc.msg}): each line must be one JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f'{where}: expected an object with a string "text" field')
        label = None
        if task == "sequence-classification":
            label = _label_index(obj.get("label"), labels, where)
        examples.append(Example(obj["text"], label))
    return examples


def _label_index(value, labels: list[str], where: str) -> int:
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    raise UserError(f"{where}: label {value!r} is not one of the model's classes ({', '.join(labels)}); "
                    "fix the label or re-export with --labels")


def classifier_ids(tokenizer, texts: list[str], max_seq_len: int) -> list[list[int]]:
    """Token ids of classifier inputs, cut to ``max_seq_len`` by the tokenizer itself (its special tokens, e.g.
    ``[SEP]``, kept) and unpadded (batches pad): training and inference both encode through here, so they
    see the same ids."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_len)
    try:
        return [list(e.ids) for e in tokenizer.encode_batch(texts)]
    finally:
        tokenizer.no_truncation()


class Tokenized:
    """Examples turned into token sequences, ready to be batched in any order."""

    def __init__(self, tokenizer, examples: list[Example], task: str, max_seq_len: int, pad_id: int,
                 eos_id: int | None):
        self.task, self.pad_id = task, pad_id
        self.sequences: list[list[int]] = []
        self.targets: list[int] = []
        if task != "causal-lm":
            self.sequences = classifier_ids(tokenizer, [e.text for e in examples], max_seq_len)
            self.targets = [int(e.label) for e in examples]
            return
        for enc in tokenizer.encode_batch([e.text for e in examples]):  # causal LM: windows of the whole text
            ids = list(enc.ids)
            if eos_id is not None and (not ids or ids[-1] != eos_id):
                ids.append(eos_id)
            for start in range(0, max(len(ids) - 1, 1), max_seq_len):
                window = ids[start : start + max_seq_len + 1]
                if len(window) >= 2:
                    self.sequences.append(window)

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, indices: list[int]) -> Batch:
        """Pad the chosen examples to their longest; labels -100 where there is nothing to predict."""
        if self.task == "causal-lm":
            inputs = [s[:-1] for s in (self.sequences[i] for i in indices)]
            nexts = [s[1:] for s in (self.sequences[i] for i in indices)]
        else:
            inputs = [self.sequences[i] for i in indices]
            nexts = []
        width = max(len(s) for s in inputs)
        ids = np.full((len(inputs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, seq in enumerate(inputs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        if self.task == "causal-lm":
            labels = np.full((len(inputs), width), IGNORE_INDEX, dtype=np.int64)
            for row, seq in enumerate(nexts):
                labels[row, : len(seq)] = seq
        else:
            labels = np.array([self.targets[i] for i in indices], dtype=np.int64)
        return Batch(ids, mask, labels)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out index split."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_eval = int(round(n * fraction)) if n > 1 else 0
    n_eval = min(max(n_eval, 1 if fraction > 0 and n > 1 else 0), n - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def batch_indices(pool: list[int], batch_size: int, seed: int, micro_step: int) -> list[int]:
    """The examples of global micro-batch ``micro_step``: epochs of seeded permutations, a pure function.

    Being pure in (seed, step) is what makes ``--resume`` continue with the same data order.
    """
    per_epoch = max(1, len(pool) // batch_size) if len(pool) >= batch_size else 1
    epoch, slot = divmod(micro_step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(pool))
    picks = [order[(slot * batch_size + k) % len(pool)] for k in range(batch_size)]
    return [pool[p] for p in picks]
