#!/usr/bin/env bash
# A real two-node SLURM cluster on one machine, from Debian's packages (slurmctld, slurmd,
# munge), for tests/slurm/run.sh. Each node is a slurmd in its own network, UTS and mount
# namespace: its own address (10.77.0.1N on a bridge), its own host name (n1, n2) and its
# own /etc/hosts, so a job, srun and torchrun see two hosts exactly as on a cluster; the
# filesystem is shared, as a cluster's would be. slurmctld and munged run on the host.
#
#   bash tests/slurm/cluster.sh start DIR   # DIR: state, config and logs (also SLURM_CONF)
#   bash tests/slurm/cluster.sh stop DIR    # stops what start started, removes the netns
# Needs root (namespaces, a bridge). Every wait is bounded and says what it waited for.
set -euo pipefail
cmd=${1:?start|stop}
dir=$(mkdir -p "${2:?state directory}" && cd "$2" && pwd)
NODES=(n1 n2)
BRIDGE=colo-br0
NET=10.77.0

die() { echo "cluster.sh: $*" >&2; exit 1; }
trap 'echo "cluster.sh: \"$BASH_COMMAND\" failed (line $LINENO); logs in $dir/log" >&2' ERR

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${limit}s waiting for $what (logs in $dir/log)"
    sleep 0.5
  done
}

start() {
  mkdir -p "$dir"/{etc,log,state,spool,munge}
  chmod 700 "$dir/munge"
  # munge: a job-private key and socket (the host's munge, if any, is left alone).
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
         --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
         --seed-file="$dir/munge/munged.seed"
  wait_for 20 "munged's socket" test -S "$dir/munge/munge.socket"

  # Network: a bridge on the host, one veth per node namespace.
  ip link add "$BRIDGE" type bridge 2>/dev/null || true
  ip addr add "$NET.1/24" dev "$BRIDGE" 2>/dev/null || true
  ip link set "$BRIDGE" up
  local hosts="$dir/etc/hosts"
  { echo "127.0.0.1 localhost"; echo "$NET.1 $(hostname -s)"
    for i in "${!NODES[@]}"; do echo "$NET.1$((i + 1)) ${NODES[$i]}"; done; } >"$hosts"
  local ctl; ctl=$(hostname -s)

  cat >"$dir/etc/slurm.conf" <<EOF
ClusterName=colotest
SlurmctldHost=$ctl($NET.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
NodeName=DEFAULT CPUs=$(nproc) State=UNKNOWN
$(for i in "${!NODES[@]}"; do echo "NodeName=${NODES[$i]} NodeAddr=$NET.1$((i + 1))"; done)
PartitionName=test Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=30 State=UP
EOF
  export SLURM_CONF="$dir/etc/slurm.conf"

  slurmctld -f "$SLURM_CONF" -i
  wait_for 30 "slurmctld to answer" scontrol ping

  for i in "${!NODES[@]}"; do
    local node=${NODES[$i]} ns=colo-${NODES[$i]}
    ip netns add "$ns"
    ip link add "colo-v$i" type veth peer name eth0 netns "$ns"
    ip link set "colo-v$i" master "$BRIDGE" up
    ip netns exec "$ns" ip addr add "$NET.1$((i + 1))/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip link set lo up
    mkdir -p "$dir/spool/$node"
    # Own host name and /etc/hosts; slurmd finds its NodeName from the host name. (nsenter,
    # not `ip netns exec`, which remounts /sys and so hides the cgroup mounts slurmd needs.)
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private sh -c \
      "hostname $node && mount --bind $hosts /etc/hosts && exec slurmd -f $SLURM_CONF" \
      >"$dir/log/slurmd-$node.start" 2>&1
  done
  wait_for 60 "both nodes idle (sinfo)" \
    bash -c "[ \"\$(sinfo -h -N -o %t | grep -c idle)\" = ${#NODES[@]} ]"
  echo "cluster.sh: ${#NODES[@]} nodes up (SLURM_CONF=$SLURM_CONF)"
  sinfo -N
}

stop_pidfile() {  # stop_pidfile FILE NAME: SIGTERM, bounded wait, then SIGKILL
  local pid
  [ -f "$1" ] && pid=$(cat "$1") || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  echo "cluster.sh: $2 (pid $pid) ignored SIGTERM for 10 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

stop() {
  for node in "${NODES[@]}"; do stop_pidfile "$dir/slurmd-$node.pid" "slurmd $node"; done
  stop_pidfile "$dir/slurmctld.pid" slurmctld
  stop_pidfile "$dir/munge/munged.pid" munged
  for i in "${!NODES[@]}"; do ip netns del "colo-${NODES[$i]}" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) die "usage: cluster.sh start|stop DIR" ;;
esac
