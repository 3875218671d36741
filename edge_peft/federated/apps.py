"""Flower's ``ClientApp`` (an edge-peft device) and ``ServerApp`` (the federation), and the server's record of rounds.

``client_app(settings)`` / ``server_app(settings)`` build apps around given settings (the simulation engine); the
module-level ``client`` and ``server`` read them from Flower's run config instead (``flwr run`` against a
SuperLink, with ``edge_peft.federated.apps:client`` / ``:server`` as the app's components). The server writes each
round's global adapter as a PEFT directory (``round-<n>/``, with checksums) and ``history.json`` into ``out``, and
scores it on ``eval_data`` when given.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..adapters.peft_format import complete_tensors, encode_adapter, save_adapter
from ..artifact.adapter_section import AdapterSpec
from ..artifact.manifest import Manifest, load_manifest
from ..artifact.names import peft_key
from ..backends import initial_trainable
from ..checksums import record_adapter
from ..device.data import read_examples
from ..errors import UserError
from ..fileio import atomic_write_json
from ..store.auth import ADMIN_TOKEN_ENV
from ..store.client import StoreClient
from .device_round import train_round
from .settings import FederatedSettings
from .strategy import EdgePeftFedAvg, from_record, to_record

ROUND_KEYS = ("rounds", "local-steps", "batch-size", "lr", "max-seq-len", "encoding", "topk", "nested-ranks",
              "max-grad-norm", "dp-epsilon", "dp-delta")  # what the server decides for every device (sent in each round's config)
STATE = "edge-peft"  # the device's record in Flower's node state: how many rounds it trained


def round_config(s: FederatedSettings) -> ConfigRecord:
    return ConfigRecord({key: getattr(s, key.replace("-", "_")) for key in ROUND_KEYS})


def client_app(settings: FederatedSettings | None = None) -> ClientApp:
    """A device: trains the round's steps from the global adapter and answers its update."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config = message.content["config"]
        s = FederatedSettings.from_config({k: config[k] for k in ROUND_KEYS if k in config},
                                          FederatedSettings.from_config(context.run_config, settings))
        state = context.state.metric_records.get(STATE, MetricRecord({"rounds-trained": 0}))
        state["rounds-trained"] = int(state["rounds-trained"]) + 1
        context.state[STATE] = state
        update = train_round(s, s.data_file(context.node_config), str(config["base"]),
                             from_record(message.content["arrays"]), int(config["server-round"]),
                             int(state["rounds-trained"]), int(context.node_config.get("rank", s.rank)))
        reply = RecordDict({
            "arrays": to_record(update.tensors),
            "metrics": MetricRecord({"num-examples": update.examples, **update.metrics}),
            "config": ConfigRecord({"base": str(config["base"]), "encoding": update.encoding, "rank": update.rank}),
        })
        return Message(content=reply, reply_to=message)

    return app


def server_app(settings: FederatedSettings | None = None) -> ServerApp:
    """The federation: ``rounds`` rounds of FedAvg over the connected devices, recorded in ``out``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, FederatedSettings.from_config(context.run_config, settings))

    return app


def run_federation(grid: Grid, s: FederatedSettings) -> list[dict]:
    """Run every round; returns the history (also written to ``out/history.json`` when ``out`` is set)."""
    artifact = Path(s.artifact)
    manifest = load_manifest(artifact)
    recorder = Recorder(s, manifest)
    start = {peft_key(n): v for n, v in initial_trainable(artifact, manifest).items()}
    recorder(0, start, {})
    strategy = EdgePeftFedAvg(manifest.adapter, on_round=recorder, topk=s.topk, min_available_nodes=s.min_clients,
                              min_train_nodes=s.min_clients)
    strategy.start(grid, to_record(start), num_rounds=s.rounds, train_config=round_config(s))
    return recorder.history


class Recorder:
    """Writes each round's global adapter and metrics (and its held-out accuracy) as the rounds end."""

    def __init__(self, s: FederatedSettings, manifest: Manifest) -> None:
        self.s, self.manifest, self.history = s, manifest, []
        self.eval_rows = ([{"text": e.text, "label": manifest.labels[e.label]} for e in
                           read_examples(s.eval_data, manifest.task, manifest.labels)] if s.eval_data else [])

    def __call__(self, server_round: int, tensors: dict[str, np.ndarray], metrics: dict) -> None:
        entry = {"round": server_round, **metrics}
        if self.s.store and server_round > 0:
            entry["store-version"] = push_global(self.s.store, self.manifest.adapter, tensors, server_round, metrics)
        if self.s.out:
            adapter = Path(self.s.out) / f"round-{server_round}"
            save_adapter(adapter, self.manifest.adapter, complete_tensors(self.manifest.adapter, tensors),
                         extra_meta={"federated_round": server_round})
            record_adapter(adapter)
            if self.eval_rows:
                from ..device.inference import Predictor, accuracy

                entry["accuracy"] = accuracy(Predictor(self.s.artifact, adapter), self.eval_rows)  # all cores
        self.history.append(entry)
        if self.s.out:
            atomic_write_json(Path(self.s.out) / "history.json", self.history)


def push_global(url: str, spec: AdapterSpec, tensors: dict[str, np.ndarray], server_round: int, metrics: dict) -> int:
    """Store a round's global adapter (B and saved modules; the store regenerates A) as the base's next global
    version, with the admin token in ``EDGE_PEFT_ADMIN_TOKEN``; returns its version number."""
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise UserError(f"the federation pushes each round's global adapter to {url}: set {ADMIN_TOKEN_ENV} to the store's "
                        "admin token for the ServerApp")
    data = encode_adapter(spec, tensors, extra_meta={"federated_round": server_round})
    meta = {"spec": spec.to_dict(), "samples": int(metrics.get("num-examples", 0)), "steps": 0,
            "metrics": {"federated_round": server_round, "devices": int(metrics.get("devices", 0))}, "parent": None,
            "sha256": hashlib.sha256(data).hexdigest()}
    with StoreClient(url, token) as client:
        return int(client.push_global(spec.base_fingerprint, meta, data)["number"])


client = client_app()
server = server_app()
