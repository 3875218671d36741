"""A checkpointed portable step run as its pieces (``exporter/portable_pieces.py``): one ONNX Runtime session per
distinct piece, called in the plan's order, each block's weights fed by name from ``weights.data``.

``PieceSession`` answers the calls ``PortableBackend`` makes of a session over the whole step (``run``,
``get_inputs``, ``get_overridable_initializers``) with the same values: the pieces are the step's own nodes.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact.files import PORTABLE_PIECES, PORTABLE_PIECES_FORMAT, WEIGHTS_DATA
from ..errors import UserError
from .runtime import onnxruntime_module


@dataclass(frozen=True)
class _Value:
    """A step input as ``get_inputs`` lists it."""

    name: str


@dataclass
class _Piece:
    session: object
    inputs: list[tuple[str, str]]  # (the piece's input, the step value it is bound to)
    outputs: list[str]  # the step values it computes, as its outputs o0, o1, ...


@dataclass
class _Call:
    """One piece's part in a run: the step values asked of it, as its outputs, and the values to drop after it."""

    piece: _Piece
    wanted: list[str]  # step values
    names: list[str]  # the piece's outputs that are those values
    drop: list[str]  # read by no later piece and not asked for


class PieceSession:
    """The step of ``artifact`` as its pieces; created with the options, providers and disabled optimizers of the
    session it stands for."""

    def __init__(self, artifact: Path, options, providers: list[str], disabled_optimizers: list[str]):
        try:
            plan = json.loads((artifact / PORTABLE_PIECES).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{artifact / PORTABLE_PIECES} is unreadable ({exc}): re-export the artifact") from None
        if plan.get("format") != PORTABLE_PIECES_FORMAT:
            raise UserError(f"{artifact / PORTABLE_PIECES} is in format {plan.get('format')!r}, not "
                            f"{PORTABLE_PIECES_FORMAT}: re-export the artifact with this version of edge-peft")
        ort = onnxruntime_module()
        sessions: dict[str, object] = {}
        for piece in plan["pieces"]:
            if piece["graph"] not in sessions:
                sessions[piece["graph"]] = ort.InferenceSession(str(artifact / piece["graph"]), options,
                                                                providers=providers,
                                                                disabled_optimizers=disabled_optimizers)
        self._pieces = [_Piece(sessions[p["graph"]], [tuple(b) for b in p["inputs"]], p["outputs"])
                        for p in plan["pieces"]]
        self._inputs = [_Value(n) for n in plan["inputs"]]
        self._overridable = [_Value(n) for n in plan["overridable"]]
        self._weights = plan["weights"]
        self._data = None
        if self._weights:
            with open(artifact / WEIGHTS_DATA, "rb") as f:
                self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._schedules: dict[tuple[str, ...], list[_Call]] = {}

    def get_inputs(self) -> list[_Value]:
        return list(self._inputs)

    def get_overridable_initializers(self) -> list[_Value]:
        return list(self._overridable)

    def _weight(self, name: str) -> np.ndarray:
        """A frozen tensor of the step, read-only, mapped from ``weights.data``."""
        w = self._weights[name]
        dtype = np.dtype(w["dtype"])
        return np.frombuffer(self._data, dtype, w["length"] // dtype.itemsize, w["offset"]).reshape(w["shape"])

    def _schedule(self, outputs: tuple[str, ...]) -> list[_Call]:
        """The calls of the pieces ``outputs`` need, in order (worked out once per set of outputs)."""
        if outputs not in self._schedules:
            needed, chosen = set(outputs), []
            for piece in reversed(self._pieces):
                wanted = [o for o in piece.outputs if o in needed]
                if wanted:
                    chosen.append((piece, wanted))
                    needed.update(value for _, value in piece.inputs)
            chosen.reverse()
            last = {value: k for k, (piece, _) in enumerate(chosen) for _, value in piece.inputs}
            self._schedules[outputs] = [
                _Call(piece, wanted, [f"o{piece.outputs.index(o)}" for o in wanted],
                      [v for _, v in piece.inputs if last[v] == k and v not in outputs])
                for k, (piece, wanted) in enumerate(chosen)]
        return self._schedules[outputs]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The step's ``outputs`` for ``feeds`` (batch, trainable tensors, accumulated gradients; a fed frozen
        tensor takes the place of the stored one)."""
        values = dict(feeds)
        for call in self._schedule(tuple(outputs)):
            given = {name: values[value] if value in values else self._weight(value)
                     for name, value in call.piece.inputs}
            values.update(zip(call.wanted, call.piece.session.run(call.names, given)))
            for value in call.drop:
                values.pop(value, None)
        return [values[o] for o in outputs]
