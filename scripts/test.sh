#!/usr/bin/env bash
# Set up the venv if needed, then run the test suite; arguments go to pytest:
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k store -x
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
VENV="${AENET_DIST_VENV:-$ROOT/.venv}"
exec "$VENV/bin/python" -m pytest -q "$@"
