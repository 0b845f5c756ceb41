#!/usr/bin/env bash
# The whole pipeline on the small embedded EMT data set (Cu/Au/Ni, 200 structures):
#   bash scripts/demo.sh
# Rerunnable: the data set is generated once, and featurize resumes an interrupted store
# or reuses a complete one made from the same inputs. Outputs go to work/ (git-ignored).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
VENV="${AENET_DIST_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
NP="${AENET_DIST_DEMO_RANKS:-2}"

echo "== 1. data set: work/emt (EMT energies and forces, aenet XSF + generate.in)"
if [ -f work/emt/generate.in ]; then
    echo "work/emt/generate.in exists; reusing it"
else
    "$PY" -m aenet_dist.datasets emt --out work/emt
fi

echo "== 2. featurize: work/emt.zarr ($NP MPI ranks)"
"$VENV/bin/mpiexec" -n "$NP" "$PY" -m aenet_dist.featurize work/emt/generate.in --out work/emt.zarr

echo "== 3. train: work/runs/emt (torchrun, $NP CPU ranks, gloo)"
# --resume continues from the last checkpoint if a previous demo run was interrupted.
OMP_NUM_THREADS=1 "$VENV/bin/torchrun" --standalone --nproc_per_node="$NP" -m aenet_dist.train launch/emt_demo.toml run.device=cpu --resume

# export / predict steps are added by later issues
