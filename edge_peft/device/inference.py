"""Torch-free inference from the artifact's inference model with any adapter fed as inputs."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from ..adapters.peft_format import load_adapter
from ..artifact.files import ADAPTER, INFERENCE_MODEL, TOKENIZER
from ..artifact.manifest import Manifest, load_manifest
from ..artifact.names import ATTENTION_MASK, INFERENCE_INPUTS, INPUT_IDS, LOGITS, onnx_name
from ..checksums import verify_adapter
from ..backends import initial_trainable
from ..backends.runtime import onnxruntime_module, quiet_logs, session_options
from ..errors import UserError
from .data import classifier_ids
from .generation import Generator, Sampling
from .run_dir import artifact_of, is_run, read_run


class Predictor:
    """An artifact's inference session (classify, logits) and generator (generate, chat), and the adapter
    tensors both are fed."""

    def __init__(self, source: str | Path, adapter: str | Path | None = None, threads: int = 0):
        quiet_logs()
        source = Path(source)
        run_info = read_run(source)[0] if is_run(source) else None
        self.artifact = artifact_of(source) if run_info else source
        self.manifest: Manifest = load_manifest(self.artifact)
        self.manifest.verify_files(self.artifact)
        self.max_seq_len = (_trained_seq_len(run_info) if run_info else None) or self.manifest.max_seq_len
        if adapter is None and run_info:
            adapter = source / ADAPTER
        self.threads = threads
        self.tensors = self._adapter_tensors(adapter)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.artifact / TOKENIZER))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()  # classifiers truncate in ``encode``; prompts and texts stay whole

    @cached_property
    def session(self):
        """The inference model's session (opened on first use: generation runs the generation model instead)."""
        return onnxruntime_module().InferenceSession(str(self.artifact / INFERENCE_MODEL),
                                                     session_options(self.threads), providers=["CPUExecutionProvider"])

    @cached_property
    def feeds(self) -> dict[str, np.ndarray]:
        """The adapter tensors the inference model takes as inputs."""
        wanted = {i.name for i in self.session.get_inputs()} - set(INFERENCE_INPUTS)
        return {name: self.tensors[name] for name in wanted}

    @cached_property
    def generator(self) -> Generator:
        """KV-cache generation with this predictor's adapter (``generation.Generator``)."""
        return Generator(self.artifact, self.manifest, self.tensors, self.tokenizer, self.threads)

    def _adapter_tensors(self, adapter: str | Path | None) -> dict[str, np.ndarray]:
        """ONNX-named tensors of the adapter, or the artifact's initial ones (zero B, head from export)."""
        if adapter is None:
            return initial_trainable(self.artifact, self.manifest)
        if not Path(adapter).is_dir():
            raise UserError(f"adapter {adapter} does not exist: pass a directory written by `edge-peft adapter save` "
                            "(or a run that reached a checkpoint)")
        verify_adapter(Path(adapter))
        return {onnx_name(k): v for k, v in load_adapter(adapter, self.manifest.adapter).items()}

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {INPUT_IDS: input_ids.astype(np.int64), ATTENTION_MASK: attention_mask.astype(np.int64), **self.feeds}
        return self.session.run([LOGITS], feeds)[0]

    def classify(self, texts: list[str], batch_size: int = 16) -> list[tuple[str, float]]:
        """(label, probability) per text."""
        if self.manifest.task != "sequence-classification":
            raise UserError("this artifact is a causal LM: use `edge-peft generate`, not classify")
        out = []
        for i in range(0, len(texts), batch_size):
            seqs = self.encode(texts[i : i + batch_size])
            width = max(len(s) for s in seqs)
            ids = np.full((len(seqs), width), self.manifest.pad_token_id, np.int64)
            mask = np.zeros_like(ids)
            for r, s in enumerate(seqs):
                ids[r, : len(s)], mask[r, : len(s)] = s, 1
            probs = _softmax(self.logits(ids, mask))
            if not np.all(np.isfinite(probs)):
                raise UserError("the model's outputs are not finite (NaN or Inf): the adapter diverged; retrain it "
                                "with a lower --lr or use another --adapter")
            out += [(self.manifest.labels[int(p.argmax())], float(p.max())) for p in probs]
        return out

    def encode(self, texts: list[str]) -> list[list[int]]:
        """A classifier's input ids, exactly as training encoded them (``data.classifier_ids``)."""
        return classifier_ids(self.tokenizer, texts, self.max_seq_len)

    def prompt_ids(self, prompt: str) -> list[int]:
        """A causal LM's prompt as token ids: the tokenizer's special tokens kept, a trailing end-of-sequence
        dropped."""
        ids = list(self.tokenizer.encode(prompt).ids)
        if self.manifest.eos_token_id is not None and ids and ids[-1] == self.manifest.eos_token_id:
            ids = ids[:-1]
        return ids

    def stream(self, prompt: str, max_new_tokens: int = 40, sampling: Sampling = Sampling()) -> Iterator[str]:
        """Continue ``prompt``, yielding text pieces as the tokens come (greedy unless ``sampling`` says)."""
        return self.generator.stream(self.prompt_ids(prompt), max_new_tokens, sampling)

    def generate(self, prompt: str, max_new_tokens: int = 40, sampling: Sampling = Sampling()) -> str:
        """The continuation of ``prompt`` as one string."""
        return "".join(self.stream(prompt, max_new_tokens, sampling))


def _trained_seq_len(info: dict) -> int | None:
    """The sequence length a run trained at (``run.json``): its memory plan's, else its --max-seq-len."""
    return (info.get("plan") or {}).get("max_seq_len") or info["config"].get("max_seq_len")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def accuracy(predictor: Predictor, rows: list[dict]) -> float:
    """Fraction of ``{"text", "label"}`` rows the predictor labels correctly."""
    if not rows:
        raise UserError("no rows to score: pass a non-empty held-out set")
    predicted = predictor.classify([r["text"] for r in rows])
    return sum(p == r["label"] for (p, _), r in zip(predicted, rows)) / len(rows)
