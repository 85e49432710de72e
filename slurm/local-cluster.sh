#!/usr/bin/env bash
# A real single-node Slurm cluster (munge + slurmctld + slurmd) on this machine, for tests and CI.
# Usage: bash slurm/local-cluster.sh start|stop|status   (as root; Debian packages slurmctld slurmd slurm-client munge)
# Idempotent: `start` does nothing when the cluster already answers.
set -euo pipefail
STATE=${MOEFLOW_SLURM_STATE:-/var/tmp/moeflow-slurm}
NODE=$(hostname -s)

answers() { timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|alloc'; }

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    head -c 1024 /dev/urandom > /etc/munge/munge.key
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  su -s /bin/sh munge -c /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  echo "munge did not start" >&2; exit 1
}

write_conf() {
  mkdir -p "$STATE"/{state,spool,log}
  local mem=$(( $(awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo) * 8 / 10 ))
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$NODE
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=sched_interval=1
NodeName=$NODE CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

case "${1:-start}" in
  start)
    if answers; then echo "slurm: already up"; exit 0; fi
    start_munge
    write_conf
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 100); do answers && { echo "slurm: up ($NODE)"; exit 0; }; sleep 0.2; done
    echo "slurm: the node did not come up; see $STATE/log" >&2; exit 1 ;;
  stop)
    for f in "$STATE"/slurmd.pid "$STATE"/slurmctld.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done ;;
  status)
    answers && sinfo || { echo "slurm: down"; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
