#!/bin/bash
# A real single-machine Slurm cluster for the tests: munge, one slurmctld, two slurmd
# (node1, node2) on this host, private ports, state under DIR. Needs root and Debian's
# slurm-wlm and munge packages (.ci/run installs them).
#
# Like a real cluster's nodes, each test node has a node-local scratch directory, DIR/scratch:
# each slurmd runs in its own mount namespace where DIR/local/NODE is mounted there, so a job
# step on node1 and one on node2 see different files under the same path (node health tests).
#
#   slurm/testcluster.sh start DIR     # prints the SLURM_CONF to export
#   slurm/testcluster.sh stop DIR
set -euo pipefail
cmd=$1 dir=$(realpath -m "$2")
conf=$dir/slurm.conf

stop() {
    for pidfile in "$dir"/slurmd-node1.pid "$dir"/slurmd-node2.pid "$dir"/slurmctld.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    pkill -f "slurmd -f $conf" 2>/dev/null || true
    pkill -f "slurmctld -f $conf" 2>/dev/null || true
    # Job steps outlive their slurmd; this host has no other Slurm, so end them all.
    pkill slurmstepd 2>/dev/null || true
    sleep 1
    pkill -9 -f "slurm(d|ctld) -f $conf" 2>/dev/null || true
    pkill -9 slurmstepd 2>/dev/null || true
    pkill -9 -f "$dir/spool/" 2>/dev/null || true   # batch scripts orphaned by the steps above
    if [ -f "$dir/munged.started" ]; then
        pkill -x munged 2>/dev/null || true
        rm -f "$dir/munged.started"
    fi
}

if [ "$cmd" = stop ]; then stop; exit 0; fi

mkdir -p "$dir"/state "$dir"/spool/node1 "$dir"/spool/node2 "$dir"/scratch \
    "$dir"/local/node1 "$dir"/local/node2
host=$(hostname -s)
base=$(( 17000 + RANDOM % 20000 ))
cpus=$(nproc)
cat > "$conf" <<CONF
ClusterName=slurmlmtest
SlurmctldHost=$host
SlurmctldPort=$base
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=3600
InactiveLimit=0
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=node1 NodeHostname=$host Port=$((base + 1)) CPUs=$cpus State=UNKNOWN
NodeName=node2 NodeHostname=$host Port=$((base + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=1-00:00:00 State=UP OverSubscribe=FORCE:4
CONF

stop  # anything left by an earlier run on this directory
# munge, as user munge, with the key the package generated (or a fresh one).
mkdir -p /run/munge /etc/munge
chown munge:munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
    touch "$dir/munged.started"  # ours to stop
fi

export SLURM_CONF=$conf
slurmctld -f "$conf" -c
for node in node1 node2; do  # each in its own mount namespace: DIR/scratch is node-local
    unshare --mount --propagation private sh -c \
        "mount --bind '$dir/local/$node' '$dir/scratch' && exec slurmd -f '$conf' -N $node"
done
for _ in $(seq 60); do
    if [ "$(sinfo -h -o %T 2>/dev/null | grep -c -E '^(idle|mixed)')" -ge 1 ] && \
       [ "$(sinfo -h -N -o %T 2>/dev/null | grep -c -E '^(idle|mixed)')" -eq 2 ]; then
        echo "$conf"
        exit 0
    fi
    sleep 1
done
echo "the test cluster did not come up; logs in $dir" >&2
sinfo -N >&2 || true
exit 1
