#!/usr/bin/env bash
# Run ON the device machine, as one prepared call (see bench/gpu_prepare.sh, which fills .whl and .gpu_data):
# the GPU tests (CUDA graphs against eager steps, the lean step on CUDA against the CPU), then the GPU
# benchmark without its time-to-accuracy run. Logs and results go to $OUT (or bench/gpu_out).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/bench/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$ROOT:${PYTHONPATH:-}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_graphs.py tests/test_step.py tests/test_checkpoint.py 2>&1 | tee "$OUT/gpu_tests.log"
# runs and stores stay in /tmp: only a few files come back from $OUT
timeout 420 bash bench/gpu.sh "$ROOT/.gpu_data/tio2" /tmp/gpu_bench --skip-tta 2>&1 | tee "$OUT/gpu_bench.log"
cp /tmp/gpu_bench/gpu_results.json "$OUT/" 2>/dev/null || true
