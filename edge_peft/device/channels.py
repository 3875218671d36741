"""Rank channels of the adapters, by ONNX name: channel k of a module is column k of its B and row k of its A."""

from __future__ import annotations

import numpy as np


def b_name(module: str) -> str:
    """ONNX name of a module's B (ONNX names are PEFT keys without the prefix)."""
    return f"{module}.lora_B.weight"


def a_name(module: str) -> str:
    return f"{module}.lora_A.weight"


def _index(name: str, channels: np.ndarray) -> tuple:
    """Index of the selected channels in B (columns) or A (rows)."""
    return (slice(None), channels) if name.endswith(".lora_B.weight") else (channels, slice(None))


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
