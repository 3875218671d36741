"""``adapter save`` / ``adapter load``: move adapters between runs, artifacts and PEFT directories."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters.peft_format import load_adapter, read_metadata, save_adapter
from ..adapters.ranks import keep_channels, nested_prefix, surviving_channels
from ..artifact.files import ADAPTER, ADAPTER_WEIGHTS, PULLED, WARM_START, WARM_START_WEIGHTS
from ..artifact.manifest import load_manifest
from ..artifact.names import onnx_name
from ..backends import write_initial_trainable
from ..checksums import record_adapter, verify_adapter
from ..errors import UserError
from ..fileio import atomic_write_bytes, atomic_write_json
from .run_dir import read_run


def save_run_adapter(run: str | Path, out: str | Path, rank: int | None = None) -> Path:
    """Copy a run's current adapter to ``out`` as a PEFT directory (validated on the way).

    ``rank`` keeps the rank-``rank`` adapter of a nested-rank run (``ranks.nested_prefix``);
    without it, channels an adaptive-rank run pruned (zero B columns) are left out. Either way the
    file carries per-module ranks in ``rank_pattern`` and loads in PEFT.
    """
    _, manifest = read_run(run)
    spec = manifest.adapter
    source = Path(run) / ADAPTER
    if not source.is_dir():
        raise UserError(f"{run} has no adapter yet (no checkpoint reached): train longer or lower --checkpoint-every")
    verify_adapter(source)
    tensors = load_adapter(source, spec)
    meta = read_metadata((source / ADAPTER_WEIGHTS).read_bytes())
    if rank is not None:
        tensors, channels, meta = nested_prefix(spec, tensors, meta, rank)
    else:
        channels = surviving_channels(spec, tensors)
    kept, meta, pattern = keep_channels(spec, tensors, channels, meta)
    path = save_adapter(out, spec, kept, rank_pattern=pattern, extra_meta=meta)
    record_adapter(path)
    return path


def load_into_artifact(artifact: str | Path, adapter: str | Path) -> int:
    """Write a PEFT adapter's tensors into the artifact's checkpoint so training continues from it.

    Refuses another base (fingerprint) or other shapes. Returns the number of tensors written.
    The checkpoint is replaced atomically.
    """
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    verify_adapter(Path(adapter))
    tensors = {onnx_name(k): v for k, v in load_adapter(adapter, manifest.adapter).items()}
    manifest.verify_files(artifact)
    names = write_initial_trainable(artifact, manifest, tensors)
    manifest.record_files(artifact)  # the initial state changed: so do its checksums
    manifest.save(artifact)
    atomic_write_bytes(artifact / WARM_START_WEIGHTS, (Path(adapter) / ADAPTER_WEIGHTS).read_bytes())
    atomic_write_json(artifact / WARM_START, _parent(Path(adapter)))
    return len(names)


def _parent(adapter: Path) -> dict:
    """What a run warm-started from ``adapter`` names as its parent: the store version a pull fetched (kind,
    version and, for a device's, the device: what a push sends as its parent), else the adapter's path."""
    try:
        pulled = json.loads((adapter / PULLED).read_text())
        parent = {"kind": pulled["kind"], "version": int(pulled["version"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"adapter": str(adapter.resolve())}
    return parent | ({"device": pulled["device"]} if pulled["kind"] == "device" and pulled.get("device") else {})
