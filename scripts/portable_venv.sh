#!/usr/bin/env bash
# Build .venv-portable: the device side of edge-peft on plain, current onnxruntime (no
# onnxruntime-training, no torch). Plain onnxruntime and onnxruntime-training install into the same
# package folder, so they cannot share a virtual environment; CI runs the portable tests with this one.
# Usage: scripts/portable_venv.sh [VENV_DIR]   (default: .venv-portable in the repository root)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv-portable}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "onnxruntime==1.32.0" numpy click tqdm safetensors tokenizers "jinja2>=3.1.6" pytest
"$venv/bin/python" -m pip install --quiet --no-deps -e "$root"
"$venv/bin/python" - <<'PY'
import importlib.util, onnxruntime
assert importlib.util.find_spec("torch") is None, "torch must not be installed in the portable venv"
assert importlib.util.find_spec("onnxruntime.training") is None, "onnxruntime-training must not be installed"
print(f"portable venv ready: onnxruntime {onnxruntime.__version__}")
PY
