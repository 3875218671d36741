"""``--layers``: which transformer blocks get adapters.

Forms: indices and ranges (``0,2,4-6``), the blocks nearest the output (``top:N``) or the input
(``bottom:N``), or ``auto:N``: the N blocks that a short probe on the user's data finds most
important (``layer_probe.probe_layers``); plain ``auto`` with a memory budget: as many of those
blocks as the budget allows (``export_plan``).
"""

from __future__ import annotations

import re

from ..errors import UserError

_FORMS = "indices and ranges (0,2,4-6), top:N, bottom:N, auto:N or auto (with --memory-budget)"
AUTO = "auto"


def parse_layers(text: str, num_layers: int) -> set[int]:
    """The block indices ``text`` names, for a model of ``num_layers`` blocks (not ``auto:N``)."""
    text = text.strip()
    match = re.fullmatch(r"(top|bottom):(\d+)", text)
    if match:
        n = int(match.group(2))
        if not 1 <= n <= num_layers:
            raise UserError(f"--layers {text}: N must be between 1 and the model's {num_layers} layers")
        return set(range(num_layers - n, num_layers)) if match.group(1) == "top" else set(range(n))
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not bounds:
            raise UserError(f"--layers {text!r} is not understood: use {_FORMS}")
        lo, hi = int(bounds.group(1)), int(bounds.group(2) or bounds.group(1))
        if lo > hi or hi >= num_layers:
            raise UserError(f"--layers {part} is outside the model's layers 0-{num_layers - 1}")
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise UserError(f"--layers is empty: use {_FORMS}")
    return chosen


def auto_count(text: str | None) -> int | None:
    """N of ``auto:N``, else None (``auto`` must have been planned into ``auto:N`` by then)."""
    if (text or "").strip() == AUTO:
        raise UserError("--layers auto adapts as many blocks as the memory budget allows: add --memory-budget or "
                        "--device-profile, or name the count with --layers auto:N")
    match = re.fullmatch(r"auto:(\d+)", (text or "").strip())
    if match is None:
        return None
    if int(match.group(1)) < 1:
        raise UserError("--layers auto:N needs N >= 1")
    return int(match.group(1))
