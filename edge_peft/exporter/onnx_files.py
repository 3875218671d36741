"""ONNX files inside an artifact under construction: the graphs keep their weights in one ``WEIGHTS_DATA`` file
that holds each tensor once (``WeightsFile``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import numpy_helper

from ..artifact.files import WEIGHTS_DATA

SHARED_MIN_BYTES = 4096  # smaller tensors (shapes, scales of small weights) stay inline: shape inference reads them
PAGE = 4096  # shared tensors start on a page boundary, so the runtime can map them


class WeightsFile:
    """An artifact's ``WEIGHTS_DATA``: ``save`` writes a graph whose tensors of ``SHARED_MIN_BYTES`` or more live
    here as ONNX external data, each stored once however many graphs hold it (same name, type, shape and bytes),
    at a page-aligned offset. Use it as a context manager, or ``close`` it before the file is read."""

    def __init__(self, folder: Path) -> None:
        self._data = open(folder / WEIGHTS_DATA, "wb")
        self._index: dict[tuple, tuple[int, int]] = {}

    def save(self, proto: onnx.ModelProto, path: Path) -> None:
        """Save ``proto`` at ``path`` with its large tensors here; their bytes are dropped from ``proto``, and so are
        the shapes recorded for its intermediate values (``value_info``), which ONNX Runtime infers again when it
        loads the graph."""
        del proto.graph.value_info[:]
        for init in proto.graph.initializer:
            if len(init.raw_data) >= SHARED_MIN_BYTES:
                self.store(init)
        onnx.save(proto, str(path))

    def store(self, init: onnx.TensorProto) -> tuple[int, int]:
        """Move ``init``'s bytes here (once for equal tensors) unless they are here already; its (offset, length)."""
        if init.data_location != onnx.TensorProto.EXTERNAL:
            raw = init.raw_data or numpy_helper.to_array(init).tobytes()
            key = (init.name, init.data_type, tuple(init.dims), hashlib.sha256(raw).digest())
            if key not in self._index:
                self._data.write(bytes(-self._data.tell() % PAGE))
                self._index[key] = self._data.tell(), len(raw)
                self._data.write(raw)
            offset, length = self._index[key]
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", WEIGHTS_DATA), ("offset", str(offset)), ("length", str(length))):
                entry = init.external_data.add()
                entry.key, entry.value = k, v
        where = {e.key: e.value for e in init.external_data}
        return int(where["offset"]), int(where["length"])

    def close(self) -> None:
        self._data.close()

    def __enter__(self) -> "WeightsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
