#!/usr/bin/env bash
# Run the test suite (pyproject.toml's testpaths, or the paths given) in .venv (made by scripts/bootstrap.sh) on
# EDGE_PEFT_TEST_WORKERS pytest-xdist workers (default 2; 0 runs in this process), a test file to a worker at a
# time. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
exec "${VENV:-$root/.venv}/bin/python" -m pytest -n "${EDGE_PEFT_TEST_WORKERS:-2}" --dist loadfile "$@"
