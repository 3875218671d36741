"""A federation on Flower's simulation engine (Ray): ``clients`` virtual devices on this machine, each training
``data_dir/client-<i>.jsonl``; returns the server's history (rounds, metrics, held-out accuracy)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import UserError
from .apps import client_app, server_app
from .settings import FederatedSettings


def simulate(settings: FederatedSettings, clients: int, parallel: int = 1, quiet: bool = True) -> list[dict]:
    """Run ``settings.rounds`` rounds with ``clients`` virtual devices, ``parallel`` of them training at once (each
    gets ``settings.threads`` CPUs); ``settings.out`` receives the rounds' global adapters and ``history.json``."""
    from flwr.simulation import run_simulation

    if not settings.out:
        raise UserError("a simulation needs settings.out, the folder the server writes its rounds to")
    missing = [i for i in range(clients) if not (Path(settings.data_dir) / f"client-{i}.jsonl").is_file()]
    if missing:
        raise UserError(f"{settings.data_dir} has no client-{missing[0]}.jsonl: write one training file per client")
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    resources = {"num_cpus": settings.threads, "num_gpus": 0.0}
    environment = dict(os.environ)  # Ray's driver rewrites PYTHONPATH and more; later subprocesses must not inherit it
    try:
        run_simulation(server_app(settings), client_app(settings), num_supernodes=clients,
                       backend_config={"client_resources": resources,
                                       "init_args": {"num_cpus": settings.threads * parallel,
                                                     "log_to_driver": not quiet, "include_dashboard": False}})
    finally:
        os.environ.clear()
        os.environ.update(environment)
    history = Path(settings.out) / "history.json"
    if not history.is_file():
        raise UserError(f"the simulation wrote no {history}: it failed (run with quiet=False to see Flower's log)")
    return json.loads(history.read_text())
