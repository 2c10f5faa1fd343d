#!/usr/bin/env bash
# torchrun launcher; Hydra overrides are passed through to harness.train.
#
# One node (NPROC processes, default: all visible GPUs, else 2 CPU processes with gloo):
#   NPROC=8 launch/torchrun.sh parallel=fsdp model=llama_1b
# Several nodes: run the same command on every node (c10d rendezvous at RDZV_ENDPOINT):
#   NNODES=4 NPROC=8 RDZV_ENDPOINT=node001:29500 RDZV_ID=myrun launch/torchrun.sh parallel=fsdp model=llama3_8b
# Under Slurm, `python -m harness.cluster.slurm` writes and submits the equivalent sbatch script.
# Through harness.cluster.node, so the job's exit status is the workers' own (2: refused config,
# 75: checkpointed on SIGUSR1/SIGTERM, 130: checkpointed on Ctrl-C) instead of the launcher's 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES="${NNODES:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$NNODES" -eq 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  exec "$PY" -m harness.cluster.node -- "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m harness.train "$@"
fi
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the first node for a multi-node run}"
exec "$PY" -m harness.cluster.node -- "$PY" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-harness}" \
  -m harness.train "$@"
