#!/usr/bin/env bash
# Run the whole test suite in .venv (made by scripts/bootstrap.sh). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
exec "${VENV:-$root/.venv}/bin/python" -m pytest tests "$@"
