"""The Flower strategy: Flower's FedAvg for sampling and messaging, the store's aggregation for the average.

Messages: the server sends ``arrays`` (the global's trained tensors, fp32, PEFT keys) and ``config`` (the round's
settings and the base fingerprint); a device answers ``arrays`` (its encoded update), ``metrics`` (``num-examples``,
``train-loss``, ``bytes-up``, and ``epsilon`` under DP) and ``config`` (``base``, ``encoding``, ``rank``). Arrays
travel as ``.npy`` without pickle (Flower's ``Array``).
"""

from __future__ import annotations

from logging import WARNING
from typing import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..artifact.adapter_section import AdapterSpec
from ..store.aggregate import AggregationPolicy, require_exact
from .average import FEDAVG, Received, average

RoundHook = Callable[[int, dict[str, np.ndarray], dict], None]


def to_record(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


class EdgePeftFedAvg(FedAvg):
    """FedAvg of LoRA-FA adapters over a shared seeded A, averaged by ``store.aggregate`` (refuses other variants)."""

    def __init__(self, spec: AdapterSpec, policy: AggregationPolicy = FEDAVG, on_round: RoundHook | None = None,
                 topk: float = 0.1, **fedavg) -> None:
        require_exact(spec)
        super().__init__(fraction_evaluate=0.0, **fedavg)
        self.spec, self.policy, self.on_round, self.topk = spec, policy, on_round, topk
        self.reference: dict[str, np.ndarray] | None = None  # the global version this round started from

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["base"] = self.spec.base_fingerprint
        self.reference = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        received = [_received(m) for m in valid]
        if not received:
            return None, None
        tensors, report, refused = average(self.spec, received, self.policy, self.reference, self.topk)
        for line in refused:
            log(WARNING, "round %s: refused %s", server_round, line)
        weights = np.array([r.examples for r in received], np.float64)
        metrics = {"devices": report["devices"], "refused": len(refused), "num-examples": int(weights.sum())}
        for key in ("train-loss", "bytes-up", "epsilon"):
            values = [float(m.content["metrics"][key]) for m in valid if key in m.content["metrics"]]
            if values:
                metrics[key] = max(values) if key == "epsilon" else float(np.mean(values))
        if self.on_round:
            self.on_round(server_round, tensors, metrics)
        return to_record(tensors), MetricRecord(metrics)


def _received(message: Message) -> Received:
    """A reply's parts, as sent (checked by ``average.as_source``)."""
    content, label = message.content, f"node {message.metadata.src_node_id}"
    config = content["config"] if "config" in content.config_records else ConfigRecord()
    metrics = content["metrics"] if "metrics" in content.metric_records else MetricRecord()
    arrays = from_record(content["arrays"]) if "arrays" in content.array_records else {}
    return Received(label, str(config.get("base", "")), str(config.get("encoding", "")), config.get("rank"),
                    metrics.get("num-examples"), arrays)
