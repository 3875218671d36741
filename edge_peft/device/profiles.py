"""Device profiles (``devices/*.toml``): threads, execution provider, default memory budget and margin."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from ..backends.names import AUTO, TRAIN_CHOICES
from ..datafiles import data_dir
from ..errors import UserError
from .planner import parse_budget

CPU_PROVIDER = "CPUExecutionProvider"
_KEYS = {"description": str, "threads": int, "execution_provider": str, "memory_budget": str, "margin": float}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    threads: int
    execution_provider: str
    memory_budget: str
    margin: float
    backend: str = AUTO  # optional key: the training backend to use


def list_profiles() -> list[DeviceProfile]:
    """Every profile in the devices folder, by name."""
    return [load_profile(p.stem) for p in sorted(data_dir("devices").glob("*.toml"))]


def load_profile(name: str) -> DeviceProfile:
    """Read and validate ``devices/NAME.toml``; one-line errors name the file and the key."""
    folder = data_dir("devices")
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.toml"))) or "none"
        raise UserError(f"device profile {name!r} does not exist ({path}): choose one of {known} (edge-peft devices)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML ({exc}): fix the file") from None
    return _validate(name, raw, path)


def _validate(name: str, raw: dict, path: Path) -> DeviceProfile:
    for key in raw:
        if key not in _KEYS and key != "backend":
            raise UserError(f"{path}: unknown key {key!r}: allowed keys are {', '.join(_KEYS)}, backend")
    if raw.get("backend", AUTO) not in TRAIN_CHOICES:
        raise UserError(f"{path}: key 'backend' must be one of {', '.join(TRAIN_CHOICES)}, got {raw['backend']!r}")
    for key, kind in _KEYS.items():
        value = raw.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = raw[key] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{path}: key {key!r} must be a {kind.__name__}, got {value!r}")
    if raw["threads"] < 0:
        raise UserError(f"{path}: key 'threads' must be >= 0 (0: all cores), got {raw['threads']}")
    if not 0 <= raw["margin"] < 1:
        raise UserError(f"{path}: key 'margin' must be in [0, 1) (e.g. 0.1 for 10 %), got {raw['margin']}")
    try:
        parse_budget(raw["memory_budget"])
    except UserError:
        raise UserError(f"{path}: key 'memory_budget' must be a memory size like \"512MB\", "
                        f"got {raw['memory_budget']!r}") from None
    return DeviceProfile(name=name, **raw)


def resolve_provider(profile: DeviceProfile) -> str:
    """The profile's execution provider if this ONNX Runtime has it, else CPU with a warning on stderr."""
    from ..backends.runtime import onnxruntime_module

    if profile.execution_provider in onnxruntime_module().get_available_providers():
        return profile.execution_provider
    print(f"warning: {profile.execution_provider} is not available in this onnxruntime "
          f"(device profile {profile.name}): falling back to {CPU_PROVIDER}", file=sys.stderr)
    return CPU_PROVIDER
