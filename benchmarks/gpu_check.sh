#!/usr/bin/env bash
# Check the MoE Triton kernels on one GPU and write OUT_DIR/gpu_check.json.
#
# Usage: benchmarks/gpu_check.sh OUT_DIR [extra gpu_check.py options, e.g. --peak-tflops 989]
#
# Needs only torch and triton (transformers is optional: without it the comparison with
# transformers' OlmoeSparseMoeBlock is recorded as skipped). The repo root goes on
# PYTHONPATH, so `kernels` and `olmoe` import without a pip install.
#
# Environment:
#   PYTHON             interpreter to use (default: python3)
#   GPU_CHECK_TIMEOUT  seconds before the check is stopped (default: 290). The JSON is
#                      rewritten after each section, so a stopped run keeps what finished.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    exit 2
fi

OUT_DIR=$1
shift
PYTHON=${PYTHON:-python3}
GPU_CHECK_TIMEOUT=${GPU_CHECK_TIMEOUT:-290}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

mkdir -p "$OUT_DIR"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO_ROOT"

"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
timeout --signal=TERM --kill-after=10 "$GPU_CHECK_TIMEOUT" \
    "$PYTHON" benchmarks/gpu_check.py "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
