"""What the memory model predicts for the calibration artifacts with the exporter's real byte counts
(manifest ``memory.quantized_bytes``) against the old estimate (quantized = 0.98 x frozen bytes, used while
no artifact recorded the int8 bytes), next to the measured peaks in ``benchmarks/calibration/``.

Exports the calibration-sized artifacts (MiniLM classifier, random 4-layer GPT-2; ORT backend) into a
temporary folder; measures nothing itself. Usage: ``python benchmarks/byte_counts.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, print_table, write_json  # noqa: E402
from memory_budget import export, export_lm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    from edge_peft.artifact.manifest import load_manifest
    from edge_peft.device.memory_model import MB, ModelFigures, predict_figures

    work = Path(tempfile.mkdtemp(prefix="edge-peft-bytes-"))
    artifacts = {"minilm_int8": export(work / "minilm_int8", "lora-fa"),
                 "gpt2m_int8": export_lm(work / "gpt2m_int8", "0"),
                 "gpt2m_int8_chunk8": export_lm(work / "gpt2m_int8_chunk8", "8")}
    points = json.loads((ROOT / "benchmarks" / "calibration" / "memory_ort.json").read_text())["points"]
    rows = []
    for name, path in artifacts.items():
        manifest = load_manifest(path)
        real = ModelFigures.of(manifest, "ort")
        guess = dataclasses.replace(real, quantized_bytes=int(real.frozen_bytes * 0.98))
        for p in (p for p in points if p["artifact"] == name):
            old, new = (predict_figures(f, p["batch"], p["seq_len"]).total / MB for f in (guess, real))
            rows.append({"artifact": name, "point": f"{p['batch']}x{p['seq_len']}", "measured_mb": p["peak_mb"],
                         "old_mb": round(old, 1), "new_mb": round(new, 1),
                         "old_error_pct": round(100 * (old / p["peak_mb"] - 1), 1),
                         "new_error_pct": round(100 * (new / p["peak_mb"] - 1), 1),
                         "frozen_mb": round(real.frozen_bytes / MB, 2),
                         "quantized_old_mb": round(guess.quantized_bytes / MB, 2),
                         "quantized_real_mb": round(real.quantized_bytes / MB, 2)})
    print_table(rows, [("artifact", "artifact"), ("point", "B x T"), ("measured_mb", "measured MB"),
                       ("old_mb", "old MB"), ("old_error_pct", "old err %"), ("new_mb", "new MB"),
                       ("new_error_pct", "new err %"), ("quantized_old_mb", "int8 old MB"),
                       ("quantized_real_mb", "int8 real MB")])
    for key in ("old_error_pct", "new_error_pct"):
        errors = [r[key] for r in rows]
        print(f"{key}: {min(errors):+.1f} .. {max(errors):+.1f} %, mean |error| "
              f"{sum(map(abs, errors)) / len(errors):.1f} %")
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
