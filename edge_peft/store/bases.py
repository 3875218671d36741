"""Base models as the admin registers them: the adapter spec from an artifact, its checks, and how a push's
spec differs from it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..adapters.peft_format import PEFT_TASK_TYPES
from ..artifact.adapter_section import AdapterSpec
from ..artifact.files import MANIFEST
from ..artifact.manifest import load_manifest
from ..errors import UserError
from ..variants import get_variant
from .storage import StoreError


def spec_of_artifact(path: str | Path) -> AdapterSpec:
    """The adapter spec of an artifact directory, or of its ``manifest.json`` given directly."""
    path = Path(path)
    return load_manifest(path.parent if path.name == MANIFEST and path.is_file() else path).adapter


def parse_spec(raw: Any, base: str | None = None) -> AdapterSpec:
    """An ``AdapterSpec`` from JSON, checked for the values the store and PEFT rely on; StoreError(400)."""
    if not isinstance(raw, dict):
        raise StoreError(400, "the spec must be a JSON object: the manifest's adapter section (AdapterSpec.to_dict())")
    try:
        spec = AdapterSpec.from_dict(raw)
    except (UserError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreError(400, f"the spec is invalid ({str(exc)[:200]}): pass the artifact's manifest") from None
    problems = []
    if base is not None and spec.base_fingerprint != base:
        problems.append("its base_fingerprint is not the base in the URL")
    try:
        get_variant(spec.variant)
    except (UserError, TypeError):
        problems.append(f"unknown variant {str(spec.variant)[:40]!r}")
    if not isinstance(spec.task, str) or spec.task not in PEFT_TASK_TYPES:
        problems.append(f"task {str(spec.task)[:40]!r} not in {tuple(PEFT_TASK_TYPES)}")
    if not isinstance(spec.modules, list) or not spec.modules:
        problems.append("no adapter modules")
    else:
        sizes = [v for m in spec.modules for v in (m.rank, m.in_features, m.out_features)]
        sizes += [d for t in spec.modules_to_save for d in (t.shape if isinstance(t.shape, list) else [None])]
        if any(type(v) is not int or v <= 0 for v in sizes):
            problems.append("ranks and shapes must be positive integers")
        if any(type(m.a_seed) is not int or m.a_seed < 0 for m in spec.modules) or type(spec.seed) is not int:
            problems.append("seeds must be integers >= 0")
        names = [m.name for m in spec.modules] + [t.name for t in spec.modules_to_save]
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            problems.append("module names must be distinct non-empty strings")
    if type(spec.alpha) not in (int, float) or not math.isfinite(spec.alpha):
        problems.append("alpha must be a number")
    if problems:
        raise StoreError(400, f"the spec is invalid ({'; '.join(problems)}): pass the artifact's own manifest")
    return spec


def spec_difference(registered: Any, sent: Any, path: str = "spec") -> str | None:
    """Where ``sent`` first differs from the ``registered`` spec (JSON values), in words; None when equal."""
    if isinstance(registered, dict) and isinstance(sent, dict):
        for key in sorted(registered):
            if key not in sent:
                return f"{path}.{key} is missing"
            if difference := spec_difference(registered[key], sent[key], f"{path}.{key}"):
                return difference
        extra = sorted(str(k)[:40] for k in set(sent) - set(registered))
        return f"{path} has fields the registered spec has not ({', '.join(extra[:3])})" if extra else None
    if isinstance(registered, list) and isinstance(sent, list):
        if len(registered) != len(sent):
            return f"{path} has {len(sent)} entries, the registered spec {len(registered)}"
        for i, (r, s) in enumerate(zip(registered, sent)):
            if difference := spec_difference(r, s, f"{path}[{i}]"):
                return difference
        return None
    if registered == sent and isinstance(registered, bool) == isinstance(sent, bool):
        return None
    return f"{path} is {_short(sent)}, the registered spec has {_short(registered)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
