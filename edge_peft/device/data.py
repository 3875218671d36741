"""Local training data: ``.jsonl`` lines of one shape per file, and ``.txt``; tokenization and batches.

Shapes (detected from a file's first line; every line must have it):

- ``{"text"}`` (``.txt`` too: blank-line separated blocks): every token trains. A document longer than the
  maximum sequence length is cut into consecutive windows.
- ``{"prompt", "completion"}`` (causal LM): the two strings joined as they are (put any separator in them),
  then the EOS token; only the completion and the EOS train (prompt labels -100) unless ``train_on_prompt``.
- ``{"messages": [{"role", "content"}, ...]}`` with an optional ``"tools"`` list (causal LM): rendered with the
  model's own chat template from the artifact (``chat_template.py``); the assistant turns train, their
  end-of-turn token included, unless ``train_on_prompt``.
- ``{"text", "label"}``: a classifier's examples.

A prompt/completion or chat example is never split into windows (that would lose its mask): one longer than
the maximum sequence length is cut from the left, so that its last trained part (the completion, the last
assistant turn) stays whole with what precedes it; a trained part longer than the maximum itself keeps its
start and loses its end. An example with nothing to train (no assistant turn) is refused in one line.

``pack`` concatenates examples, in file order, into sequences of up to the maximum length. The graphs take
``input_ids`` and ``attention_mask`` only, so a packed example attends to the examples before it in its
sequence (as TRL's packing without position ids); the first token of each example is never a target.

Batches are padded to their longest sequence (dynamic axes), padding is masked and its labels are -100
(ignored by the loss). Causal-LM labels are the next token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifact.manifest import IGNORE_INDEX
from ..errors import UserError
from .chat_template import ChatTemplate, check_messages

TRAIN_FILE, VALID_FILE = "train.jsonl", "valid.jsonl"  # a --data directory (MLX-LM's layout)
SHAPES = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "chat": ("messages",)}
ACCEPTED = '{"text"}, {"prompt", "completion"} or {"messages"} (with optional "tools")'


@dataclass
class Example:
    text: str = ""  # the text, or a prompt/completion line's completion
    label: int | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    tools: list | None = None
    where: str = field(default="", compare=False)  # file:line, for one-line errors


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


def data_files(path: str | Path) -> tuple[Path, Path | None]:
    """``--data``: a file, or a directory holding ``train.jsonl`` and optionally ``valid.jsonl`` (the held-out set)."""
    path = Path(path)
    if not path.is_dir():
        return path, None
    train = path / TRAIN_FILE
    if not train.is_file():
        raise UserError(f"{path} is a directory without {TRAIN_FILE}: put the training lines in {train} "
                        f"(held-out lines in {VALID_FILE}) or pass a .jsonl or .txt file")
    valid = path / VALID_FILE
    return train, valid if valid.is_file() else None


def read_examples(path: str | Path, task: str, labels: list[str]) -> list[Example]:
    """Parse a data file; one-line errors name the file (and line) and the fix."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: pass a .jsonl or .txt file (train --data also takes a directory "
                        f"holding {TRAIN_FILE} and {VALID_FILE})")
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


def _shape_of(obj: dict) -> str | None:
    """The shape a JSON line has: chat, prompt-completion, text, or None."""
    for shape in ("chat", "prompt-completion", "text"):
        if all(key in obj for key in SHAPES[shape]):
            return shape
    return None


def _read_jsonl(path: Path, raw: str, task: str, labels: list[str]) -> list[Example]:
    examples: list[Example] = []
    shape = None
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: malformed JSON ({exc.msg}): each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise UserError(f'{where}: expected an object with a string "text" field')
        if task == "sequence-classification":
            if not isinstance(obj.get("text"), str):
                raise UserError(f'{where}: expected an object with a string "text" field')
            examples.append(Example(obj["text"], _label_index(obj.get("label"), labels, where), where=where))
            continue
        found = _shape_of(obj)
        if shape is None:
            if found is None:
                raise UserError(f"{where}: the keys {sorted(obj)} are none of the accepted shapes: give every line "
                                f"{ACCEPTED}")
            shape = found
        elif found != shape:
            raise UserError(f"{where}: the keys {sorted(obj)} differ from the file's shape "
                            f"{{{', '.join(map(repr, SHAPES[shape]))}}} (its first line): give every line one shape")
        examples.append(_example(obj, shape, where))
    return examples


def _example(obj: dict, shape: str, where: str) -> Example:
    """One causal-LM line as an Example, its values checked."""
    if shape == "chat":
        check_messages(obj["messages"], obj.get("tools"), where)
        return Example(messages=obj["messages"], tools=obj.get("tools"), where=where)
    if shape == "prompt-completion":
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise UserError(f'{where}: "prompt" and "completion" must be strings')
        return Example(obj["completion"], prompt=obj["prompt"], where=where)
    if not isinstance(obj["text"], str):
        raise UserError(f'{where}: expected an object with a string "text" field')
    return Example(obj["text"], where=where)


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
    """Examples turned into token sequences, with the tokens that train marked, ready to be batched in any order."""

    def __init__(self, tokenizer, examples: list[Example], task: str, max_seq_len: int, pad_id: int,
                 eos_id: int | None, chat: ChatTemplate | None = None, train_on_prompt: bool = False,
                 pack: bool = False):
        self.task, self.pad_id = task, pad_id
        self.sequences: list[list[int]] = []
        self.trained: list[list[bool]] = []  # causal LM: per token, whether it is a target when it is the next
        self.targets: list[int] = []
        if task != "causal-lm":
            self.sequences = classifier_ids(tokenizer, [e.text for e in examples], max_seq_len)
            self.targets = [int(e.label) for e in examples]
            return
        plain = [e for e in examples if e.messages is None]
        encodings = iter(tokenizer.encode_batch([(e.prompt or "") + e.text for e in plain]))
        for example in examples:
            if example.messages is not None:
                ids, trained = _chat_tokens(tokenizer, example, chat, train_on_prompt)
            else:
                ids, trained = _plain_tokens(next(encodings), example, eos_id, train_on_prompt)
            if example.prompt is None and example.messages is None:  # plain text: windows of the whole document
                for start in range(0, max(len(ids) - 1, 1), max_seq_len):
                    if len(ids[start : start + max_seq_len + 1]) >= 2:
                        self.sequences.append(ids[start : start + max_seq_len + 1])
                        self.trained.append(trained[start : start + max_seq_len + 1])
                continue
            if not any(trained[1:]):
                raise UserError(f"{example.where}: nothing to train on (no assistant message, or an empty completion "
                                "without an EOS token): add one, or pass --train-on-prompt")
            ids, trained = fit(ids, trained, max_seq_len + 1)
            self.sequences.append(ids)
            self.trained.append(trained)
        if pack:
            self._pack(max_seq_len + 1)

    def _pack(self, limit: int) -> None:
        """Concatenate the sequences, in order, into sequences of at most ``limit`` tokens."""
        sequences, trained = [], []
        for ids, marks in zip(self.sequences, self.trained):
            if sequences and len(sequences[-1]) + len(ids) <= limit:
                sequences[-1] = sequences[-1] + ids
                trained[-1] = trained[-1] + [False] + marks[1:]  # nothing predicts an example's first token
            else:
                sequences.append(list(ids))
                trained.append(list(marks))
        self.sequences, self.trained = sequences, trained

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, indices: list[int]) -> Batch:
        """Pad the chosen examples to their longest; labels -100 where there is nothing to predict."""
        if self.task == "causal-lm":
            inputs = [self.sequences[i][:-1] for i in indices]
        else:
            inputs = [self.sequences[i] for i in indices]
        width = max(len(s) for s in inputs)
        ids = np.full((len(inputs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, seq in enumerate(inputs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        if self.task == "causal-lm":
            labels = np.full((len(inputs), width), IGNORE_INDEX, dtype=np.int64)
            for row, i in enumerate(indices):
                nexts = np.array(self.sequences[i][1:], dtype=np.int64)
                labels[row, : len(nexts)] = np.where(self.trained[i][1:], nexts, IGNORE_INDEX)
        else:
            labels = np.array([self.targets[i] for i in indices], dtype=np.int64)
        return Batch(ids, mask, labels)


def _plain_tokens(encoding, example: Example, eos_id: int | None, train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    """A text's or prompt/completion's ids (EOS appended) and, per token, whether it trains: a prompt's tokens
    (character span wholly before the completion) do not unless ``train_on_prompt``."""
    ids = list(encoding.ids)
    if example.prompt is None or train_on_prompt:
        trained = [True] * len(ids)
    else:
        start = len(example.prompt)
        trained = [end > start for _, end in encoding.offsets]
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
        trained.append(True)
    elif ids:
        trained[-1] = True  # the tokenizer's own EOS: the end of the completion
    return ids, trained


def _chat_tokens(tokenizer, example: Example, chat: ChatTemplate | None,
                 train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    """A conversation's ids through the model's chat template and, per token, whether it trains."""
    if chat is None:
        raise UserError(f'{example.where}: this artifact carries no chat template (exported before edge-peft wrote '
                        'chat_template.json): re-export it, or use {"text"} or {"prompt", "completion"} lines')
    return chat.tokenize(tokenizer, example.messages, example.tools, train_on_prompt, example.where)


def fit(ids: list[int], trained: list[bool], limit: int) -> tuple[list[int], list[bool]]:
    """An example cut to ``limit`` tokens from the left, keeping its last trained part and the token before it;
    a last trained part longer than that keeps its start (the example is not split into windows)."""
    if len(ids) <= limit:
        return ids, trained
    last = max(i for i in range(len(ids)) if trained[i] and (i == 0 or not trained[i - 1]))
    start = min(len(ids) - limit, max(0, last - 1))
    return ids[start : start + limit], trained[start : start + limit]


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
