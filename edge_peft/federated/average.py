"""Devices' updates -> the global adapter, by the store's aggregation (one place for averaging: ``store/aggregate.py``).

Each update is decoded and checked whole (``adapters/compressed.py``: shapes of the base's spec, dtypes, finite
values, scales that belong to their values) and refused in one line naming the device otherwise; a B prefix of
``rank`` channels is widened with zero columns and marked, so the mean averages each channel over the devices
that sent it. The default policy is FedAvg: weights by examples (each capped at 10x the median device's, as the
store caps), no clipping, any number of devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..adapters.updates import decode_update
from ..artifact.adapter_section import AdapterSpec
from ..artifact.names import is_b
from ..errors import UserError
from ..store.aggregate import AggregationPolicy, Source, aggregate
from .device_round import trained_shapes

FEDAVG = AggregationPolicy(min_devices=1, weighting="samples", clip_norm="off")


@dataclass(frozen=True)
class Received:
    """One device's reply as it arrived: who, for which base, how encoded, how many channels, how many examples."""

    label: str
    base: str
    encoding: str
    rank: int
    examples: int
    tensors: Mapping[str, np.ndarray]


def as_source(spec: AdapterSpec, reply: Received, reference: Mapping[str, np.ndarray] | None = None,
              topk: float = 0.1) -> Source:
    """A reply as an aggregation source (full-rank tensors); UserError naming the device when it does not fit.
    ``reference``: the global version the round started from, which an ``int8-topk`` delta is added to."""
    if reply.base != spec.base_fingerprint:
        raise UserError(f"{reply.label} sent an adapter for base {reply.base[:19]}..., this federation trains "
                        f"{spec.base_fingerprint[:19]}...: give that device the federation's artifact")
    if type(reply.rank) is not int or not 1 <= reply.rank <= spec.rank:
        raise UserError(f"{reply.label} sent {reply.rank!r} rank channels; this base's rank is {spec.rank}")
    if type(reply.examples) is not int or reply.examples < 1:
        raise UserError(f"{reply.label} reports {reply.examples!r} training examples: it must be a positive integer")
    shapes = trained_shapes(spec, reply.rank)
    start = None if reference is None else {k: reference[k][:, : shapes[k][1]] if is_b(k) else reference[k]
                                            for k in shapes}
    decoded = decode_update(shapes, reply.tensors, reply.encoding, reply.label, start, topk)
    full = {}
    for key, value in decoded.items():
        if is_b(key) and reply.rank < spec.rank:
            value = np.concatenate([value, np.zeros((value.shape[0], spec.rank - reply.rank), np.float32)], axis=1)
        full[key] = value
    channels = {m.name: reply.rank for m in spec.modules} if reply.rank < spec.rank else None
    return Source(reply.label, reply.examples, lambda: full, channels)


def average(spec: AdapterSpec, replies: Sequence[Received], policy: AggregationPolicy = FEDAVG,
            reference: Mapping[str, np.ndarray] | None = None,
            topk: float = 0.1) -> tuple[dict[str, np.ndarray], dict, list[str]]:
    """(the global's trained tensors, the aggregation report, one line per refused reply); ``reference`` and
    ``topk`` decode ``int8-topk`` deltas."""
    sources, refused = [], []
    for reply in replies:
        try:
            sources.append(as_source(spec, reply, reference, topk))
        except UserError as exc:
            refused.append(str(exc))
    if not sources:
        raise UserError(f"no update fits this federation's adapter ({refused[0] if refused else 'no replies'})")
    merged, report = aggregate(spec, sources, policy)
    shapes = trained_shapes(spec)
    return {k: merged[k] for k in shapes}, report, refused
