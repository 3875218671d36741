"""ONNX files inside an artifact under construction: models past protobuf's 2 GB limit keep their weights in
one ``<file>.data`` beside them until ``share_weights`` moves the weights of all the artifact's graphs into one
file that holds each tensor once; what a tracer writes (with, for a model over 2 GB, one external file per
weight) is scratch that is removed once read back."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from ..artifact.files import WEIGHTS_DATA

EXTERNAL_DATA_BYTES = 1_800_000_000
SHARED_MIN_BYTES = 4096  # smaller tensors (shapes, scales of small weights) stay inline: shape inference reads them
PAGE = 4096  # shared tensors start on a page boundary, so the runtime can map them


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


def share_weights(folder: Path, names: list[str]) -> None:
    """Move the weights of the ONNX graphs ``names`` in ``folder`` (those present) into one ``WEIGHTS_DATA`` file
    beside them: a tensor of at least ``SHARED_MIN_BYTES`` that several graphs hold (same name, type, shape and
    bytes) is stored once, at a page-aligned offset, and every graph reads it from there. Each graph is rewritten
    one at a time (only its own weights in memory), and a ``<file>.data`` it had is removed."""
    index: dict[tuple, tuple[int, int]] = {}
    with open(folder / WEIGHTS_DATA, "wb") as data:
        for name in names:
            path = folder / name
            if not path.is_file():
                continue
            proto = onnx.load(str(path))  # with its own external data, if it has any
            for init in proto.graph.initializer:
                raw = init.raw_data
                if len(raw) < SHARED_MIN_BYTES:
                    continue
                key = (init.name, init.data_type, tuple(init.dims), hashlib.sha256(raw).digest())
                if key not in index:
                    offset = -data.tell() % PAGE + data.tell()
                    data.write(bytes(offset - data.tell()))
                    data.write(raw)
                    index[key] = offset, len(raw)
                offset, length = index[key]
                init.ClearField("raw_data")
                init.data_location = onnx.TensorProto.EXTERNAL
                del init.external_data[:]
                for k, v in (("location", WEIGHTS_DATA), ("offset", str(offset)), ("length", str(length))):
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save(proto, str(path))
            del proto
            own = path.with_name(f"{path.name}.data")
            own.unlink(missing_ok=True)
