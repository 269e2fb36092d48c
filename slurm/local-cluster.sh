#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying the workflow on a laptop:
# munged + slurmctld + slurmd (Debian's slurm-wlm and munge), every file under one folder.
#
#   sudo slurm/local-cluster.sh start             one node: this host, all its CPUs
#   sudo slurm/local-cluster.sh start --nodes 2   two nodes, each in its own network namespace
#        ... start --cpus N                     CPUs each node offers (default: this host's
#                                               CPUs shared among the nodes)
#   sudo slurm/local-cluster.sh status            daemons, nodes, and the SLURM_CONF line
#   sudo slurm/local-cluster.sh stop              cancel jobs, stop daemons, remove namespaces
#   eval "$(slurm/local-cluster.sh env)"          point sbatch/srun/squeue at this cluster
#
# It never touches a system SLURM or munge: its own slurm.conf (select it with SLURM_CONF), its
# own munge key and socket, its own ports. start and stop are idempotent.
#
# Settings (environment):
#   SIDE4VIDEO_SLURM_DIR     folder for config, state, spool, logs, pids   [/tmp/side4video-slurm]
#   SIDE4VIDEO_SLURM_PORT    slurmctld port; slurmd uses the next one       [6917]
#   SIDE4VIDEO_SLURM_SUBNET  first three octets of the namespaces' network  [10.201.0]
#   SIDE4VIDEO_SLURM_PREFIX  name prefix of the bridge, veths and netns     [s4v]
#
# Multi-node on one machine: a bridge (SUBNET.1) in the root namespace and per node a network
# namespace joined to it by a veth pair (SUBNET.1K inside, interface eth0). Each node's slurmd
# runs with `nsenter --net` + `unshare --uts` (its own host name nK); not `ip netns exec`, which
# remounts /sys and leaves slurmd without /sys/fs/cgroup. Jobs on those nodes must tell gloo the
# interface (side4video.distributed does: the one holding the address that reaches the master).
set -euo pipefail

DIR=${SIDE4VIDEO_SLURM_DIR:-/tmp/side4video-slurm}
PORT=${SIDE4VIDEO_SLURM_PORT:-6917}
SUBNET=${SIDE4VIDEO_SLURM_SUBNET:-10.201.0}
PREFIX=${SIDE4VIDEO_SLURM_PREFIX:-s4v}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
BRIDGE=${PREFIX}br0

die() { echo "local-cluster: $*" >&2; exit 1; }
say() { echo "local-cluster: $*" >&2; }

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Ask before touching anything: what the cluster needs must be installed and we must be root.
preflight() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd launches jobs as their users)"
    local missing=()
    for tool in munged slurmctld slurmd sinfo scontrol; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}: apt-get install slurm-wlm munge"
}

saved_nodes() { [[ -s $DIR/nodes ]] && cat "$DIR/nodes" || echo 0; }
node_names() {
    local n=$1
    if [[ $n -le 1 ]]; then hostname -s; else for k in $(seq 1 "$n"); do echo "n$k"; done; fi
}

# ----------------------------------------------------------------------------- munge
start_munge() {
    mkdir -p "$DIR/munge"
    chmod 0755 "$DIR/munge"  # clients of any user reach the socket; the key stays 0400
    if [[ ! -s $DIR/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$DIR/munge/munge.key"
        else  # munge < 0.5.14 has no mungekey
            dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 0400 "$DIR/munge/munge.key"
    if alive "$DIR/munge/munged.pid"; then return; fi
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    for _ in $(seq 50); do [[ -S $MUNGE_SOCKET ]] && return; sleep 0.1; done
    die "munged did not start; see $DIR/log/munged.log"
}

# ----------------------------------------------------------------------------- namespaces
setup_netns() {
    local n=$1
    command -v ip >/dev/null || die "missing ip: apt-get install iproute2"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for k in $(seq 1 "$n"); do
        local ns=$PREFIX-n$k host_end=$PREFIX-h$k peer=$PREFIX-p$k
        ip netns list | grep -qw "^$ns" || ip netns add "$ns"
        if ! ip link show "$host_end" >/dev/null 2>&1; then
            ip link add "$host_end" type veth peer name "$peer"
            ip link set "$peer" netns "$ns"
            ip -n "$ns" link set "$peer" name eth0
            ip -n "$ns" addr add "$SUBNET.$((10 + k))/24" dev eth0
        fi
        ip link set "$host_end" master "$BRIDGE" up
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

teardown_netns() {
    local k ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX-n[0-9]*$" || true); do
        # Whatever still runs in there (job steps of a killed slurmd) goes with the namespace.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    for k in $(seq 1 16); do ip link del "$PREFIX-h$k" 2>/dev/null || true; done
    ip link del "$BRIDGE" 2>/dev/null || true
}

# ----------------------------------------------------------------------------- slurm.conf
write_conf() {
    local n=$1 cpus_override=$2 cpus_total mem_mb cpus mem host ctl_addr
    cpus_total=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    host=$(hostname -s)
    if [[ $n -le 1 ]]; then
        cpus=$cpus_total
        mem=$((mem_mb * 9 / 10))
        ctl_addr=127.0.0.1
    else
        # The namespaced nodes share this machine's cores and memory.
        cpus=$((cpus_total / n)); [[ $cpus -ge 1 ]] || cpus=1
        mem=$((mem_mb * 9 / 10 / n))
        ctl_addr=$SUBNET.1
    fi
    [[ -z $cpus_override ]] || cpus=$cpus_override
    : >"$DIR/plugstack.conf"  # empty: no SPANK plugins from /etc/slurm
    cat >"$CONF" <<EOF
# Generated by slurm/local-cluster.sh ($n node(s)); select it with SLURM_CONF=$CONF
ClusterName=side4video
SlurmctldHost=$host($ctl_addr)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=15
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (a requeued job starts soon after it is eligible).
SchedulerParameters=sched_interval=3,bf_interval=3
ReturnToService=2
# The configured CPUs/memory are what this machine gives each node, not its hardware.
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
MailProg=/bin/true
SlurmctldDebug=info
SlurmdDebug=info
EOF
    local name k
    if [[ $n -le 1 ]]; then
        echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
    else
        for k in $(seq 1 "$n"); do
            name=n$k
            echo "NodeName=$name NodeAddr=$SUBNET.$((10 + k)) NodeHostname=$name CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
        done
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

# ----------------------------------------------------------------------------- daemons
# Every daemon carries this marker in its environment, so `stop` finds its leftovers by it.
marker_env() { env SIDE4VIDEO_SLURM_CLUSTER="$DIR" SLURM_CONF="$CONF" "$@"; }

start_slurmd() {
    local n=$1 name k
    if [[ $n -le 1 ]]; then
        name=$(hostname -s)
        alive "$DIR/run/slurmd-$name.pid" || marker_env slurmd -f "$CONF" -N "$name"
    else
        for k in $(seq 1 "$n"); do
            name=n$k
            alive "$DIR/run/slurmd-$name.pid" && continue
            marker_env nsenter --net="/var/run/netns/$PREFIX-n$k" unshare --uts \
                sh -c "hostname $name && exec slurmd -f '$CONF' -N $name"
        done
    fi
}

wait_ready() {
    local n=$1 idle
    for _ in $(seq 120); do
        idle=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle" || $2 == "mix" || $2 == "alloc"' | wc -l)
        if [[ $idle -ge $n ]]; then return 0; fi
        sleep 0.5
    done
    SLURM_CONF=$CONF sinfo -N -l >&2 || true
    die "nodes not ready after 60 s; logs in $DIR/log"
}

cmd_start() {
    local n=1 cpus=""
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nodes) n=${2:-}; shift 2 ;;
            --nodes=*) n=${1#*=}; shift ;;
            --cpus) cpus=${2:-}; shift 2 ;;
            --cpus=*) cpus=${1#*=}; shift ;;
            *) die "unknown option $1 (start [--nodes N] [--cpus N])" ;;
        esac
    done
    [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 9 ]] || die "--nodes must be 1..9, got $n"
    [[ -z $cpus || $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive number, got $cpus"
    preflight
    local running
    running=$(saved_nodes)
    if alive "$DIR/run/slurmctld.pid" && [[ $running -ne $n ]]; then
        die "a $running-node cluster is already running in $DIR; stop it first"
    fi
    mkdir -p "$DIR"/{state,run,log}
    echo "$n" >"$DIR/nodes"
    start_munge
    [[ $n -le 1 ]] || setup_netns "$n"
    if ! alive "$DIR/run/slurmctld.pid"; then
        write_conf "$n" "$cpus"
        # -c: a fresh start forgets jobs of an earlier run in this folder.
        marker_env slurmctld -c -f "$CONF"
    fi
    start_slurmd "$n"
    wait_ready "$n"
    say "$n node(s) up: $(SLURM_CONF=$CONF sinfo -h -N -o '%N' | sort -u | tr '\n' ' ')"
    echo "export SLURM_CONF=$CONF"
}

stop_pids() {  # stop_pids PIDFILE...: TERM to all at once (each takes ~2 s to exit), wait up to 10 s, KILL
    local file pids=()
    for file in "$@"; do
        if alive "$file"; then pids+=("$(cat "$file")"); kill "${pids[-1]}" 2>/dev/null || true; fi
    done
    for _ in $(seq 100); do
        local left=0 pid
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        [[ $left -eq 0 ]] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -f "$@"
}

cmd_stop() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    if alive "$DIR/run/slurmctld.pid"; then
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o '%i' 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            SLURM_CONF=$CONF scancel --full $jobs 2>/dev/null || true
            for _ in $(seq 50); do
                [[ -z $(SLURM_CONF=$CONF squeue -h -t R,CG -o '%i' 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    stop_pids "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"
    # Job steps whose slurmd is gone: found by the marker their daemons passed down.
    local pid
    for pid in $(grep -lszFx "SIDE4VIDEO_SLURM_CLUSTER=$DIR" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
        [[ $pid -ne $$ ]] && kill -9 "$pid" 2>/dev/null || true
    done
    teardown_netns
    rm -f "$DIR/nodes"
    say "stopped (logs kept in $DIR/log)"
}

cmd_status() {
    local ok=0 f
    for f in "$DIR/munge/munged.pid" "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd-*.pid; do
        [[ -e $f ]] || continue
        if alive "$f"; then say "$(basename "$f" .pid) running (pid $(cat "$f"))"; else say "$(basename "$f" .pid) not running"; ok=1; fi
    done
    if ! alive "$DIR/run/slurmctld.pid"; then say "not running (start: $0 start)"; exit 3; fi
    SLURM_CONF=$CONF sinfo -N -o '%N %t %c %m' >&2 || ok=1
    echo "export SLURM_CONF=$CONF"
    return $ok
}

case ${1:-} in
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start [--nodes N] [--cpus N] | stop | status | env" >&2; exit 2 ;;
esac
