"""What a federation runs with: one dataclass, filled from code or from Flower's run config and node config.

Flower passes settings as ``UserConfig`` (string keys, scalar values): the run config (``[tool.flwr.app.config]`` of
the app's pyproject.toml, or ``flwr run --run-config``) holds the federation's, the node config (``flower-supernode
--node-config``) what differs per device: its ``data`` file and the ``rank`` prefix its budget allows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ..adapters.compressed import FP32
from ..adapters.updates import UPDATE_ENCODINGS
from ..errors import UserError


@dataclass(frozen=True)
class FederatedSettings:
    artifact: str  # the artifact every device and the server share (same base, same seeded A)
    data: str = ""  # a device's training file (.jsonl); the node config's ``data`` overrides it
    data_dir: str = ""  # or a folder of ``client-<partition-id>.jsonl`` (simulation: one per virtual node)
    rounds: int = 5
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 1e-2
    max_seq_len: int = 128
    encoding: str = FP32  # fp32 | int8 (adapters/compressed.py) | int8-topk (adapters/sparse.py: deltas)
    topk: float = 0.1  # int8-topk: the fraction of each matrix's entries sent
    rank: int = 0  # channels of each B a device sends (0: all); a nested-rank device sends the prefix its budget allows
    nested_ranks: bool = False  # devices train with --nested-ranks (so that every prefix is an adapter)
    max_grad_norm: float = 0.0  # client-side DP-SGD (0: off): per-example bound, and the target epsilon over all rounds
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    threads: int = 1
    backend: str = "auto"
    min_clients: int = 2
    out: str = ""  # the server writes each round's global adapter and history.json here ("": nowhere)
    eval_data: str = ""  # the server scores each global adapter on this held-out .jsonl ("": not scored)
    store: str = ""  # the server pushes each round's global adapter to this store URL (admin token: EDGE_PEFT_ADMIN_TOKEN)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], base: "FederatedSettings | None" = None) -> "FederatedSettings":
        """Settings from a Flower ``UserConfig`` whose keys are the field names with ``-`` for ``_`` (unknown keys
        such as ``partition-id`` are left alone), over ``base``."""
        names = {f.name: f for f in fields(cls)}
        given = {k.replace("-", "_"): v for k, v in config.items() if k.replace("-", "_") in names}
        if base is None and "artifact" not in given:
            raise UserError("the Flower run config has no 'artifact': set it to the edge-peft artifact directory "
                            "(flwr run --run-config \"artifact='/path/to/artifact'\")")
        merged = dataclasses.replace(base, **given) if base is not None else cls(**given)
        return merged.checked()

    def checked(self) -> "FederatedSettings":
        problems = [
            (self.rounds >= 1, "rounds must be >= 1"),
            (self.local_steps >= 1, "local-steps must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.lr > 0, "lr must be positive"),
            (self.encoding in UPDATE_ENCODINGS, f"encoding must be one of {', '.join(UPDATE_ENCODINGS)}"),
            (0 < self.topk <= 1, "topk must be in (0, 1]"),
            (self.rank >= 0, "rank must be >= 0 (0: every channel)"),
            (self.dp_epsilon >= 0 and self.max_grad_norm >= 0, "dp-epsilon and max-grad-norm must be >= 0"),
            ((self.dp_epsilon > 0) == (self.max_grad_norm > 0), "client-side DP needs both max-grad-norm and dp-epsilon"),
        ]
        bad = [message for ok, message in problems if not ok]
        if bad:
            raise UserError(f"federated settings: {bad[0]}")
        return self

    def data_file(self, node_config: Mapping[str, Any]) -> Path:
        """This device's training file: the node config's ``data``, else ``data``, else ``data_dir`` by partition."""
        if node_config.get("data"):
            return Path(str(node_config["data"]))
        if self.data:
            return Path(self.data)
        if self.data_dir and "partition-id" in node_config:
            return Path(self.data_dir) / f"client-{int(node_config['partition-id'])}.jsonl"
        raise UserError("this device has no training data: start its SuperNode with --node-config \"data='FILE'\"")
