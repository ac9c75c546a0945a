#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests and for trying the launcher locally.
#
#   sudo slurm/local-cluster.sh start     # munged + slurmctld + slurmd, one partition "debug"
#   slurm/local-cluster.sh status         # sinfo + squeue
#   sudo slurm/local-cluster.sh stop
#
# Needs Debian's `slurm-wlm` and `munge` packages (apt-get install slurm-wlm munge). No cgroups:
# proctrack/linuxproc and task/none work in containers and on laptops alike. The node offers this
# machine's CPUs and memory; no accounting daemon (submitit falls back to squeue/scontrol).
set -euo pipefail

STATE_DIR=${CLIPLITE_SLURM_DIR:-/var/tmp/cliplite-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

need_root() {
    [ "$(id -u)" -eq 0 ] || { echo "local-cluster.sh $1: run as root (sudo)" >&2; exit 1; }
}

write_config() {
    mkdir -p "$(dirname "$CONF")" "$STATE_DIR"/{state,spool,log}
    cat > "$CONF" <<EOF
# written by cliplite_dist slurm/local-cluster.sh
ClusterName=cliplite-local
SlurmctldHost=$HOST
AuthType=auth/munge
CryptoType=crypto/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerParameters=batch_sched_delay=0
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
}

wait_idle() {
    for _ in $(seq 60); do
        state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
        case "$state" in
            idle*|mix*|alloc*) echo "local SLURM cluster up: node $HOST ($CPUS CPUs, ${MEM_MB} MB), partition debug"; return 0 ;;
            down*|drain*|unk*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    echo "local SLURM cluster did not come up; logs in $STATE_DIR/log" >&2
    tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
    return 1
}

start() {
    need_root start
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    wait_idle
}

stop_pid() {
    local file=$1
    if [ -f "$file" ]; then
        kill "$(cat "$file")" 2>/dev/null || true
        rm -f "$file"
    fi
}

stop() {
    need_root stop
    scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
    stop_pid "$STATE_DIR/slurmd.pid"
    stop_pid "$STATE_DIR/slurmctld.pid"
    pkill -x munged 2>/dev/null || true
    echo "local SLURM cluster stopped"
}

status() {
    sinfo && squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
