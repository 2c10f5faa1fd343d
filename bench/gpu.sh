#!/usr/bin/env bash
# Every GPU benchmark in one call of under 8 minutes (for the device tool's H200/H100):
#   bash bench/gpu.sh                 # llama_1b, bf16, seq 4096; SEQ_LEN=2048 if memory requires
# The GPU machine has torch and transformers but not hydra-core/omegaconf (which harness.config
# imports): carry their wheels in bench/wheels/ (made here with
#   .venv/bin/pip download --no-deps -d bench/wheels hydra-core omegaconf antlr4-python3-runtime==4.9.3)
# and they are installed with --no-deps, leaving the machine's torch alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index bench/wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
OUT_DIR="${OUT:-bench}"
timeout 450 "$PY" bench/gpu.py --seq-len "${SEQ_LEN:-4096}" --json "$OUT_DIR/gpu.json" "$@" | tee "$OUT_DIR/gpu.txt"
