"""ONNX files inside an artifact under construction: models past protobuf's 2 GB limit keep their weights in
one ``<file>.data`` beside them, and what a tracer writes (with, for a model over 2 GB, one external file per
weight) is scratch that is removed once read back."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

EXTERNAL_DATA_BYTES = 1_800_000_000


def save_model(proto: onnx.ModelProto, path: Path) -> None:
    """Save ``proto``; weights go to ``<file>.data`` beside it when the model nears protobuf's 2 GB limit."""
    if proto.ByteSize() < EXTERNAL_DATA_BYTES:
        onnx.save(proto, str(path))
        return
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=1024)


@contextlib.contextmanager
def scratch_file(folder: Path) -> Iterator[Path]:
    """A path for a tracer's ONNX file in a scratch folder under ``folder``; the folder, with the file and
    any weight files written beside it, is removed afterwards."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".trace-") as scratch:
        yield Path(scratch) / "model.onnx"
