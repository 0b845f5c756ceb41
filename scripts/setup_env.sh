#!/usr/bin/env bash
# Create or update the project's virtual environment (idempotent, quiet).
#
#   bash scripts/setup_env.sh
#
# The venv lives in <repo>/.venv unless AENET_DIST_VENV names another directory.
# torch is installed first and pinned (torch==2.13.0) so that `pip install -e .` does not
# pull another build: pip takes the CPU wheel here. For a GPU, install the CUDA build
# into the venv before (or after) running this script, e.g.
#   .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126
# a CUDA build 2.13.0+cu126 satisfies the pin, so this script leaves it in place.
# Work is skipped when the venv already holds torch and aenet_dist installed from the
# current pyproject.toml (a stamp file records its hash).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AENET_DIST_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.aenet_dist_setup"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $ROOT"

installed() {
    # Cheap check (no torch import): both distributions are installed and the stamp matches.
    [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] &&
        "$PY" -c 'import importlib.metadata as m; m.version("torch"); m.version("aenet_dist")' 2>/dev/null
}

if installed; then
    exit 0
fi

if [ ! -x "$PY" ]; then
    echo "setup_env: creating virtual environment $VENV" >&2
    python3 -m venv "$VENV"
fi
echo "setup_env: installing torch==2.13.0 and aenet_dist (editable) into $VENV" >&2
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e "$ROOT"
echo "$WANT" > "$STAMP"
