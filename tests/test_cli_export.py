"""`edge-peft export` end to end on the command line: the artifact, its manifest and the closing line."""

from __future__ import annotations

import pytest

from edge_peft.artifact.manifest import load_manifest
from edge_peft.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora-fa", "dora"])
def test_export_writes_the_artifact_and_says_what_it_holds(variant, models, tmp_path, capsys):
    out = tmp_path / "artifact"
    main(["export", str(models["llama"]), "--out", str(out), "--rank", "2", "--variant", variant,
          "--max-seq-len", "32", "--targets", "q_proj,v_proj"])
    manifest = load_manifest(out)
    said = capsys.readouterr().out
    assert f"{len(manifest.adapter.modules)} adapted modules" in said and manifest.fingerprint in said
    assert manifest.adapter.variant == variant and manifest.memory.quantized_bytes > 0
    assert manifest.memory.trainable_values == manifest.adapter.trainable_values() > 0
