"""Adapter variants as registered objects: each says what it trains, its tensors' shapes, how missing
tensors are completed, whether the store can average it exactly, what PEFT config it writes, and
which torch layer the exporter builds for it. Adding a variant is one module here plus its registration
below (and its torch layer in ``exporter/adapter_layers.py``)."""

from __future__ import annotations

from ..errors import UserError
from .base import Variant, lora_a_from_seed
from .dora import DoRA, DoRAFA
from .lora import Lora, LoraFA

REGISTRY: dict[str, Variant] = {v.name: v for v in (LoraFA(), Lora(), DoRA(), DoRAFA())}
DEFAULT = LoraFA.name


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``; a one-line error listing the others."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UserError(f"variant {name!r} is not supported: use one of {', '.join(REGISTRY)}") from None


__all__ = ["DEFAULT", "REGISTRY", "Variant", "get_variant", "lora_a_from_seed"]
