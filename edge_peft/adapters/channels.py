"""Rank channels of the adapters, by ONNX name: channel k of a module is column k of its B and row k of its A."""

from __future__ import annotations

import numpy as np

from ..artifact.names import is_b


def _index(name: str, channels: np.ndarray) -> tuple:
    """Index of the selected channels in B (columns) or A (rows)."""
    return (slice(None), channels) if is_b(name) else (channels, slice(None))


def zero_channels(value: np.ndarray, name: str, channels: np.ndarray) -> np.ndarray:
    """A copy of B or A with the channels selected by ``channels`` (a bool per channel) set to zero."""
    out = value.copy()
    out[_index(name, channels)] = 0
    return out


def copy_channels(value: np.ndarray, source: np.ndarray, name: str, channels: np.ndarray) -> np.ndarray:
    """A copy of ``value`` whose selected channels come from ``source``."""
    out = value.copy()
    index = _index(name, channels)
    out[index] = source[index]
    return out


def gate(value: np.ndarray, name: str, gains: np.ndarray) -> np.ndarray:
    """The tensor a gated step runs with (``gains``: a float per channel, 0 = sit the step out): B with
    its gain-0 columns zeroed, A with each row times its channel's gain."""
    if is_b(name):
        return zero_channels(value, name, gains == 0)
    return value * gains[:, None].astype(value.dtype)


def ungate(old: np.ndarray, gated: np.ndarray, stepped: np.ndarray, name: str, gains: np.ndarray) -> np.ndarray:
    """Values after a gated step: gain-0 channels keep ``old``; B's other columns keep the step's values;
    A's other rows get the step's change on top of their own values (so a frozen A is ``old`` again)."""
    out = stepped if is_b(name) else old + (stepped - gated)  # copy_channels copies
    return copy_channels(out, old, name, gains == 0)
