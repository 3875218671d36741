"""Federated averaging of adapters whose variant averages exactly, robust to a few bad devices.

Every LoRA-FA device shares the same frozen A (regenerated from its seed), so the mean of the B
factors gives exactly the mean of the weight updates: sum_i w_i (s B_i A) = s (sum_i w_i B_i) A.
Variants that train A (LoRA, DoRA) do not: the mean of products is not the product of means, and
each refuses (``Variant.exact_average``).

What one device can do to the result is bounded (see docs/store.md, "Aggregation"):

- weights: equal by default; sample weighting is opt-in and caps each device's count;
- clipping: each device's B (and, separately, its ``modules_to_save`` tensors) is scaled down to at most
  a norm bound, by default the median of the devices' norms;
- method: the mean, or the coordinate-wise median or trimmed mean;
- a minimum number of devices, so that no device's adapter can be read back from a global version;
- an input that is not finite is refused, so the result is finite.

Sources may hold only some rank channels (heterogeneous devices sending the prefix their budget allows): the
mean then averages each channel of B over the sources that hold it (HetLoRA-style). For the channels every
source holds this is exactly the mean of their updates restricted to those channels (A's rows are shared);
a channel fewer sources hold is the mean over those sources only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..adapters.peft_format import complete_tensors
from ..artifact.adapter_section import AdapterSpec
from ..artifact.names import PEFT_PREFIX, lora_key
from ..errors import UserError
from .storage import StoreError

WEIGHTINGS = ("equal", "samples")
METHODS = ("mean", "median", "trimmed-mean")
SAMPLE_CAP_MEDIANS = 10  # samples weighting: by default a device counts at most 10 x the median device


@dataclass(frozen=True)
class AggregationPolicy:
    """How a global version is made from each device's latest adapter. The defaults are the robust ones."""

    min_devices: int = 3
    weighting: str = "equal"
    sample_cap: int | None = None  # samples weighting: most samples one device counts (None: 10 x the median)
    clip_norm: float | str = "auto"  # a bound on each device's norm; "auto": the median of the devices' norms; "off"
    method: str = "mean"
    trim: float = 0.1  # trimmed-mean: the fraction dropped at each end, per coordinate

    @classmethod
    def from_dict(cls, raw: Any) -> "AggregationPolicy":
        """A policy from JSON (missing keys keep their defaults); StoreError(400) naming the bad field."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict) or set(raw) - set(cls.__dataclass_fields__):
            raise StoreError(400, f"the aggregation policy must be a JSON object with keys among "
                                  f"{sorted(cls.__dataclass_fields__)}")
        return cls(**raw).checked()

    def checked(self) -> "AggregationPolicy":
        """Itself, when every field is in range; else StoreError(400) naming the field."""
        problems = []
        if type(self.min_devices) is not int or not 1 <= self.min_devices <= 1_000_000:
            problems.append("min_devices must be an integer >= 1")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting must be one of {WEIGHTINGS}")
        if self.sample_cap is not None and (type(self.sample_cap) is not int or self.sample_cap < 1):
            problems.append("sample_cap must be null or an integer >= 1")
        if self.clip_norm not in ("auto", "off") and not (
                type(self.clip_norm) in (int, float) and math.isfinite(self.clip_norm) and self.clip_norm > 0):
            problems.append("clip_norm must be 'auto', 'off' or a number > 0")
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}")
        if type(self.trim) not in (int, float) or not 0 <= self.trim < 0.5:
            problems.append("trim must be a number in [0, 0.5)")
        if self.method != "mean" and self.weighting != "equal":
            problems.append("the median and the trimmed mean weigh devices equally: pass weighting 'equal'")
        if problems:
            raise StoreError(400, f"invalid aggregation policy: {'; '.join(problems)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Source:
    """One device's latest adapter: how many samples it reports and how to read its full tensors."""

    label: str
    samples: int
    load: Callable[[], Mapping[str, np.ndarray]]  # full-rank tensors: a channel the source does not hold is zero
    channels: Mapping[str, int] | None = None  # per adapted module, how many leading rank channels it holds (None: all)
    norms: Sequence[float] | None = None  # its norm per clipping group, if known (``version_norms``): saves a read


def aggregate(spec: AdapterSpec, sources: Sequence[Source], policy: AggregationPolicy) -> tuple[dict[str, np.ndarray], dict]:
    """The global adapter (A regenerated from the seeds) and a report (devices, clip bounds, clipped count).

    Raises UserError when the variant cannot be averaged, there are too few devices, or an input is not
    finite. The result is then finite by construction: every method combines finite float32 values with
    weights summing to 1 (or picks among them) after scaling each by at most 1, so it stays within their range.
    The mean holds one adapter and the sum (clipping at the median reads each source twice, norms then the
    sum, unless every source's norms are known); the median and trimmed mean hold every device's trained tensors
    at once.
    """
    require_exact(spec)
    partial = any(s.channels is not None for s in sources)
    if partial and policy.method != "mean":
        raise UserError(f"the {policy.method} needs every device to hold every rank channel: aggregate nested-rank "
                        "prefixes with the mean")
    if len(sources) < policy.min_devices:
        raise UserError(f"{len(sources)} device(s) pushed for this base, a global version needs at least "
                        f"{policy.min_devices} so that no single device's adapter can be read back from it: wait for "
                        "more devices (or, for a fleet you alone own, pass --min-devices)")
    shapes = spec.expected_shapes(with_frozen=False)
    groups = _groups(spec, shapes)
    key_group = {key: g for g, keys in enumerate(groups.values()) for key in keys}
    held = [_float64(_trained(shapes, s)) for s in sources] if policy.method != "mean" else None
    bounds = _fixed_bounds(policy, len(groups))
    if bounds is None and held is None and all(s.norms is not None for s in sources):
        bounds = np.median(np.array([s.norms for s in sources], np.float64), axis=0)  # "auto", from recorded norms
    elif bounds is None:  # "auto": the median device's norms
        tensors = held or (_trained(shapes, s) for s in sources)
        bounds = np.median([_norms(t, groups, s.label) for t, s in zip(tensors, sources)], axis=0)
    scales = []

    def clip_scale(tensors: dict[str, np.ndarray], source: Source) -> np.ndarray:
        """Per group, the factor (at most 1) that scales the source down to its bound (its norms: recorded
        ones when known, which the push computed from the same values)."""
        norms = np.array(source.norms, np.float64) if source.norms is not None else _norms(tensors, groups, source.label)
        scale = np.divide(bounds, norms, out=np.ones_like(norms), where=norms > bounds)
        scales.append(scale)
        return scale

    if held is None:  # one source at a time, float32 as stored, scaled and summed in float64
        total: dict[str, np.ndarray] = {}
        weights = _weights(policy, [s.samples for s in sources])
        for source, weight in zip(sources, weights):
            tensors = _trained(shapes, source)
            scale = clip_scale(tensors, source)
            for key, value in tensors.items():
                scaled = np.multiply(value, np.float64(weight * scale[key_group[key]]), dtype=np.float64)
                if key in total:
                    total[key] += scaled
                else:
                    total[key] = scaled
        if partial:
            for key, cover in _coverage(spec, sources, weights).items():
                np.divide(total[key], cover, out=total[key], where=cover > 0)
    else:
        all_clipped = []
        for tensors, source in zip(held, sources):
            scale = clip_scale(tensors, source)
            all_clipped.append({key: value * scale[key_group[key]] for key, value in tensors.items()})
        total = {key: _robust_mean(np.stack([c[key] for c in all_clipped]), policy) for key in key_group}
    report = {"devices": len(sources), "clipped": int(np.sum(np.any(np.array(scales) < 1.0, axis=1))),
              "clip_bounds": {g: float(b) if np.isfinite(b) else None for g, b in zip(groups, bounds)},
              "policy": policy.to_dict()}
    return complete_tensors(spec, {key: v.astype(np.float32) for key, v in total.items()}), report


def version_norms(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], label: str) -> list[float]:
    """A full adapter's norm per clipping group, as ``aggregate`` computes it (recorded at push: with every
    device's norms known, the default clipping reads each adapter once instead of twice)."""
    shapes = spec.expected_shapes(with_frozen=False)
    return [float(n) for n in _norms({k: np.asarray(tensors[k]) for k in shapes}, _groups(spec, shapes), label)]


def _coverage(spec: AdapterSpec, sources: Sequence[Source], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Per B, the summed weight of the sources holding each rank channel (UserError for a count out of range)."""
    cover = {}
    for m in spec.modules:
        held = np.zeros(m.rank)
        for source, weight in zip(sources, weights):
            k = m.rank if source.channels is None else source.channels.get(m.name, m.rank)
            if type(k) is not int or not 1 <= k <= m.rank:
                raise UserError(f"{source.label} holds {k!r} channels of {m.name}, which has rank {m.rank}: it "
                                "does not fit this base's spec")
            held[:k] += weight
        cover[lora_key(m.name, "B")] = held
    return cover


def require_exact(spec: AdapterSpec) -> None:
    if not spec.kind.exact_average:
        raise UserError(f"adapters of variant {spec.variant!r} cannot be averaged exactly: {spec.kind.inexact_because}: "
                        "export with --variant lora-fa for federated averaging")


def _groups(spec: AdapterSpec, shapes: Mapping[str, Any]) -> dict[str, list[str]]:
    """The averaged tensors in the groups clipped separately: the adapter's trained factors, the saved modules."""
    saved = {PEFT_PREFIX + t.name for t in spec.modules_to_save}
    return {"adapter": sorted(k for k in shapes if k not in saved), "modules_to_save": sorted(k for k in shapes if k in saved)}


def _trained(shapes: Mapping[str, Any], source: Source) -> dict[str, np.ndarray]:
    """A source's averaged tensors (no seeded A) as stored; UserError if one is missing or has another shape."""
    tensors = source.load()
    if any(k not in tensors or tuple(tensors[k].shape) != tuple(shape) for k, shape in shapes.items()):
        raise UserError(f"{source.label} does not hold the tensors of this base's spec: `store remove-device` it")
    return {k: np.asarray(tensors[k]) for k in shapes}


def _float64(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in tensors.items()}


def _norms(tensors: Mapping[str, np.ndarray], groups: dict[str, list[str]], label: str) -> np.ndarray:
    """Each group's L2 norm, summed in float64 whatever the tensors' dtype (einsum: BLAS's dot pays thread
    start-up per small tensor); UserError if the tensors hold NaN or Inf."""
    norms = np.array([math.sqrt(sum(float(np.einsum("i,i", tensors[k].ravel(), tensors[k].ravel(), dtype=np.float64))
                                    for k in keys))
                      for keys in groups.values()])
    if not np.all(np.isfinite(norms)):
        raise UserError(f"{label} holds NaN or Inf: `store remove-device` it, then aggregate again")
    return norms


def _fixed_bounds(policy: AggregationPolicy, groups: int) -> np.ndarray | None:
    """Per group, the norm no device may exceed when it does not depend on the devices (None: "auto")."""
    if policy.clip_norm == "auto":
        return None
    return np.full(groups, np.inf if policy.clip_norm == "off" else float(policy.clip_norm))


def _weights(policy: AggregationPolicy, samples: list[int]) -> np.ndarray:
    if policy.weighting == "equal":
        return np.full(len(samples), 1.0 / len(samples))
    cap = policy.sample_cap or max(1, int(SAMPLE_CAP_MEDIANS * np.median(samples)))
    counted = np.minimum(np.array(samples, np.float64), cap)
    if counted.sum() <= 0:
        raise UserError("the adapters to average report no training samples: push adapters from runs that trained, "
                        "or aggregate with equal weights")
    return counted / counted.sum()


def _robust_mean(values: np.ndarray, policy: AggregationPolicy) -> np.ndarray:
    """Coordinate-wise median, or mean after dropping the ``trim`` fraction at each end."""
    if policy.method == "median":
        return np.median(values, axis=0)
    cut = int(policy.trim * values.shape[0])
    ordered = np.sort(values, axis=0)
    return ordered[cut: values.shape[0] - cut].mean(axis=0)
