"""The run directory that ``edge-peft train`` writes and ``generate``/``adapter save``/``push`` read.

```
run/
  run.json         artifact path, data fingerprint, training options
  manifest.json    copy of the artifact's manifest (so a run is self-describing)
  checkpoint/      backend state (weights + AdamW moments + step), trainer.json and the step hooks'
                   hooks.safetensors (e.g. adaptive-rank importance); atomic
  adapter/         the current adapter in PEFT format; atomic
  metrics.jsonl    one line per step (loss, lr, tokens/s, RSS) and per evaluation
  summary.json     totals for push: steps, samples, tokens, losses, peak RSS, parent version
```
"""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters.peft_format import save_adapter
from ..adapters.spec import AdapterSpec
from ..errors import UserError
from ..fileio import atomic_write_json
from ..manifest import Manifest, load_manifest

RUN_FILE = "run.json"
HOOKS_FILE = "hooks.safetensors"
WARM_START_FILE = "warm_start.json"


def adapter_tensors_to_peft(trainable: dict, spec: AdapterSpec) -> dict:
    """ONNX-named trainable tensors -> full PEFT-keyed tensors (LoRA-FA A regenerated from its seed)."""
    from ..adapters.peft_format import complete_tensors, peft_name

    return complete_tensors(spec, {peft_name(k): v for k, v in trainable.items()})


def write_adapter(run: Path, manifest: Manifest, trainable: dict, meta: dict | None = None) -> Path:
    spec = AdapterSpec.from_manifest(manifest)
    return save_adapter(run / "adapter", spec, adapter_tensors_to_peft(trainable, spec), extra_meta=meta)


def read_run(run: str | Path) -> tuple[dict, Manifest]:
    """run.json and the manifest of a run directory, with one-line errors."""
    run = Path(run)
    path = run / RUN_FILE
    if not path.is_file():
        raise UserError(f"{run} is not a training run ({RUN_FILE} missing): pass the --out directory of `edge-peft train`")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is corrupt ({exc.msg}): start a new run") from None
    return info, load_manifest(run)


def artifact_of(run: str | Path) -> Path:
    """The artifact directory a run was trained from."""
    info, _ = read_run(run)
    artifact = Path(info["artifact"])
    if not (artifact / "manifest.json").is_file():
        raise UserError(f"the artifact {artifact} of run {run} is gone: restore it or pass the artifact directly")
    return artifact


def write_run_info(run: Path, info: dict) -> None:
    atomic_write_json(run / RUN_FILE, info)
