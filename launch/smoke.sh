#!/usr/bin/env bash
# GPU smoke test by hand on any CUDA box: the default config for 10 steps under every backend
# on one GPU (bf16), printing the last log line of each. Usage: launch/smoke.sh [extra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
for backend in none ddp fsdp deepspeed; do
  run_dir="runs/smoke-${backend}"
  rm -rf "$run_dir"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m harness.train "parallel=${backend}" \
    train.max_steps=10 schedule.warmup_steps=2 schedule.batch_warmup.steps=4 eval.every=5 \
    logging.wandb.mode=disabled "hydra.run.dir=${run_dir}" "$@" > "${run_dir}.log" 2>&1 \
    && echo "${backend}: $(tail -n 1 "${run_dir}/metrics.jsonl")" \
    || { echo "${backend}: FAILED, see ${run_dir}.log"; tail -n 20 "${run_dir}.log"; }
done
