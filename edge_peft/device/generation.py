"""Torch-free text generation with the artifact's KV-cache graph (``generation_model.onnx``).

A prompt is fed once (prefill); each new token then feeds one position, its keys and values appended to the
cache inside the graph. Per token the Python side does one ``run_with_iobinding``: the cache stays in ORT's
``OrtValue`` outputs, bound as the next step's inputs without a copy to numpy; the attention mask and
positions are views of buffers allocated once. Greedy by default; temperature / top-k / top-p sampling with
a seed. A new prompt that starts with the tokens already in the cache (the next turn of a chat) feeds only
what is new. Text comes out as pieces decoded incrementally (``TextStream``), so output streams as it comes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator

import numpy as np

from ..artifact.files import GENERATION_MODEL
from ..artifact.manifest import Manifest
from ..artifact.names import ATTENTION_MASK, CONTEXT_LENGTH_KEY, INPUT_IDS, POSITION_IDS
from ..backends.runtime import onnxruntime_module, session_options
from ..errors import UserError
from .chat_template import ChatTemplate


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature`` 0) or sampled from softmax(logits / temperature)
    cut to the ``top_k`` likeliest (0: all) and to the smallest set holding ``top_p`` of the probability."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        """One-line errors for settings that choose nothing."""
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature} is negative: use 0 (greedy) or a positive value")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} is negative: use 0 (all tokens) or a positive count")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} is outside (0, 1]: use e.g. 0.9, or 1 to keep every token")


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token id from the last position's logits."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / sampling.temperature
    candidates = np.argpartition(-z, sampling.top_k - 1)[: sampling.top_k] if 0 < sampling.top_k < z.size else \
        np.arange(z.size)
    p = np.exp(z[candidates] - z[candidates].max())
    p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), sampling.top_p)) + 1]
        candidates, p = candidates[keep], p[keep] / p[keep].sum()
    return int(candidates[rng.choice(len(candidates), p=p)])


class TextStream:
    """Token ids in, text pieces out: each piece is what the new token adds to the decoded text.

    Decodes a short window (the tokens since the last emitted piece plus a few before, for spacing) rather
    than the whole text; holds a piece back while it ends in an incomplete UTF-8 character (``\\ufffd``)."""

    def __init__(self, tokenizer, context: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context[-4:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=False)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class Generator:
    """The generation graph's session, the adapter fed to it, and the KV cache of the tokens fed so far."""

    def __init__(self, artifact: Path, manifest: Manifest, adapter: dict[str, np.ndarray], tokenizer,
                 threads: int = 0):
        path = Path(artifact) / GENERATION_MODEL
        if manifest.task != "causal-lm":
            raise UserError("this artifact is a classifier: use `edge-peft classify`, not generate or chat")
        if not path.is_file():
            raise UserError(f"{artifact} has no {GENERATION_MODEL} (exported before KV-cache generation): re-export "
                            "it with `edge-peft export`")
        ort = onnxruntime_module()
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.tokenizer = tokenizer
        self.eos_ids = {manifest.eos_token_id} - {None}
        self.context_length = int(self.session.get_modelmeta().custom_metadata_map[CONTEXT_LENGTH_KEY])
        inputs = self.session.get_inputs()
        self._past_names = [i.name for i in inputs if i.name.startswith("past.")]
        self._outputs = [o.name for o in self.session.get_outputs()]  # logits, then present in past's order
        _, heads, _, dim = inputs[[i.name for i in inputs].index(self._past_names[0])].shape
        self._empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, 0, dim), np.float32))
        self._binding = self.session.io_binding()
        fixed = {INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *self._past_names}
        self._adapter = {i.name: np.ascontiguousarray(adapter[i.name]) for i in inputs if i.name not in fixed}
        for name, value in self._adapter.items():
            self._binding.bind_cpu_input(name, value)
        self._mask = np.ones((1, self.context_length), np.int64)
        self._positions = np.arange(self.context_length, dtype=np.int64)[None]
        self._ort = ort
        self.reset()

    def reset(self) -> None:
        """Empty the cache."""
        self._ids: list[int] = []
        self._past = [self._empty] * len(self._past_names)

    def _forward(self, new: list[int]) -> np.ndarray:
        """Feed ``new`` after the cached tokens; the last position's logits."""
        start, end = len(self._ids), len(self._ids) + len(new)
        binding = self._binding
        new_ids = np.array([new], np.int64)  # alive until the run: a binding may point into its memory
        binding.bind_cpu_input(INPUT_IDS, new_ids)
        binding.bind_cpu_input(ATTENTION_MASK, self._mask[:, :end])
        binding.bind_cpu_input(POSITION_IDS, self._positions[:, start:end])
        for name, value in zip(self._past_names, self._past):
            binding.bind_ortvalue_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        logits, *self._past = binding.get_outputs()
        self._ids += new
        return logits.numpy()[0]

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Feed ``ids``, reusing the cached tokens they start with (at least the last one is fed again)."""
        if not ids:
            raise UserError("the prompt is empty: give some text to continue")
        if len(ids) > self.context_length:
            raise UserError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                            f"{self.context_length}: shorten it")
        common = 0
        for a, b in zip(self._ids, ids[:-1]):
            if a != b:
                break
            common += 1
        if common == 0:
            self.reset()
        elif common < len(self._ids):
            self._past = [self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :common]))
                          for v in self._past]
            self._ids = self._ids[:common]
        return self._forward(ids[common:])

    def stream_ids(self, ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                   stop: Collection[int] = ()) -> Iterator[int]:
        """Continue ``ids``: yield each new token id until an end-of-sequence or ``stop`` token (not yielded),
        ``max_new_tokens`` or the context's end."""
        rng = np.random.default_rng(sampling.seed)
        stops = self.eos_ids | set(stop)
        logits = self._prefill(ids)
        for n in range(max_new_tokens):
            token = choose(logits, sampling, rng)
            if token in stops:
                return
            yield token
            if n + 1 == max_new_tokens or len(self._ids) >= self.context_length:
                return
            logits = self._forward([token])

    def stream(self, ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
               stop: Collection[int] = ()) -> Iterator[str]:
        """``stream_ids`` decoded incrementally: text pieces that join to the continuation of ``ids``."""
        text = TextStream(self.tokenizer, ids)
        for token in self.stream_ids(ids, max_new_tokens, sampling, stop):
            piece = text.push(token)
            if piece:
                yield piece


class Conversation:
    """A chat through the model's chat template: the messages so far, and a generator whose cache holds them
    (each turn feeds only the newly rendered tokens)."""

    def __init__(self, generator: Generator, template: ChatTemplate, system: str | None = None):
        self.generator, self.template = generator, template
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        eos = template.special_tokens.get("eos_token")
        eos_id = generator.tokenizer.token_to_id(eos) if isinstance(eos, str) else None
        self.stop = {eos_id} - {None}  # the template's end of turn, where it differs from the model's eos

    def reply(self, text: str, max_new_tokens: int, sampling: Sampling = Sampling()) -> Iterator[str]:
        """Add the user's ``text`` and stream the assistant's answer; the answer joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for piece in self.generator.stream(self._prompt(), max_new_tokens, sampling, self.stop):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def _prompt(self) -> list[int]:
        """The rendered conversation's ids; the oldest turns after a system message are dropped until it fits."""
        while True:
            ids = self.template.encode(self.generator.tokenizer, self.messages, add_generation_prompt=True)
            first = 1 if self.messages[0]["role"] == "system" else 0
            if len(ids) < self.generator.context_length or len(self.messages) - first <= 1:
                return ids
            del self.messages[first : first + 2]
