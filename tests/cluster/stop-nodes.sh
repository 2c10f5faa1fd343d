#!/usr/bin/env bash
# stop-nodes.sh [--purge] - stop the cluster of start-nodes.sh: cancel its jobs, stop its daemons by
# pid file, kill what is left in its namespaces, remove the namespaces.
# --purge also deletes its state, database and logs ($HARNESS_CLUSTER_PREFIX).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
log() { echo "[stop-nodes] $*"; }
in_ctl() { on_host "$CTL_NS" "$CTL_HOST" "$@"; }

stop_pid() { # stop_pid PIDFILE COMM: TERM, up to 30 s, then KILL
  local f=$1 comm=$2 p
  pid_alive "$f" "$comm" || { rm -f "$f"; return 0; }
  p=$(cat "$f")
  kill -TERM "$p"
  for _ in $(seq 1 150); do [ -e "/proc/$p" ] || break; sleep 0.2; done
  [ -e "/proc/$p" ] && kill -KILL "$p"
  rm -f "$f"
  log "$comm ($p) stopped"
}

if pid_alive "$PREFIX/run/slurmctld.pid" slurmctld; then
  jobs=$(in_ctl squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    log "cancelling jobs: $jobs"
    # not requeueable, then KILL: a harness job answers TERM with a checkpoint and a requeue (75)
    for j in $jobs; do in_ctl scontrol update JobId="$j" Requeue=0 2>/dev/null; done
    in_ctl scancel --signal=KILL --full $jobs 2>/dev/null
    sleep 1
    in_ctl scancel $jobs 2>/dev/null
    for _ in $(seq 1 100); do [ -z "$(in_ctl squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
for n in $NODE_NAMES; do stop_pid "$PREFIX/run/slurmd-$n.pid" slurmd; done
stop_pid "$PREFIX/run/slurmctld.pid" slurmctld
stop_pid "$PREFIX/run/slurmdbd.pid" slurmdbd
stop_pid "$PREFIX/run/mysqld.pid" mariadbd
if [ -e "$PREFIX/run/munged.ours" ]; then
  stop_pid /run/munge/munged.pid munged
  rm -f "$PREFIX/run/munged.ours"
fi
for ns in $(ip netns list | awk '{print $1}' | grep '^hcl-'); do
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  if [ -n "${pids// }" ]; then log "killing what is left in $ns: $pids"; kill -KILL $pids 2>/dev/null; fi
  ip netns del "$ns"
done
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$PREFIX"
  log "purged $PREFIX"
fi
log "stopped"
