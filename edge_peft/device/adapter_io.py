"""``adapter save`` / ``adapter load``: move adapters between runs, artifacts and PEFT directories."""

from __future__ import annotations

import os
from pathlib import Path

from ..adapters.peft_format import load_adapter, onnx_name, read_metadata, save_adapter
from ..adapters.ranks import keep_channels, nested_prefix, surviving_channels
from ..adapters.spec import AdapterSpec
from ..errors import UserError
from ..fileio import atomic_write_json
from ..manifest import load_manifest
from .backend import OrtTrainingBackend
from .portable_backend import write_initial_trainable
from .run_dir import WARM_START_FILE, read_run


def save_run_adapter(run: str | Path, out: str | Path, rank: int | None = None) -> Path:
    """Copy a run's current adapter to ``out`` as a PEFT directory (validated on the way).

    ``rank`` keeps the rank-``rank`` adapter of a nested-rank run (``ranks.nested_prefix``);
    without it, channels an adaptive-rank run pruned (zero B columns) are left out. Either way the
    file carries per-module ranks in ``rank_pattern`` and loads in PEFT.
    """
    _, manifest = read_run(run)
    spec = AdapterSpec.from_manifest(manifest)
    source = Path(run) / "adapter"
    if not source.is_dir():
        raise UserError(f"{run} has no adapter yet (no checkpoint reached): train longer or lower --checkpoint-every")
    tensors = load_adapter(source, spec)
    meta = read_metadata((source / "adapter_model.safetensors").read_bytes())
    if rank is not None:
        tensors, channels, meta = nested_prefix(spec, tensors, meta, rank)
    else:
        channels = surviving_channels(spec, tensors)
    kept, meta, pattern = keep_channels(spec, tensors, channels, meta)
    return save_adapter(out, spec, kept, rank_pattern=pattern, extra_meta=meta)


def load_into_artifact(artifact: str | Path, adapter: str | Path) -> int:
    """Write a PEFT adapter's tensors into the artifact's checkpoint so training continues from it.

    Refuses another base (fingerprint) or other shapes. Returns the number of tensors written.
    The checkpoint is replaced atomically.
    """
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    spec = AdapterSpec.from_manifest(manifest)
    tensors = {onnx_name(k): v for k, v in load_adapter(adapter, spec).items()}
    names: list[str] = []
    if "ort-training" in manifest.backends:
        # Parameters are written through a live training session: writing into a bare loaded
        # CheckpointState crashes ORT 1.19.2.
        backend = OrtTrainingBackend(artifact, manifest, threads=1)
        names = [n for n in backend.names if n in tensors]
        backend.set_trainable({n: tensors[n] for n in names})
        tmp = artifact / ".checkpoint.tmp"
        backend.save_state(tmp, include_optimizer=False)
        os.replace(tmp, artifact / "checkpoint")
    if "portable" in manifest.backends:
        names = write_initial_trainable(artifact, tensors)
    meta = read_metadata((Path(adapter) / "adapter_model.safetensors").read_bytes())
    atomic_write_json(artifact / WARM_START_FILE, meta.get("store") or {"adapter": str(Path(adapter).resolve())})
    return len(names)
