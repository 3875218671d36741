"""The artifact contract between exporter and device: ``manifest.json``.

The exporter writes it; the device validates it before touching anything else; the store
uses its adapter section to check pushed tensors. Plain data, JSON only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import atomic_write_json

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TASKS = ("causal-lm", "sequence-classification")
VARIANTS = ("lora-fa", "lora")
QUANTIZATIONS = ("none", "int8")
IGNORE_INDEX = -100  # label value the loss skips (padding, prompt tokens)
TRAINING_INPUTS = ["input_ids", "attention_mask", "labels", "loss_scale"]
BACKENDS = ("ort-training", "portable")  # ORT's on-device training API; the portable graphs (portable_spec.py)


@dataclass
class AdapterModule:
    """One adapted linear layer: its path in the HF model, its shape and how A is regenerated."""

    name: str
    in_features: int
    out_features: int
    rank: int
    a_seed: int


@dataclass
class ExtraTensor:
    """A trainable tensor that is not a LoRA factor (e.g. a new classification head)."""

    name: str
    shape: list[int]


@dataclass
class Manifest:
    """Everything the device, the planner and the store need to know about an artifact."""

    base_fingerprint: str
    model_type: str
    architecture: str
    task: str
    variant: str
    rank: int
    alpha: float
    seed: int
    target_modules: list[str]
    modules: list[AdapterModule]
    quantization: str
    max_seq_len: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    input_names: list[str]
    opset: int
    ort_version: str
    labels: list[str] = field(default_factory=list)
    modules_to_save: list[ExtraTensor] = field(default_factory=list)
    backends: list[str] = field(default_factory=lambda: ["ort-training"])
    pad_token_id: int = 0
    eos_token_id: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / r applied to B(Ax)."""
        return self.alpha / self.rank

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> "Manifest":
        """Build and validate a manifest from parsed JSON; raise UserError naming what is wrong."""
        if not isinstance(data, dict):
            raise UserError(f"{source} is not a JSON object: re-export the artifact with `edge-peft export`")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{source} has schema version {version!r}, this edge-peft reads version {SCHEMA_VERSION}: "
                "re-export the artifact with this version of `edge-peft export`"
            )
        try:
            raw = dict(data)
            raw["modules"] = [AdapterModule(**m) for m in raw["modules"]]
            raw["modules_to_save"] = [ExtraTensor(**t) for t in raw.get("modules_to_save", [])]
            manifest = cls(**raw)
        except (KeyError, TypeError) as exc:
            raise UserError(f"{source} is missing or has unexpected fields ({exc}): re-export the artifact") from None
        manifest.validate(source)
        return manifest

    def validate(self, source: str = "manifest") -> None:
        """Check value ranges and internal consistency."""
        problems = []
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} not in {TASKS}")
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} not in {VARIANTS}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization {self.quantization!r} not in {QUANTIZATIONS}")
        if not self.modules:
            problems.append("no adapter modules")
        if not self.backends or set(self.backends) - set(BACKENDS):
            problems.append(f"backends {self.backends!r} not a non-empty subset of {BACKENDS}")
        if self.task == "sequence-classification" and len(self.labels) < 2:
            problems.append("a classifier needs at least two labels")
        if not str(self.base_fingerprint).startswith("sha256:"):
            problems.append("base_fingerprint is not a sha256")
        for m in self.modules:
            if m.rank <= 0 or m.rank > min(m.in_features, m.out_features):
                problems.append(f"module {m.name} has rank {m.rank} outside 1..{min(m.in_features, m.out_features)}")
        if problems:
            raise UserError(f"{source} is invalid ({'; '.join(problems)}): re-export the artifact")

    def save(self, directory: str | Path) -> None:
        atomic_write_json(Path(directory) / MANIFEST_NAME, self.to_dict())


def load_manifest(artifact: str | Path) -> Manifest:
    """Read and validate ``<artifact>/manifest.json`` with one-line errors for every failure."""
    artifact = Path(artifact)
    path = artifact / MANIFEST_NAME
    if not artifact.is_dir():
        raise UserError(f"{artifact} is not a directory: pass an artifact directory written by `edge-peft export`")
    if not path.is_file():
        raise UserError(f"{path} is missing: {artifact} is not an edge-peft artifact; run `edge-peft export` first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is corrupt ({exc.__class__.__name__}: {exc}): re-export the artifact") from None
    return Manifest.from_dict(data, source=str(path))
