#!/usr/bin/env bash
# The GPU check in one call (issue 23, section 6): run it on a lent GPU machine from the repository root, with
# the package installed. Everything goes under $OUT (or ./gpu-check); the log is gpu_check.log there.
#   bash tools/gpu_check.sh [--layers 4] [--nsamples 128] [--skip-tests]
#   bash tools/gpu_check.sh --dry-run      # no GPU: print the plan and run the smallest prune on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python tools/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
