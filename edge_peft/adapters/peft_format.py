"""Hugging Face PEFT format I/O on the numpy side: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only safetensors and JSON are read: never pickle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load

from ..artifact.adapter_section import AdapterSpec
from ..artifact.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..artifact.names import layer_index
from ..errors import UserError
from ..fileio import atomic_directory, atomic_write_bytes

METADATA_KEY = "edge_peft"
SAFETENSORS_INTEGERS = {np.dtype(np.int8): ("<i1", "I8"), np.dtype(np.uint16): ("<u2", "U16"),
                        np.dtype(np.int32): ("<i4", "I32")}
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


def peft_config(spec: AdapterSpec, rank_pattern: Mapping[str, int] | None = None) -> dict:
    """The ``adapter_config.json`` that ``peft.PeftModel.from_pretrained`` accepts for this spec."""
    rank_pattern = dict(rank_pattern or {})
    alpha_pattern = {name: spec.alpha * r / spec.rank for name, r in rank_pattern.items()}
    return {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[spec.task],
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(spec.target_modules),
        "modules_to_save": sorted({t.name.rsplit(".", 1)[0] for t in spec.modules_to_save}) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": spec.model_type == "gpt2",
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        **spec.kind.peft_options(),
        **_layers(spec),
        "base_model_name_or_path": spec.base_model,
    }


def _layers(spec: AdapterSpec) -> dict:
    """PEFT's ``layers_to_transform``/``layers_pattern``: without them PEFT wraps every block whose module
    names match a target, also blocks an adapter left out (``--layers``), and warns of their missing tensors."""
    blocks = {layer_index(m.name) for m in spec.modules}
    patterns = {m.name.split(f".{layer_index(m.name)}.")[0].rsplit(".", 1)[-1] for m in spec.modules
                if layer_index(m.name) is not None}
    if None in blocks or len(patterns) != 1:
        return {}
    return {"layers_to_transform": sorted(blocks), "layers_pattern": patterns.pop()}


def encode_adapter(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], extra_meta: dict | None = None) -> bytes:
    """Serialise PEFT-keyed tensors to safetensors bytes with edge-peft metadata in the header: float32, except
    the integer tensors of an encoded update (int8 values, uint16 or int32 indices), which keep their dtype.

    The header is written here with sorted keys so that equal tensors always give equal bytes (the
    safetensors writer orders its metadata map differently per call), which keeps sha256 a stable identity.
    """
    return b"".join(_safetensors_parts(spec, tensors, extra_meta))  # one copy of the tensors' bytes


def adapter_digest(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], extra_meta: dict | None = None
                   ) -> tuple[str, int]:
    """(sha256, size) of ``encode_adapter``'s bytes, without building them."""
    h, size = hashlib.sha256(), 0
    for part in _safetensors_parts(spec, tensors, extra_meta):
        h.update(part)
        size += len(part)
    return h.hexdigest(), size


def _safetensors_parts(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], extra_meta: dict | None
                       ) -> list[bytes | memoryview]:
    """The safetensors file in order: header length, header, each tensor's bytes (views, not copies)."""
    meta = {"base_fingerprint": spec.base_fingerprint, "variant": spec.variant, "seed": spec.seed}
    meta.update(extra_meta or {})
    header: dict = {"__metadata__": {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}}
    chunks: list[bytes | memoryview] = []
    offset = 0
    for key in sorted(tensors):
        kept = SAFETENSORS_INTEGERS.get(np.asarray(tensors[key]).dtype)
        data = memoryview(np.ascontiguousarray(tensors[key], dtype=kept[0] if kept else "<f4").reshape(-1)).cast("B")
        header[key] = {"dtype": kept[1] if kept else "F32", "shape": list(np.shape(tensors[key])),
                       "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces
    return [len(raw).to_bytes(8, "little"), raw, *chunks]


def decode_adapter(data: bytes, source: str = "adapter") -> tuple[dict[str, np.ndarray], dict]:
    """Parse safetensors bytes (never pickle) into tensors and the edge-peft metadata."""
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, Exception) as exc:  # safetensors raises several types on garbage
        raise UserError(f"{source} is not a valid safetensors file ({exc}): re-save it with `edge-peft adapter save`") from None
    meta = read_metadata(data)
    return tensors, meta


def read_metadata(data: bytes) -> dict:
    """The edge-peft metadata stored in a safetensors header ({} if absent)."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        return json.loads(header.get("__metadata__", {}).get(METADATA_KEY, "{}"))
    except (ValueError, AttributeError):
        return {}


def check_tensors(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], source: str, complete: bool = False) -> None:
    """Refuse tensors whose names, shapes, dtypes or values do not fit ``spec`` (a seeded A may be left out
    unless ``complete``)."""
    expected = spec.expected_shapes(with_frozen=True)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise UserError(f"{source} has tensors this base does not have ({', '.join(unknown[:3])}...): "
                        "it was trained for another model or targets")
    missing = sorted(set(spec.expected_shapes(with_frozen=complete)) - set(tensors))
    if missing:
        raise UserError(f"{source} lacks {len(missing)} tensors (e.g. {missing[0]}): save the adapter again from a full run")
    for key, arr in tensors.items():
        if tuple(arr.shape) != tuple(expected[key]):
            raise UserError(f"{source}: {key} has shape {list(arr.shape)}, the base expects {list(expected[key])}: "
                            "export with the same --rank/--targets or use a matching adapter")
        if arr.dtype not in (np.float32, np.float16):
            raise UserError(f"{source}: {key} has dtype {arr.dtype}, expected float32")
        if not np.all(np.isfinite(arr)):
            raise UserError(f"{source}: {key} contains NaN or Inf: the run diverged; lower --lr and retrain")


def complete_tensors(spec: AdapterSpec, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fill in every seeded A left out of an adapter by regenerating it from its seed."""
    return spec.kind.complete(spec.modules, tensors)


def save_adapter(out_dir: str | Path, spec: AdapterSpec, tensors: Mapping[str, np.ndarray],
                 rank_pattern: Mapping[str, int] | None = None, extra_meta: dict | None = None,
                 overwrite: bool = True) -> Path:
    """Write a PEFT adapter directory atomically; return its path."""
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        atomic_write_bytes(tmp / ADAPTER_WEIGHTS, encode_adapter(spec, tensors, extra_meta))
        atomic_write_bytes(tmp / ADAPTER_CONFIG, (json.dumps(peft_config(spec, rank_pattern), indent=2) + "\n").encode())
    return out


def load_adapter(adapter_dir: str | Path, spec: AdapterSpec) -> dict[str, np.ndarray]:
    """Read a PEFT adapter for ``spec``'s base; refuse another base or wrong shapes. Returns full tensors."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights} is missing: pass a directory written by `edge-peft adapter save` or PEFT's save_pretrained")
    data = weights.read_bytes()
    fp = read_metadata(data).get("base_fingerprint")
    if fp is not None and fp != spec.base_fingerprint:
        raise UserError(f"{adapter_dir} was trained on base {fp[:19]}..., this artifact's base is "
                        f"{spec.base_fingerprint[:19]}...: use an adapter trained on the same base model")
    return full_adapter(spec, data, str(weights))[0]


def full_adapter(spec: AdapterSpec, data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict]:
    """(full-rank float32 tensors with every seeded A, edge-peft metadata) of safetensors bytes for ``spec``:
    a compact file expanded, then refused unless its names, shapes, dtypes and values fit the spec and a frozen A
    it holds is the one its seed regenerates."""
    tensors, meta = decode_adapter(data, source)
    tensors = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    tensors = expand_if_compact(spec, tensors, meta, source)
    check_tensors(spec, tensors, source)
    spec.kind.check_seeded(spec.modules, tensors, source)
    return complete_tensors(spec, tensors), meta


def expand_if_compact(spec: AdapterSpec, tensors: dict[str, np.ndarray], meta: dict, source: str) -> dict[str, np.ndarray]:
    """Full-rank tensors of a file saved with only some rank channels (see ``ranks``); others unchanged."""
    from .ranks import CHANNELS_KEY, expand

    return expand(spec, tensors, meta[CHANNELS_KEY], source) if CHANNELS_KEY in meta else tensors
