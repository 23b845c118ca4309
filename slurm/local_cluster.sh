#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for the tests and for trying the launchers:
# one slurmctld and two slurmd daemons (node1, node2) on distinct ports, both with this host as
# NodeHostname, state and logs under $MMLOOM_SLURM_DIR (default /tmp/mmloom-slurm).
#
#   slurm/local_cluster.sh start      # idempotent; installs slurm-wlm and munge if missing (root)
#   slurm/local_cluster.sh start --clean  # stop what runs from $MMLOOM_SLURM_DIR, forget its jobs
#   export SLURM_CONF=/tmp/mmloom-slurm/slurm.conf
#   sinfo                              # 2 idle nodes
#   slurm/local_cluster.sh status
#   slurm/local_cluster.sh stop
#
# Runs as root without systemd (Debian's slurm-wlm 22.05 and munge).
set -euo pipefail

DIR="${MMLOOM_SLURM_DIR:-/tmp/mmloom-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
CPUS="${MMLOOM_SLURM_CPUS:-$(nproc)}"
export SLURM_CONF="$CONF"

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-wlm and munge are missing; install them (apt-get install slurm-wlm munge) or run as root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat > "$CONF" <<EOF
# Written by slurm/local_cluster.sh: two nodes on one host.
ClusterName=mmloom
SlurmctldHost=$HOST
SlurmctldPort=${MMLOOM_SLURMCTLD_PORT:-6817}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=node1 NodeHostname=$HOST Port=${MMLOOM_SLURMD_PORT1:-6818} CPUs=$CPUS State=UNKNOWN
NodeName=node2 NodeHostname=$HOST Port=${MMLOOM_SLURMD_PORT2:-6819} CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start_munge() {
    if ! pgrep -x munged >/dev/null; then
        [ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
        chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
        mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- munged
        else
            munged --force
        fi
    fi
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    local clean=()
    if [ "${1:-}" = --clean ]; then
        # Jobs saved by an earlier, interrupted run would come back and hold the nodes.
        stop
        rm -rf "$DIR/state" "$DIR/spool"
        clean=(-c)
    fi
    install_packages
    start_munge
    write_config
    running "$DIR/slurmctld.pid" || slurmctld "${clean[@]}" -f "$CONF"
    for n in node1 node2; do
        running "$DIR/slurmd-$n.pid" || slurmd -N "$n" -f "$CONF"
    done
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -o '%t' 2>/dev/null | grep -c idle || true)" -ge 1 ] &&
           [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c idle || true)" -eq 2 ]; then
            sinfo -N
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        # Nodes left down by an earlier run come back with an explicit resume.
        scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "the cluster did not come up; see $DIR/log/" >&2
    sinfo -N >&2 || true
    exit 1
}

stop() {
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
        if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
        for _ in $(seq 1 30); do running "$pidfile" || break; sleep 1; done
    done
}

status() {
    if running "$DIR/slurmctld.pid"; then
        sinfo -N
        squeue
    else
        echo "not running (state in $DIR)"
        return 1
    fi
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
