#!/usr/bin/env bash
# A real SLURM cluster on this machine: for the test suite, and for trying
# slurm/fsdp_capture.sh without a cluster. Debian's slurmctld/slurmd/munge; needs root.
#
#   slurm/local_cluster.sh install            apt-get install the packages (skipped if present)
#   slurm/local_cluster.sh start [--nodes N]  write DIR/slurm.conf, start munged, slurmctld, slurmd(s)
#                                             (on a cluster that is up: restart a node's dead slurmd)
#   slurm/local_cluster.sh stop               stop the daemons; remove the nodes' namespaces and links
#                                             (every one named NAME-*, also a killed start's)
#   slurm/local_cluster.sh status             daemons, namespaces, links and node state
#   slurm/local_cluster.sh env                the line to eval so sbatch/squeue find this cluster
#
# Then: eval "$(slurm/local_cluster.sh env)"; sbatch ... ; squeue
#
# One node (the default) is this host itself. With --nodes N (N >= 2) every node is a network
# namespace of its own, NAME-node0 .. NAME-node<N-1>, with its own hostname (node0 ..: a UTS
# namespace per daemon) and its own address on a veth pair into a bridge NAME-br:
# SUBNET.1 .. SUBNET.N, the host SUBNET.254 (the script creates every address it uses and
# sends traffic to no other). slurmctld runs in node0, one slurmd in each node; munge, the
# file system and the CPUs are shared, so a job's ranks on two "nodes" talk over the veth
# pairs (gloo, the c10d rendezvous) as on two machines. Each node offers all CPUs.
# `stop` removes every namespace and link `start` made, and a start that fails half way
# removes what it made before it exits.
#
# Settings (environment): SLURM_LOCAL_DIR (default /tmp/slurm-local) holds the config,
# state, spool and logs; SLURM_LOCAL_CPUS (default: all online CPUs); SLURM_LOCAL_PORT (default
# 6817, slurmd takes the next port); SLURM_LOCAL_SLURMD_TIMEOUT (default 300 s: how long a
# node may not answer before it is DOWN); SLURM_LOCAL_NODES (default 1; --nodes wins);
# SLURM_LOCAL_NAME (default slocal, at most 10 characters: the namespaces' and links' prefix);
# SLURM_LOCAL_SUBNET (default 10.250.0, the first three octets of the nodes' /24).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
CPUS=${SLURM_LOCAL_CPUS:-$(getconf _NPROCESSORS_ONLN)}
PORT=${SLURM_LOCAL_PORT:-6817}
NODES=${SLURM_LOCAL_NODES:-1}
NAME=${SLURM_LOCAL_NAME:-slocal}
SUBNET=${SLURM_LOCAL_SUBNET:-10.250.0}
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local_cluster: $*" >&2; exit 1; }

# A multi-node cluster's shape is kept beside its config, so `stop` and `status` find its
# namespaces and links without being told again.
# shellcheck disable=SC1091
[[ -f $DIR/cluster.env ]] && source "$DIR/cluster.env"

need_root() {
    [[ $(id -u) == 0 ]] || die "needs root (it starts munged, slurmctld and slurmd)"
}

install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
       command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "no apt-get: install ${PACKAGES[*]} with your package manager"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
}

write_conf() {
    mkdir -p "$DIR"/{state,spool,log}
    local mem_mb ctld=$HOST i
    # Leave 1 GiB to the system; jobs that ask for more memory than this are refused. The
    # nodes of a multi-node cluster share the machine's memory.
    mem_mb=$(awk -v n="$NODES" '/MemTotal/ {print int(($2 / 1024 - 1024) / n)}' /proc/meminfo)
    ((NODES > 1)) && ctld="node0($(node_addr 0))"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh for $HOST ($NODES node(s)).
ClusterName=local
SlurmctldHost=$ctld
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# How long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups here: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
# No accounting database: finished jobs stay visible to scontrol for 30 minutes.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=1800
KillWait=30
# How long a node may not answer before it is DOWN and its jobs fail (NODE_FAIL) or requeue.
SlurmdTimeout=${SLURM_LOCAL_SLURMD_TIMEOUT:-300}
# The nodes' CPUs are what this file says (SLURM_LOCAL_CPUS may offer more than there are).
SlurmdParameters=config_overrides
EOF
    if ((NODES == 1)); then
        echo "NodeName=$HOST CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN" >>"$CONF"
        echo "PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
        return 0
    fi
    for ((i = 0; i < NODES; i++)); do
        echo "NodeName=node$i NodeAddr=$(node_addr "$i") CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN"
    done >>"$CONF"
    echo "PartitionName=local Nodes=node[0-$((NODES - 1))] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

node_names() {
    if ((NODES == 1)); then echo "$HOST"; else seq -f 'node%g' 0 $((NODES - 1)); fi
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    # One munged serves the machine; reuse it when it answers.
    if munge -n </dev/null >/dev/null 2>&1; then return 0; fi
    [[ -f /etc/munge/munge.key ]] || die "no /etc/munge/munge.key: run '$0 install' first"
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

# -- the nodes of a multi-node cluster: network namespaces on a bridge --------------------

node_addr() { echo "$SUBNET.$(($1 + 1))"; }
netns_of() { echo "$NAME-node$1"; }
bridge_name() { echo "$NAME-br"; }
# The namespaces and host-side links named like this cluster's, whoever made them.
own_netns() { ip netns list | awk '{print $1}' | grep -xE "$NAME-node[0-9]+" || true; }
own_links() { ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -xE "$NAME-(br|v[0-9]+)" | sort || true; }

# What a start made, undone in reverse order if it fails before it is done (a failed start
# leaves nothing behind, and removes nothing it did not make).
MADE=()
undo_made() {
    local i
    for ((i = ${#MADE[@]} - 1; i >= 0; i--)); do eval "${MADE[i]}" >/dev/null 2>&1 || true; done
    MADE=()
}

make_nodes() {
    local br i j ns veth
    br=$(bridge_name)
    ip link add "$br" type bridge || die "cannot create bridge $br (another cluster named" \
        "'$NAME'? set SLURM_LOCAL_NAME, or run '$0 stop' for it)"
    MADE+=("ip link del $br")
    ip addr add "$SUBNET.254/24" dev "$br" || die "cannot put $SUBNET.254/24 on $br" \
        "(is $SUBNET.0/24 in use here? set SLURM_LOCAL_SUBNET)"
    ip link set "$br" up
    for ((i = 0; i < NODES; i++)); do
        ns=$(netns_of "$i") veth=$NAME-v$i
        ip netns add "$ns" || die "cannot create network namespace $ns"
        MADE+=("kill_netns $ns; ip netns del $ns; rm -rf /etc/netns/$ns")
        ip link add "$veth" type veth peer name "$NAME-p$i" || die "cannot create veth pair $veth"
        MADE+=("ip link del $veth")
        ip link set "$NAME-p$i" netns "$ns"
        ip link set "$veth" master "$br" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "$NAME-p$i" name eth0
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        # The node's /etc/hosts (bind-mounted by in_node): the machine's, and every node.
        mkdir -p "/etc/netns/$ns"
        { grep -v '^[[:space:]]*#' /etc/hosts
          for ((j = 0; j < NODES; j++)); do echo "$(node_addr "$j") node$j"; done
        } >"/etc/netns/$ns/hosts"
    done
}

# Run a command in node i: its network namespace, a UTS namespace named node<i>, and a
# mount namespace in which /etc/hosts names every node (torchrun's rendezvous and gloo look
# the nodes up by name). Not `ip netns exec`: it also remounts /sys, which hides the cgroup
# file system slurmd needs.
in_node() {
    local i=$1; shift
    # shellcheck disable=SC2016  # $0, $1 and $@ are the inner shell's
    nsenter --net="/run/netns/$(netns_of "$i")" unshare --uts --mount --propagation private \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"' \
        "node$i" "/etc/netns/$(netns_of "$i")/hosts" "$@"
}

kill_netns() {
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null) || return 0
    # shellcheck disable=SC2086  # one pid per word
    [[ -z $pids ]] || kill -9 $pids 2>/dev/null || true
    # Until they are gone, reaped included (a daemon's pid file may name one).
    local pid
    for pid in $pids; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}

start() {
    need_root
    command -v slurmctld >/dev/null || die "SLURM is not installed: run '$0 install' first"
    [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number, got '$NODES'"
    if pid_alive "$DIR/slurmctld.pid"; then
        # Up already: bring back a node whose slurmd died (a node "lost" and back).
        local i
        export SLURM_CONF=$CONF
        for ((i = 0; i < NODES; i++)); do
            if ((NODES == 1)); then
                pid_alive "$DIR/slurmd-$HOST.pid" || slurmd -f "$CONF"
            elif ! pid_alive "$DIR/slurmd-node$i.pid"; then
                [[ -e /run/netns/$(netns_of "$i") ]] || die "node$i's namespace is gone: run '$0 stop', then start"
                in_node "$i" slurmd -f "$CONF" -N "node$i"
            fi
        done
        wait_idle
        return 0
    fi
    if ((NODES > 1)); then start_nodes; return 0; fi
    # Another cluster's daemon on these ports (one a killed run left) would answer sinfo and
    # sbatch in place of ours. (A multi-node cluster listens inside its own namespaces.)
    if ss -Hltn "( sport = :$PORT or sport = :$((PORT + 1)) )" | grep -q .; then
        die "port $PORT or $((PORT + 1)) is in use (another local cluster? run '$0 stop' with" \
            "its SLURM_LOCAL_DIR, or set SLURM_LOCAL_PORT)"
    fi
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    wait_idle
}

start_nodes() {
    local i
    ((${#NAME} <= 10)) || die "SLURM_LOCAL_NAME '$NAME' is longer than 10 characters (link names are at most 15)"
    [[ $SUBNET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "SLURM_LOCAL_SUBNET must be three octets like 10.250.0, got '$SUBNET'"
    command -v ip >/dev/null || die "a multi-node cluster needs iproute2's ip"
    trap 'undo_made' EXIT
    make_nodes
    mkdir -p "$DIR"
    printf 'NODES=%s\nNAME=%s\nSUBNET=%s\nCPUS=%s\n' "$NODES" "$NAME" "$SUBNET" "$CPUS" >"$DIR/cluster.env"
    MADE+=("rm -f $DIR/cluster.env")
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    in_node 0 slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    MADE+=("stop_daemons")
    for ((i = 0; i < NODES; i++)); do
        in_node "$i" slurmd -f "$CONF" -N "node$i" || die "slurmd of node$i did not start; see $DIR/log/slurmd-node$i.log"
    done
    wait_idle
    trap - EXIT
    MADE=()
}

wait_idle() {
    export SLURM_CONF=$CONF
    local states="" want
    want=$(node_names | wc -l)
    for _ in $(seq 150); do
        states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
        # Up and answering (a trailing * is a node not responding); "comp": a job ending.
        if [[ $(grep -cE ' (idle|mix|alloc|comp)$' <<<"$states") == "$want" ]]; then
            echo "local cluster up: $NODES node(s) ($(node_names | paste -sd, -)), $CPUS CPUs each," \
                 "SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.2
    done
    die "nodes not idle after 30 s: ${states:-no answer from slurmctld}; see $DIR/log/slurmctld.log and slurmd-*.log"
}

stop_daemons() {
    local f pid
    for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
        pid_alive "$f" || continue
        pid=$(cat "$f")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
}

stop() {
    local ns link
    stop_daemons
    command -v ip >/dev/null || return 0
    # Every node of the cluster named NAME, found by name rather than from cluster.env, so a
    # cluster whose start process was killed (or whose DIR is gone) is removed too. Jobs
    # still running in a node die with it; then the namespaces (and with them the veth ends
    # inside), the host ends, the bridge and the hosts files.
    for ns in $(own_netns); do
        kill_netns "$ns"
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    for link in $(own_links | grep -v "^$(bridge_name)$"); do
        ip link del "$link" 2>/dev/null || true
    done
    ip link del "$(bridge_name)" 2>/dev/null || true
    rm -f "$DIR/cluster.env"
}

status() {
    local f n
    if pid_alive "$DIR/slurmctld.pid"; then echo "slurmctld: running (pid $(cat "$DIR/slurmctld.pid"))"; else echo "slurmctld: stopped"; fi
    for n in $(node_names); do
        f=$DIR/slurmd-$n.pid
        if pid_alive "$f"; then echo "slurmd $n: running (pid $(cat "$f"))"; else echo "slurmd $n: stopped"; fi
    done
    if ((NODES > 1)); then
        echo "namespaces: $(own_netns | sort | paste -sd' ' -)"
        echo "links: $(own_links | paste -sd' ' -)"
    fi
    if pid_alive "$DIR/slurmctld.pid"; then SLURM_CONF=$CONF sinfo; fi
}

CMD=${1:-}
shift || true
while (($#)); do
    case $1 in
        --nodes) NODES=${2:-}; shift 2 || die "--nodes needs a number" ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) die "unknown option '$1' (usage: $0 start [--nodes N])" ;;
    esac
done

case $CMD in
    install) install ;;
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start [--nodes N]|stop|restart|status|env" >&2; exit 2 ;;
esac
