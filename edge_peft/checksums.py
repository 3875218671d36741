"""sha256 checksums of the files a checkpoint or an adapter directory holds, recorded when they are written
and verified before they are used: a corrupted file is refused in one line naming it.

An artifact records its files in its manifest (``Manifest.record_files``); a checkpoint in its
``trainer.json``; an adapter directory (a run's ``adapter/``, ``adapter save``, ``pull``) in
``checksums.json`` beside the PEFT files. An adapter directory without one (written by PEFT, or by an older
edge-peft) is read unchecked.
"""

from __future__ import annotations

import json
from pathlib import Path

from .artifact.files import ADAPTER_CHECKSUMS, ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .errors import UserError
from .fileio import atomic_write_json, sha256_file


def digests(directory: Path, names: list[str]) -> dict[str, str]:
    """The sha256 of each of ``names`` that exists in ``directory``."""
    return {name: sha256_file(directory / name) for name in names if (directory / name).is_file()}


def verify(directory: Path, recorded: dict[str, str], where: str, fix: str) -> None:
    """Refuse, in one line naming the file, a recorded file that is missing or whose bytes changed."""
    for name, digest in recorded.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path} is missing ({where} lists it): {fix}")
        if sha256_file(path) != digest:
            raise UserError(f"{path} is corrupt or truncated (its sha256 differs from the one in {where}): {fix}")


def record_adapter(adapter_dir: Path) -> None:
    """Write ``checksums.json`` for the PEFT files of ``adapter_dir``."""
    atomic_write_json(adapter_dir / ADAPTER_CHECKSUMS, digests(adapter_dir, [ADAPTER_WEIGHTS, ADAPTER_CONFIG]))


def verify_adapter(adapter_dir: Path) -> None:
    """Check an adapter directory against its ``checksums.json`` (none: nothing to check)."""
    path = Path(adapter_dir) / ADAPTER_CHECKSUMS
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        recorded = None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise UserError(f"{path} is corrupt: save, pull or train the adapter again")
    verify(Path(adapter_dir), recorded, str(path), "save, pull or train the adapter again")
