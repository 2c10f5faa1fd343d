#!/usr/bin/env bash
# Single-process run on this machine (CPU or one GPU), Hydra overrides passed through:
#   launch/local.sh train.max_steps=500 model=llama_125m
# Cluster launchers (torchrun, deepspeed, Slurm) live beside this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m harness.train "$@"
