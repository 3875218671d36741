"""The run directory that ``edge-peft train`` writes and ``generate``/``adapter save``/``push`` read.

The layout is in ``artifact/files.py``. Every file is replaced atomically; ``checkpoint/`` as a whole.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from ..adapters.peft_format import complete_tensors, save_adapter
from ..artifact.files import (ADAPTER, CHECKPOINT, CHECKPOINT_HOOKS, CHECKPOINT_STATE, CHECKPOINT_TRAINER, MANIFEST,
                              METRICS, RUN_INFO, SUMMARY, WARM_START)
from ..artifact.manifest import Manifest, load_manifest
from ..artifact.names import peft_key
from ..backends import TrainingBackend
from ..checksums import digests, record_adapter, verify
from ..errors import UserError
from ..fileio import atomic_directory, atomic_write_bytes, atomic_write_json


@dataclass
class Totals:
    """What a run has done so far (checkpointed, so a resumed run continues the counts)."""

    samples: int = 0
    tokens: int = 0
    wall_s: float = 0.0


@dataclass
class Checkpoint:
    """A run's last checkpoint: the step it ends, its totals, the backend state file and the hooks' arrays."""

    step: int
    totals: Totals
    state: Path
    hooks: dict[str, np.ndarray] = field(default_factory=dict)


RUN_FILES = {RUN_INFO, MANIFEST, METRICS, SUMMARY, ADAPTER, CHECKPOINT}


def create_run(out: Path, artifact: Path, info: dict) -> None:
    """Make a new run directory: the artifact's manifest and ``run.json``. A run that never reached a
    checkpoint is started over (saying so); one with a checkpoint, or a folder holding other files, is refused."""
    if (out / RUN_INFO).exists():
        if find_checkpoint(out) is not None:
            raise UserError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
        start_over(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifact / MANIFEST, out / MANIFEST)
    write_run_info(out, info)


def read_run(run: str | Path) -> tuple[dict, Manifest]:
    """run.json and the manifest of a run directory, with one-line errors."""
    run = Path(run)
    path = run / RUN_INFO
    if not path.is_file():
        raise UserError(f"{run} is not a training run ({RUN_INFO} missing): pass the --out directory of `edge-peft train`")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is corrupt ({exc.msg}): start a new run") from None
    return info, load_manifest(run)


def write_run_info(run: Path, info: dict) -> None:
    atomic_write_json(run / RUN_INFO, info)


def artifact_of(run: str | Path) -> Path:
    """The artifact directory a run was trained from."""
    info, _ = read_run(run)
    artifact = Path(info["artifact"])
    if not (artifact / MANIFEST).is_file():
        raise UserError(f"the artifact {artifact} of run {run} is gone: restore it or pass the artifact directly")
    return artifact


def is_run(path: Path) -> bool:
    return (path / RUN_INFO).is_file()


def start_over(run: Path) -> None:
    """Remove a run that never reached a checkpoint (only the files a run writes; anything else is refused)."""
    others = sorted(p.name for p in run.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
    if others:
        raise UserError(f"{run} holds files a run does not write ({', '.join(others[:3])}): choose another --out")
    print(f"note: {run} stopped before its first checkpoint: starting it over from step 0", file=sys.stderr)
    shutil.rmtree(run)


def _step_of(folder: Path) -> int | None:
    """The step of a complete checkpoint folder (``trainer.json`` is written last), else None."""
    try:
        step = json.loads((folder / CHECKPOINT_TRAINER).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if (folder / CHECKPOINT_STATE).is_file() and isinstance(step, int) else None


def find_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run: ``checkpoint/``, or the old or new one a run killed while
    replacing it left beside it."""
    candidates = [run / CHECKPOINT, *run.glob(f".{CHECKPOINT}.*")]
    complete = [(step, folder) for folder in candidates if (step := _step_of(folder)) is not None]
    return max(complete, key=lambda c: (c[0], c[1] == run / CHECKPOINT))[1] if complete else None


def recover_checkpoint(run: Path) -> bool:
    """Put the newest complete checkpoint in place as ``checkpoint/`` and remove what killed runs left beside
    it; True when there is one."""
    newest = find_checkpoint(run)
    if newest is not None and newest != run / CHECKPOINT:
        shutil.rmtree(run / CHECKPOINT, ignore_errors=True)
        os.replace(newest, run / CHECKPOINT)
    for leftover in run.glob(".*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    shutil.rmtree(run / f".{CHECKPOINT}.old", ignore_errors=True)
    shutil.rmtree(run / f".{ADAPTER}.old", ignore_errors=True)
    return newest is not None


def read_checkpoint(run: Path) -> Checkpoint:
    """The run's last checkpoint (``recover_checkpoint`` first), its files checked against ``trainer.json``."""
    folder = run / CHECKPOINT
    trainer = json.loads((folder / CHECKPOINT_TRAINER).read_text())
    verify(folder, trainer.get("files", {}), str(folder / CHECKPOINT_TRAINER), "start a new run (or restore the "
                                                                            "checkpoint from a backup)")
    hooks = folder / CHECKPOINT_HOOKS
    return Checkpoint(trainer["step"], Totals(**trainer["totals"]), folder / CHECKPOINT_STATE,
                      load_file(hooks) if hooks.is_file() else {})


def write_checkpoint(run: Path, backend: TrainingBackend, step: int, totals: Totals,
                     hook_state: dict[str, np.ndarray]) -> None:
    """Atomically replace ``checkpoint/`` with the backend state, the hooks' arrays, then the step, totals and
    their sha256 (written last: a folder with ``trainer.json`` is complete)."""
    with atomic_directory(run / CHECKPOINT, overwrite=True) as tmp:
        backend.save_state(tmp / CHECKPOINT_STATE)
        if hook_state:
            atomic_write_bytes(tmp / CHECKPOINT_HOOKS, save(hook_state))
        atomic_write_json(tmp / CHECKPOINT_TRAINER, {"step": step, "totals": totals.__dict__,
                                                     "files": digests(tmp, [CHECKPOINT_STATE, CHECKPOINT_HOOKS])})


def write_adapter(run: Path, manifest: Manifest, trainable: dict, meta: dict | None = None) -> Path:
    """The run's current adapter in PEFT format (seeded A regenerated)."""
    spec = manifest.adapter
    tensors = complete_tensors(spec, {peft_key(k): v for k, v in trainable.items()})
    path = save_adapter(run / ADAPTER, spec, tensors, extra_meta=meta)
    record_adapter(path)
    return path


def write_summary(run: Path, summary: dict) -> None:
    atomic_write_json(run / SUMMARY, summary)


def read_summary(run: Path) -> dict:
    return json.loads((run / SUMMARY).read_text())


def warm_start_of(artifact: Path) -> dict | None:
    """What ``adapter load`` warm-started ``artifact`` from (the parent of its runs' adapters), if anything."""
    path = artifact / WARM_START
    return json.loads(path.read_text()) if path.is_file() else None


def truncate_metrics(run: Path, step: int) -> None:
    """Drop metric lines of steps at or after ``step`` (a resumed run writes them again)."""
    path = run / METRICS
    if path.is_file():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
        atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())
