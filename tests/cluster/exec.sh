#!/usr/bin/env bash
# exec.sh [NODE] CMD [ARGS...] - run a command in the cluster of start-nodes.sh: in the controller's
# network namespace (sbatch, squeue, scancel, python -m harness.cluster.slurm ...), or with a node
# name first (n1, n2, ...) in that node's network namespace under its host name. SLURM_CONF is set.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
[ $# -gt 0 ] || { echo "usage: $0 [n1|n2|...] CMD [ARGS...]" >&2; exit 2; }
if [[ "$1" =~ ^n[0-9]+$ ]]; then
  node=$1; shift
  on_host "$(node_ns "$node")" "$node" "$@"
  exit
fi
on_host "$CTL_NS" "$CTL_HOST" "$@"
