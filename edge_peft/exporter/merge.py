"""``edge-peft adapter merge``: the original base model + a run's adapter as one Hugging Face model directory.

Runs on the workstation (torch, transformers, peft) from the base model directory the manifest records as
``base_model`` (or one passed instead), never from the artifact: an int8 artifact's frozen weights are
rounded copies, so a merge from them would bake the rounding in. The base is checked against the manifest's
fingerprint; the merged weights are the original fp32 ones plus PEFT's ``merge_and_unload`` of the adapter
(``W + (alpha/r) B A``, DoRA's rescaling included), so the merged model gives the logits of base + PEFT
adapter. Written atomically: ``model.safetensors``, ``config.json``, the tokenizer's files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..adapters.peft_format import load_adapter, save_adapter
from ..artifact.files import ADAPTER
from ..device.run_dir import read_run
from ..errors import UserError
from ..fileio import atomic_directory
from .load import fingerprint, load_model_dir


def merge_run_adapter(run: str | Path, out: str | Path, base: str | Path | None = None,
                      adapter: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write ``base`` (default: the manifest's ``base_model``) merged with ``adapter`` (default: the run's)."""
    _, manifest = read_run(run)
    spec = manifest.adapter
    adapter = Path(adapter) if adapter else Path(run) / ADAPTER
    if not adapter.is_dir():
        raise UserError(f"{adapter} does not exist: train {run} until a checkpoint, or pass --adapter DIR")
    tensors = load_adapter(adapter, spec)
    base = Path(base or spec.base_model or "")
    if not base.is_dir():
        raise UserError(f"the base model {base} is not here: pass the model directory {run} was exported from "
                        "with --base")
    loaded = load_model_dir(base, manifest.labels or None)
    heads = tuple(f"{h}." for h in loaded.recipe.head)
    if fingerprint(loaded.model, exclude_prefixes=heads) != spec.base_fingerprint:
        raise UserError(f"{base} is not the base {run} was exported from (its weights' fingerprint differs): "
                        "pass the original model directory with --base")
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as scratch:
        full = save_adapter(Path(scratch) / "adapter", spec, tensors)  # every tensor, seeded A included
        merged = PeftModel.from_pretrained(loaded.model, str(full)).merge_and_unload()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    return Path(out)
