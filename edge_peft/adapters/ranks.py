"""Heterogeneous ranks: adapters that keep only some rank channels of each module.

Every adapted module is exported at rank ``r``; adaptive allocation prunes channels and nested-rank
training keeps prefixes. On the device and in the store an adapter always has the full rank, a
dropped channel being a zero column of B. A *compact* file keeps only the surviving channels:
``B[:, kept]`` and ``A[kept, :]`` (for LoRA-FA exactly the seeded rows of A), with per-module ranks
in PEFT's ``rank_pattern`` and the kept indices in the file's edge-peft metadata (``channels``), so
it expands back exactly. Because LoRA-FA devices share every row of A, the average of full-rank B's
with zero columns is exactly the average of the weight updates, whatever channels each device kept.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import UserError
from ..artifact.adapter_section import AdapterSpec
from ..artifact.names import is_b, is_lora_factor, lora_key
from ..variants import lora_a_from_seed

CHANNELS_KEY = "channels"
NESTED_KEY = "nested_ranks"  # in the metadata of an adapter trained with --nested-ranks


def surviving_channels(spec: AdapterSpec, tensors: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """Per module, the channels whose B column is not all zero (at least channel 0 is kept)."""
    kept = {}
    for m in spec.modules:
        b = tensors[lora_key(m.name, "B")]
        alive = [int(k) for k in np.flatnonzero(np.any(b != 0, axis=0))]
        kept[m.name] = alive or [0]
    return kept


def nested_gain(rank: int, k: int) -> float:
    """Scale of a nested-rank adapter's first ``k`` channels relative to the full rank: ``sqrt(rank / k)``.

    Prefix ``k`` trains and runs at rsLoRA's rank-stabilised ``alpha / sqrt(k)``, normalised so the full
    rank keeps the export's ``alpha / r`` (the scales compared are in ``docs/adaptive-ranks.md``).
    """
    return float(np.sqrt(rank / k))


def nested_prefix(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], meta: dict,
                  k: int) -> tuple[dict[str, np.ndarray], dict[str, list[int]], dict]:
    """The rank-``k`` adapter inside a nested-rank run's adapter: (full-rank tensors with the first ``k``
    B columns times ``nested_gain``, the channels to keep, metadata). Below the full rank the result is an
    ordinary adapter, no longer nested (its own prefixes would need another gain)."""
    if not 1 <= k <= spec.rank:
        raise UserError(f"--rank {k} must be between 1 and the exported rank {spec.rank}")
    if not meta.get(NESTED_KEY):
        raise UserError(f"--rank {k} needs an adapter trained with --nested-ranks (only its prefixes are "
                        "adapters): drop --rank, or train with --nested-ranks")
    channels = {m.name: list(range(k)) for m in spec.modules}
    if k == spec.rank:
        return dict(tensors), channels, meta
    gain = np.float32(nested_gain(spec.rank, k))
    scaled = {key: v * gain if is_b(key) else v for key, v in tensors.items()}
    return scaled, channels, {key: v for key, v in meta.items() if key != NESTED_KEY}


def compact(spec: AdapterSpec, tensors: Mapping[str, np.ndarray],
            channels: Mapping[str, list[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Full-rank PEFT tensors -> (tensors with only ``channels``, PEFT ``rank_pattern``)."""
    out = {k: v for k, v in tensors.items() if not is_lora_factor(k)}
    pattern = {}
    for m in spec.modules:
        kept = channels[m.name]
        out[lora_key(m.name, "A")] = np.ascontiguousarray(tensors[lora_key(m.name, "A")][kept, :])
        out[lora_key(m.name, "B")] = np.ascontiguousarray(tensors[lora_key(m.name, "B")][:, kept])
        pattern[m.name] = len(kept)
    return out, pattern


def keep_channels(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], channels: Mapping[str, list[int]],
                  meta: dict) -> tuple[dict[str, np.ndarray], dict, dict[str, int] | None]:
    """Full-rank tensors -> (tensors, file metadata, PEFT ``rank_pattern``) keeping only ``channels``:
    unchanged (no pattern, no channels metadata) when every channel is kept, else compact."""
    if all(len(kept) == spec.rank for kept in channels.values()):
        return dict(tensors), {k: v for k, v in meta.items() if k != CHANNELS_KEY}, None
    kept, pattern = compact(spec, tensors, channels)
    return kept, {**meta, CHANNELS_KEY: dict(channels)}, pattern


def expand(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], channels: object,
           source: str) -> dict[str, np.ndarray]:
    """A compact file's tensors -> full rank (dropped channels: zero B columns, A from the full tensors' rows).

    A LoRA-FA compact file may omit A (B-only); the caller completes it from the seeds afterwards.
    """
    if not isinstance(channels, dict) or set(channels) != {m.name for m in spec.modules}:
        raise UserError(f"{source} has malformed rank channels metadata: save it again with `edge-peft adapter save`")
    out = {k: v for k, v in tensors.items() if not is_lora_factor(k)}
    for m in spec.modules:
        kept = channels[m.name]
        if (not isinstance(kept, list) or not kept or len(set(kept)) != len(kept)
                or not all(isinstance(c, int) and 0 <= c < m.rank for c in kept)):
            raise UserError(f"{source}: channels of {m.name} must be distinct integers in 0..{m.rank - 1}")
        b = tensors.get(lora_key(m.name, "B"))
        if b is None or b.shape != (m.out_features, len(kept)):
            raise UserError(f"{source}: {lora_key(m.name, 'B')} must have shape {[m.out_features, len(kept)]} "
                            "for the channels it lists: the file is damaged; save it again")
        full_b = np.zeros((m.out_features, m.rank), np.float32)
        full_b[:, kept] = b
        out[lora_key(m.name, "B")] = full_b
        a = tensors.get(lora_key(m.name, "A"))
        if a is not None:
            if a.shape != (len(kept), m.in_features):
                raise UserError(f"{source}: {lora_key(m.name, 'A')} must have shape {[len(kept), m.in_features]}")
            if spec.kind.trains_a:
                full_a = np.zeros((m.rank, m.in_features), np.float32)
                full_a[kept, :] = a
                out[lora_key(m.name, "A")] = full_a
            elif not np.array_equal(a, lora_a_from_seed(m.a_seed, m.rank, m.in_features)[kept]):
                raise UserError(f"{source}: {lora_key(m.name, 'A')} is not the seeded LoRA-FA A of this base")
            # a seeded A: the full one is regenerated by the caller (complete_tensors)
    return out

