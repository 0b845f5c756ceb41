#!/usr/bin/env bash
# Featurize an aenet generate.in into a Zarr store with MPI, on a workstation or in SLURM.
#
#   bash launch/featurize.sh GENERATE_IN STORE [extra featurize options]
#   NP=4 bash launch/featurize.sh work/emt/generate.in work/emt.zarr --deriv-dtype float32
#   sbatch --ntasks=64 slurm/featurize.sbatch work/big/generate.in work/big.zarr
#
# Inside a SLURM allocation (SLURM_JOB_ID set) the ranks are started by `srun` (all tasks of
# the allocation, SLURM_NTASKS, over all its nodes) with `--mpi=pmi2`, which the venv's MPICH
# speaks; AENET_DIST_SRUN_MPI names another plugin (see `srun --mpi=list`). Where SLURM has no
# pmi2 plugin the venv's `mpiexec -n $SLURM_NTASKS` is used instead (Hydra starts its proxies
# through srun). Outside SLURM: `mpiexec -n ${NP:-number of CPUs}` from the venv.
# The venv is AENET_DIST_VENV or <repo>/.venv (on a cluster: on a file system every node sees).
# Rerunning the same command resumes an interrupted store and reuses a complete one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AENET_DIST_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

if [ $# -lt 2 ]; then
    echo "usage: $0 GENERATE_IN STORE [extra aenet_dist.featurize options]" >&2
    exit 2
fi
GENERATE_IN="$1"
STORE="$2"
shift 2
[ -x "$PY" ] || { echo "featurize.sh: no Python at $PY (run scripts/setup_env.sh or set AENET_DIST_VENV)" >&2; exit 2; }
[ -f "$GENERATE_IN" ] || { echo "featurize.sh: $GENERATE_IN: no such file" >&2; exit 2; }

# Progress bars are noise in a batch log.
EXTRA=("$@")
if [ -n "${SLURM_JOB_ID:-}" ] || [ ! -t 2 ]; then
    case " $* " in *" --no-progress "*) ;; *) EXTRA+=(--no-progress) ;; esac
fi
CMD=("$PY" -m aenet_dist.featurize "$GENERATE_IN" --out "$STORE" "${EXTRA[@]}")

if [ -n "${SLURM_JOB_ID:-}" ]; then
    NTASKS="${SLURM_NTASKS:-1}"
    MPI="${AENET_DIST_SRUN_MPI:-pmi2}"
    # featurize is numpy, one BLAS thread per rank (aenet_dist sets OPENBLAS_NUM_THREADS=1 unless it is
    # set): scale with ranks (--ntasks), not with CPUs per task.
    if srun --mpi=list 2>&1 | grep -qw -- "$MPI"; then
        echo "featurize.sh: srun --mpi=$MPI, $NTASKS rank(s) on ${SLURM_JOB_NUM_NODES:-1} node(s) (job $SLURM_JOB_ID)" >&2
        exec srun --mpi="$MPI" --ntasks="$NTASKS" --kill-on-bad-exit=1 "${CMD[@]}"
    fi
    echo "featurize.sh: SLURM has no '$MPI' MPI plugin; mpiexec -n $NTASKS (Hydra over srun)" >&2
    exec "$VENV/bin/mpiexec" -n "$NTASKS" "${CMD[@]}"
fi

NP="${NP:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
echo "featurize.sh: mpiexec -n $NP on $(hostname -s)" >&2
exec "$VENV/bin/mpiexec" -n "$NP" "${CMD[@]}"
