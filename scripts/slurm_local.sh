#!/bin/bash
# A real single-node SLURM cluster on this machine (slurmctld + slurmd + munge on localhost, as
# root), for trying deploy/slurm.sbatch and for the slow SLURM test. Idempotent: a running cluster
# is left as it is.
#
#   sudo bash scripts/slurm_local.sh          # install (Debian's slurm-wlm, munge) and start
#   sudo bash scripts/slurm_local.sh stop     # stop the daemons
#
# Exit status: 0 the cluster answers `sinfo` with an idle node; 3 it cannot run here (not root,
# no apt-get, no packages), with the reason on one line; 1 it was installed but did not come up.
set -uo pipefail

CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm

cannot() { echo "slurm_local: cannot run a local SLURM here: $*" >&2; exit 3; }

if [ "${1:-}" = "stop" ]; then
    pkill -x slurmd; pkill -x slurmctld; pkill -x munged
    exit 0
fi

[ "$(id -u)" = 0 ] || cannot "needs root (slurmd runs jobs as any user)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || cannot "slurm-wlm is not installed and there is no apt-get"
    echo "slurm_local: installing slurm-wlm and munge (Debian packages)" >&2
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge) \
        >/tmp/slurm_local-apt.log 2>&1 || cannot "apt-get install slurm-wlm munge failed (see /tmp/slurm_local-apt.log)"
fi

# slurmd refuses a requeued job's new credential until the old one expires: this is how long a
# requeued job waits before it may start again (SLURM's default, 120 s, slows the requeue test)
CRED_EXPIRE=10
if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    grep -qx "AuthInfo=cred_expire=$CRED_EXPIRE" "$CONF" 2>/dev/null && exit 0  # already up
    echo "slurm_local: restarting the daemons with this script's slurm.conf" >&2
    pkill -x slurmd; pkill -x slurmctld
    while pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null; do sleep 0.2; done
fi

host=$(hostname -s)
node=$(slurmd -C | head -1)  # NodeName=<host> CPUs=... RealMemory=...
mkdir -p "$STATE" "$SPOOL" "$LOGS" /etc/slurm /run/munge /var/log/munge /var/lib/munge
cat >"$CONF" <<EOF
# written by jaxdist scripts/slurm_local.sh: one node, everything on localhost, jobs as root
ClusterName=jaxdist-local
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do  # the daemons register within seconds; give them a minute
    state=$(sinfo -h -o %T 2>/dev/null | head -1)
    case "$state" in
        idle|mixed|allocated) echo "slurm_local: node $host $state" >&2; exit 0 ;;
        down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null ;;
    esac
    sleep 1
done
echo "slurm_local: the cluster did not come up; see $LOGS/slurmctld.log and $LOGS/slurmd.log" >&2
exit 1
