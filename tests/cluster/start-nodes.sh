#!/usr/bin/env bash
# start-nodes.sh - a Slurm cluster of N nodes on this one machine, for the multi-node tests.
#
# Each node is a network namespace (its own address on a bridge) plus a UTS namespace (its own host
# name), running its own slurmd; the controller (slurmctld, and slurmdbd with a private MariaDB) is a
# namespace of its own holding the bridge. Nothing is configured outside those namespaces: the root
# namespace keeps its interfaces and /etc/hosts (each namespace gets its own through
# $PREFIX/etc/hosts, mounted over /etc/hosts in a mount namespace of theirs). munged is shared through its
# socket (started if not running). Slurm commands run in the controller's namespace:
#
#   tests/cluster/start-nodes.sh            # ~15-40 s the first time, under 1 s when up
#   tests/cluster/exec.sh sinfo             # any command, in the controller's namespace
#   tests/cluster/exec.sh n2 hostname       # ... or on a node
#   tests/cluster/stop-nodes.sh [--purge]   # stop by pid file, remove the namespaces
#
# Idempotent: running daemons are kept, a missing node's slurmd (or its link) is brought back.
# Needs root, iproute2, util-linux; installs munge, slurmctld, slurmd, slurm-client (and slurmdbd,
# mariadb-server) from Debian's packages when missing.
#
# Env knobs:
#   HARNESS_CLUSTER_NODES   number of nodes n1..nN                          (default 2)
#   HARNESS_CLUSTER_PREFIX  configs, state, logs, pid files                 (default /tmp/harness-cluster)
#   HARNESS_CLUSTER_NET     first three octets of the private /24 used only inside the namespaces
#                           (default 10.213.7); controller .1, node i .(10+i)
#   HARNESS_CLUSTER_DBD     1 = slurmdbd + MariaDB (sacct)                  (default 1)
set -euo pipefail
# No `cmd | grep -q` here: grep -q exits at its first match, a cmd still writing gets SIGPIPE, and
# pipefail turns that into a failed test (`ip addr show | grep -q` failed 4 times in 3000 here).
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

log() { echo "[start-nodes] $*"; }
die() { echo "[start-nodes] ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (network and UTS namespaces)"
for tool in ip unshare; do command -v "$tool" >/dev/null || die "$tool not found (iproute2, util-linux)"; done

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 what=$2; shift 2
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "timed out after ${t}s waiting for $what (logs: $PREFIX/log)"
    sleep 0.2
  done
}
T0=$(date +%s.%N)

# ---------------------------------------------------------------- packages
PKGS=(munge slurmctld slurmd slurm-client)
[ "$WITH_DBD" = 1 ] && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"install ok installed"* ]] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # no service starts from the packages (no systemd here)
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >"/tmp/harness-cluster-apt.log" 2>&1 || { tail -30 /tmp/harness-cluster-apt.log; die "apt-get install failed"; }
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# ---------------------------------------------------------------- network
mkdir -p "$PREFIX"/{etc,state,log,run}
hosts_file() {
  local n
  echo "127.0.0.1 localhost"
  echo "$NET.1 $CTL_HOST"
  for n in $NODE_NAMES; do echo "$(node_addr "$n") $n"; done
}
hosts_file > "$PREFIX/etc/hosts"
netns_up() { # netns_up NS: create the namespace (if missing)
  [ -e "/run/netns/$1" ] || ip netns add "$1"
  ip -n "$1" link set lo up
}
netns_up "$CTL_NS"
ip -n "$CTL_NS" link show "$BRIDGE" >/dev/null 2>&1 || ip -n "$CTL_NS" link add "$BRIDGE" type bridge
[[ $(ip -n "$CTL_NS" addr show dev "$BRIDGE") == *" $NET.1/"* ]] || ip -n "$CTL_NS" addr add "$NET.1/24" dev "$BRIDGE"
ip -n "$CTL_NS" link set "$BRIDGE" up
for n in $NODE_NAMES; do
  ns=$(node_ns "$n")
  netns_up "$ns"
  if ! ip -n "$CTL_NS" link show "$(port_of "$n")" >/dev/null 2>&1; then
    ip -n "$ns" link del eth0 2>/dev/null || true
    ip link add "$(port_of "$n")" netns "$CTL_NS" type veth peer name eth0 netns "$ns"
    ip -n "$CTL_NS" link set "$(port_of "$n")" master "$BRIDGE"
    ip -n "$ns" addr add "$(node_addr "$n")/24" dev eth0
  fi
  ip -n "$CTL_NS" link set "$(port_of "$n")" up  # also brings a cut link back
  ip -n "$ns" link set eth0 up
done

# ---------------------------------------------------------------- slurm.conf
CPUS=$(nproc)
if [ "$WITH_DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NET.1
AccountingStoragePort=6819"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi
{
  cat <<EOF
# generated by tests/cluster/start-nodes.sh: $NODES nodes in network namespaces on one machine
ClusterName=harness
SlurmctldHost=$CTL_HOST($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$PREFIX/state/ctld
SlurmdSpoolDir=$PREFIX/state/%n
SlurmctldPidFile=$PREFIX/run/slurmctld.pid
SlurmdPidFile=$PREFIX/run/slurmd-%n.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# a node that stops answering is DOWN after 15 s (its jobs: NODE_FAIL); it comes back by itself
SlurmdTimeout=15
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
EOF
  for n in $NODE_NAMES; do
    echo "NodeName=$n NodeAddr=$(node_addr "$n") CPUs=$CPUS RealMemory=4000 State=UNKNOWN"
  done
  echo "PartitionName=nodes Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$CONF.tmp"
mv "$CONF.tmp" "$CONF"

# ---------------------------------------------------------------- munge (shared through its socket)
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key; }
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
  echo started > "$PREFIX/run/munged.ours"
  wait_for 10 munged bash -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------- controller namespace
in_ctl() { on_host "$CTL_NS" "$CTL_HOST" "$@"; }
if [ "$WITH_DBD" = 1 ]; then
  DB=$PREFIX/mysql SOCK=$PREFIX/run/mysqld.sock
  if ! pid_alive "$PREFIX/run/mysqld.pid" mariadbd; then
    if [ ! -d "$DB/mysql" ]; then
      rm -rf "$DB"
      mariadb-install-db --user=root --datadir="$DB" --auth-root-authentication-method=socket \
        --skip-test-db >"$PREFIX/log/mysql-install.log" 2>&1 || die "mariadb-install-db failed"
    fi
    in_ctl setsid mariadbd --no-defaults --user=root --datadir="$DB" --socket="$SOCK" \
      --pid-file="$PREFIX/run/mysqld.pid" --bind-address=127.0.0.1 --port=3306 \
      --log-error="$PREFIX/log/mysqld.log" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadbd mariadb --no-defaults -S "$SOCK" -uroot -e 'select 1'
  fi
  mariadb --no-defaults -S "$SOCK" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    FLUSH PRIVILEGES;"
  cat > "$PREFIX/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$CTL_HOST
DbdAddr=$NET.1
DbdPort=6819
SlurmUser=root
LogFile=$PREFIX/log/slurmdbd.log
PidFile=$PREFIX/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$PREFIX/etc/slurmdbd.conf"
  if ! pid_alive "$PREFIX/run/slurmdbd.pid" slurmdbd; then
    in_ctl slurmdbd
    wait_for 60 "slurmdbd on $NET.1:6819" in_ctl bash -c "exec 3<>/dev/tcp/$NET.1/6819"
  fi
fi
if pid_alive "$PREFIX/run/slurmctld.pid" slurmctld; then
  in_ctl scontrol reconfigure >/dev/null 2>&1 || true
else
  in_ctl slurmctld
  wait_for 60 slurmctld in_ctl scontrol ping
fi

# ---------------------------------------------------------------- one slurmd per node
for n in $NODE_NAMES; do
  if ! pid_alive "$PREFIX/run/slurmd-$n.pid" slurmd; then
    mkdir -p "$PREFIX/state/$n"
    on_host "$(node_ns "$n")" "$n" slurmd -N "$n"
  fi
done
all_idle() {
  local states
  states=$(in_ctl sinfo -h -N -o '%N %T' | sort -u)
  for n in $NODE_NAMES; do [[ $'\n'$states =~ $'\n'$n' '(idle|mixed|allocated) ]] || return 1; done
}
for _ in $(seq 1 50); do all_idle && break; sleep 0.2; done
if ! all_idle; then  # a node DOWN from an earlier run (killed, link cut): back into service
  for n in $NODE_NAMES; do in_ctl scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true; done
  wait_for 60 "every node idle" all_idle
fi
if [ "$WITH_DBD" = 1 ]; then
  wait_for 30 "cluster registered in slurmdbd" in_ctl bash -c '[[ $(sacctmgr -n -P list cluster format=cluster) == *harness* ]]'
fi
in_ctl sinfo -N
log "ready in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}") s: nodes $NODE_NAMES, controller $CTL_HOST ($NET.1);" \
    "run Slurm commands with $HERE/exec.sh (SLURM_CONF=$CONF in namespace $CTL_NS)"
