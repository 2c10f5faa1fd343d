#!/usr/bin/env bash
# Container entry point: `docker run IMAGE key=value ...` trains with those Hydra overrides;
# `docker run IMAGE torchrun|deepspeed|python|bash ...` runs that command instead.
set -euo pipefail
if [ "$#" -gt 0 ] && command -v "$1" > /dev/null 2>&1; then
  exec "$@"
fi
exec python -m harness.train "$@"
