"""One device's federated round with the torch-free trainer: start from the global adapter, train the round's
steps (``device.trainer.open_run`` and ``TrainingRun.run``, as ``edge-peft train``), send B (or its first ``rank``
channels) and the saved modules, fp32 or int8.

With client-side DP the noise multiplier is calibrated once for the whole federation (``rounds x local_steps`` steps
at this device's sampling rate) and each reply reports the epsilon spent over the rounds this device trained.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..adapters import compressed
from ..adapters.updates import encode_update
from ..artifact.adapter_section import AdapterSpec
from ..artifact.manifest import load_manifest
from ..artifact.names import is_b, onnx_name, peft_key
from ..device.data import read_examples
from ..device.privacy import epsilon, noise_for_epsilon
from ..device.trainer import TrainConfig, open_run
from ..errors import UserError
from .settings import FederatedSettings


@dataclass(frozen=True)
class DeviceUpdate:
    """What a device sends back: the encoded tensors, how, for how many examples, and its metrics."""

    tensors: dict[str, np.ndarray]
    encoding: str
    rank: int
    examples: int
    metrics: dict[str, float]


def trained_shapes(spec: AdapterSpec, rank: int = 0) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape of what travels: every trained tensor, B cut to its first ``rank`` channels (0: all)."""
    shapes = spec.expected_shapes(with_frozen=False)
    if 0 < rank < spec.rank:
        shapes = {k: (s[0], rank) if is_b(k) else s for k, s in shapes.items()}
    return shapes


def check_global(spec: AdapterSpec, base: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The server's global adapter, refused when it is for another base or does not fit the spec."""
    if base != spec.base_fingerprint:
        raise UserError(f"the server trains an adapter for base {base[:19]}..., this device's artifact is for "
                        f"{spec.base_fingerprint[:19]}...: give the device the federation's artifact")
    return compressed.decode(trained_shapes(spec), tensors, compressed.FP32, "the server's global adapter")


def train_round(settings: FederatedSettings, data: Path, base: str, global_tensors: Mapping[str, np.ndarray],
                server_round: int, rounds_trained: int, rank: int = 0) -> DeviceUpdate:
    """Train this device's round ``server_round`` (its ``rounds_trained``-th, counting this one) from the global."""
    artifact = Path(settings.artifact)
    manifest = load_manifest(artifact)
    spec = manifest.adapter
    start = check_global(spec, base, global_tensors)
    dp, noise = {}, {}
    if settings.dp_epsilon > 0:
        rate = settings.batch_size / len(read_examples(data, manifest.task, manifest.labels))
        sigma = _noise(settings.dp_epsilon, rate, settings.rounds * settings.local_steps, settings.dp_delta)
        noise = {"dp_clip": settings.max_grad_norm, "noise_multiplier": sigma, "dp_delta": settings.dp_delta}
        dp = {"epsilon": epsilon(sigma, rate, rounds_trained * settings.local_steps, settings.dp_delta),
              "noise-multiplier": sigma}
    config = TrainConfig(data=str(data), steps=settings.local_steps, batch_size=settings.batch_size, lr=settings.lr,
                         max_seq_len=settings.max_seq_len, eval_every=0, eval_fraction=0.0,
                         checkpoint_every=settings.local_steps, seed=server_round, threads=settings.threads,
                         schedule_start=(server_round - 1) * settings.local_steps,  # the federation's warm-up and decay
                         schedule_steps=settings.rounds * settings.local_steps,
                         backend=settings.backend, nested_ranks=settings.nested_ranks, **noise)
    with tempfile.TemporaryDirectory(prefix="edge-peft-round-") as tmp:
        run = open_run(artifact, config, Path(tmp) / "run")
        examples = len(run.data.train_pool)
        run.backend.set_trainable({onnx_name(k): v for k, v in start.items()})
        summary = run.run()
        trained = {peft_key(n): v for n, v in run.backend.trainable().items()}
    shapes = trained_shapes(spec, rank)
    sent = {k: np.ascontiguousarray(trained[k][:, : shapes[k][1]] if is_b(k) else trained[k]) for k in shapes}
    reference = {k: start[k][:, : shapes[k][1]] if is_b(k) else start[k] for k in shapes}
    encoded = encode_update(sent, settings.encoding, reference, settings.topk)
    metrics = {"train-loss": float(summary["final_loss"]), "bytes-up": float(compressed.nbytes(encoded)), **dp}
    return DeviceUpdate(encoded, settings.encoding, rank if 0 < rank < spec.rank else spec.rank, examples, metrics)


@functools.lru_cache(maxsize=16)
def _noise(target: float, rate: float, steps: int, delta: float) -> float:
    """The noise multiplier for ``target`` epsilon, computed once per process (a few seconds of accounting)."""
    return noise_for_epsilon(target, rate, steps, delta)

