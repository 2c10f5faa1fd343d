#!/usr/bin/env bash
# The deepspeed launcher (parallel=deepspeed is added); Hydra overrides are passed through to harness.train.
#
# One node, NPROC processes (default: all visible GPUs, else 2 CPU processes with gloo):
#   NPROC=8 launch/deepspeed.sh parallel.zero_stage=3 model=llama_1b
# Several nodes, from the first node, with passwordless ssh to the hosts of a hostfile
# ("node001 slots=8" per line):
#   HOSTFILE=hostfile launch/deepspeed.sh parallel.zero_stage=3 model=llama3_8b
# Under Slurm, `python -m harness.cluster.slurm parallel=deepspeed ...` runs it on every node without ssh.
# Through harness.cluster.node, so the job's exit status is the workers' own (2: refused config,
# 75: checkpointed on SIGUSR1/SIGTERM, 130: checkpointed on Ctrl-C) instead of the launcher's 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DS="$(dirname "$PY")/deepspeed"
[ -x "$DS" ] || DS=deepspeed
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ -n "${HOSTFILE:-}" ]; then
  exec "$PY" -m harness.cluster.node -- "$DS" --hostfile="$HOSTFILE" --master_port="${MASTER_PORT:-29500}" \
    --module --no_local_rank harness.train parallel=deepspeed "$@"
fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec "$PY" -m harness.cluster.node -- "$DS" --num_gpus="$NPROC" --master_port="${MASTER_PORT:-29500}" \
  --module --no_local_rank harness.train parallel=deepspeed "$@"
