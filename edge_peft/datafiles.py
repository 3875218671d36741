"""Locate the plain-data folders (``export/`` recipes, ``devices/`` profiles) in a checkout or an install."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def data_dir(name: str) -> Path:
    """The folder ``name`` from $EDGE_PEFT_DATA, the source checkout, or ``<prefix>/share/edge-peft``."""
    candidates = []
    if os.environ.get("EDGE_PEFT_DATA"):
        candidates.append(Path(os.environ["EDGE_PEFT_DATA"]) / name)
    candidates.append(Path(__file__).resolve().parents[1] / name)
    candidates.append(Path(sys.prefix) / "share" / "edge-peft" / name)
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[-1]
