#!/usr/bin/env bash
# Run HERE (no GPU needed) before a session's one device call: puts into two git-ignored folders what the
# device machine lacks, so that `bash bench/gpu_check.sh` runs there as one prepared script.
#   .whl/       wheels (Python 3.12, x86-64) of the dependencies its image does not have
#   .gpu_data/  a copy of the TiO2 data set (../shared does not travel to the device machine)
# Then call the device tool with: command "bash bench/gpu_check.sh", carry [".whl", ".gpu_data"], timeout_s 540.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
    "zarr>=3.1,<4" "numcodecs>=0.14" "google-crc32c>=1.5" "donfig>=0.8" "ase>=3.23" "vesin>=0.6,<0.7" "tomli-w>=1.0"
DATA="${1:-$ROOT/../shared/data/tio2}"
rm -rf .gpu_data && mkdir -p .gpu_data && cp -r "$DATA" .gpu_data/tio2
du -sh .whl .gpu_data
