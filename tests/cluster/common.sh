# Names shared by start-nodes.sh, stop-nodes.sh and exec.sh (sourced, not run).
PREFIX=${HARNESS_CLUSTER_PREFIX:-/tmp/harness-cluster}
NODES=${HARNESS_CLUSTER_NODES:-2}
NET=${HARNESS_CLUSTER_NET:-10.213.7}
WITH_DBD=${HARNESS_CLUSTER_DBD:-1}
CONF=$PREFIX/etc/slurm.conf
export SLURM_CONF=$CONF
CTL_NS=hcl-ctl          # the controller's network namespace (it holds the bridge)
CTL_HOST=hcl-ctl        # the controller's host name
BRIDGE=hclbr0
NODE_NAMES=$(seq -f "n%g" 1 "$NODES" | paste -sd " ")

node_ns() { echo "hcl-$1"; }                 # n2 -> hcl-n2
node_addr() { echo "$NET.$((10 + ${1#n}))"; }  # n2 -> 10.213.7.12
port_of() { echo "hclv-$1"; }                # the node's veth end on the bridge (controller's side)

# on_host NS HOST CMD...: run CMD in network namespace NS under host name HOST (a UTS namespace of its
# own) with $PREFIX/etc/hosts as /etc/hosts (a mount namespace of its own; the machine's is untouched).
# nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, which slurmd needs.
on_host() {
  local ns=$1 host=$2; shift 2
  nsenter --net="/run/netns/$ns" unshare --uts --mount \
    sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "$PREFIX/etc/hosts" "$host" "$@"
}

# pid_alive PIDFILE COMM -> 0 if the pid in PIDFILE is running and its comm matches
pid_alive() {
  local f=$1 comm=$2 p
  [ -s "$f" ] || return 1
  p=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$p" ] && [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" = "$comm" ]
}
