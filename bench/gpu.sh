#!/usr/bin/env bash
# GPU benchmark in one command (featurize on the CPU cores with MPI, train on the GPU with each cache mode,
# time to accuracy):
#   bash bench/gpu.sh [TIO2_DATA_DIR] [OUT_DIR]
# TIO2_DATA_DIR holds generate.in, *.stp and xsf/ (default ../shared/data/tio2). Uses the
# python3 on PATH with torch (CUDA build) and this repository on PYTHONPATH; featurize uses the mpiexec
# beside that python (else on PATH) with mpi4py, and one process without them. PYTHON overrides python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${1:-$ROOT/../shared/data/tio2}"
OUT="${2:-$ROOT/bench/gpu_out}"
export PYTHONPATH="$ROOT:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$ROOT/bench/gpu_bench.py" --data "$DATA" --out "$OUT" "${@:3}"
