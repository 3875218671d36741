"""``manifest.json``: the exporter writes it; the device validates it before touching anything else.

Schema 2 nests the adapter section (``adapter``, the store's wire description too) and a typed memory
section (``memory``). An artifact of another schema is refused with one line saying to re-export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import atomic_write_json, sha256_file
from .adapter_section import AdapterSpec
from .files import LAYER_PROBE, MANIFEST, WARM_START, WARM_START_WEIGHTS
from .memory_section import MemoryFigures

SCHEMA_VERSION = 4  # 4: the portable step graph accumulates gradients, the loop runs AdamW (3: AdamW in the graph)
TASKS = ("causal-lm", "sequence-classification")
QUANTIZATIONS = ("none", "int8", "int4")
INT4_BLOCK_SIZES = (32, 64, 128)  # int4: values per block along the reduced axis (exporter/int4.py)
IGNORE_INDEX = -100  # label value the loss skips (padding, prompt tokens)
ADAMW_BETAS = (0.9, 0.999)
UNCHECKED = {MANIFEST, WARM_START, WARM_START_WEIGHTS, LAYER_PROBE}  # written beside the artifact's files, not part of them  # in both backends' optimizers and wherever the device loop adjusts moments


@dataclass
class Manifest:
    """Everything the device, the planner and the store need to know about an artifact."""

    adapter: AdapterSpec
    quantization: str
    max_seq_len: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    input_names: list[str]
    opset: int
    ort_version: str
    memory: MemoryFigures
    backends: list[str]
    labels: list[str] = field(default_factory=list)
    pad_token_id: int = 0
    eos_token_id: int | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of every file the export wrote
    computes: list[str] = field(default_factory=lambda: ["fp32"])  # portable step graphs: backends/compute.py
    block_size: int | None = None  # int4: values per block (INT4_BLOCK_SIZES); None otherwise
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (the ORT optimizer graph has it built in)
    max_grad_norm: float = 1.0  # global gradient-norm clipping before each update (0: none)
    schema_version: int = SCHEMA_VERSION

    @property
    def task(self) -> str:
        return self.adapter.task

    @property
    def fingerprint(self) -> str:
        return self.adapter.base_fingerprint

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("adapter", "memory")}
        return {"adapter": self.adapter.to_dict(), "memory": self.memory.to_dict(), **out}

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> "Manifest":
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
            raw["adapter"] = AdapterSpec.from_dict(raw["adapter"], f"{source}: the adapter section")
            raw["memory"] = MemoryFigures.from_dict(raw["memory"], source)
            manifest = cls(**raw)
        except (KeyError, TypeError) as exc:
            raise UserError(f"{source} is missing or has unexpected fields ({exc}): re-export the artifact") from None
        manifest.validate(source)
        return manifest

    def validate(self, source: str = "manifest") -> None:
        """Check value ranges and internal consistency."""
        from ..backends.names import BACKENDS

        problems: list[str] = []
        self.adapter.validate(problems)
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} not in {TASKS}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization {self.quantization!r} not in {QUANTIZATIONS}")
        if (self.quantization == "int4") != (self.block_size in INT4_BLOCK_SIZES):
            problems.append(f"block size {self.block_size!r} does not fit quantization {self.quantization!r}")
        if not self.backends or set(self.backends) - set(BACKENDS):
            problems.append(f"backends {self.backends!r} not a non-empty subset of {BACKENDS}")
        if "fp32" not in self.computes or set(self.computes) - {"fp32", "int8"}:
            problems.append(f"computes {self.computes!r} must hold fp32 and nothing but fp32 and int8")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
                   for x in (self.weight_decay, self.max_grad_norm)):
            problems.append(f"weight decay {self.weight_decay!r} and max grad norm {self.max_grad_norm!r} must be >= 0")
        if self.task == "sequence-classification" and len(self.labels) < 2:
            problems.append("a classifier needs at least two labels")
        if problems:
            raise UserError(f"{source} is invalid ({'; '.join(problems)}): re-export the artifact")

    def save(self, directory: str | Path) -> None:
        atomic_write_json(Path(directory) / MANIFEST, self.to_dict())

    def record_files(self, directory: str | Path) -> None:
        """Set ``files`` to the sha256 of every file of the artifact in ``directory`` (not the manifest and the
        notes written beside it later)."""
        directory = Path(directory)
        self.files = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
                      if p.is_file() and p.name not in UNCHECKED and not p.name.startswith(".")}

    def verify_files(self, directory: str | Path) -> None:
        """Refuse, in one line naming the file, an artifact file that is missing or not what the export wrote."""
        for name, digest in self.files.items():
            path = Path(directory) / name
            if not path.is_file():
                raise UserError(f"{path} is missing: the artifact is incomplete; copy it again or re-export it")
            if sha256_file(path) != digest:
                raise UserError(f"{path} is corrupt or truncated (its sha256 differs from the manifest's): copy the "
                                "artifact again or re-export it")


def load_manifest(artifact: str | Path) -> Manifest:
    """Read and validate ``<artifact>/manifest.json`` with one-line errors for every failure."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not artifact.is_dir():
        raise UserError(f"{artifact} is not a directory: pass an artifact directory written by `edge-peft export`")
    if not path.is_file():
        raise UserError(f"{path} is missing: {artifact} is not an edge-peft artifact; run `edge-peft export` first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is corrupt ({exc.__class__.__name__}: {exc}): re-export the artifact") from None
    return Manifest.from_dict(data, source=str(path))
