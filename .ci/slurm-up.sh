#!/usr/bin/env bash
# Start a single-node Slurm on this machine for the `slurm` tests: slurmctld + slurmd, auth/none (no munge).
#
#   .ci/slurm-up.sh [STATE_DIR]     default: $RETRIEVAL_SLURM_DIR or /tmp/retrieval-slurm
#   .ci/slurm-down.sh [STATE_DIR]   stops both daemons by their recorded PIDs
#
# Installs Debian's slurm-wlm if missing (needs root), writes STATE_DIR/slurm.conf, starts the daemons in
# the background (PIDs in STATE_DIR/*.pid, logs in STATE_DIR/*.log), waits until the node is idle and
# writes STATE_DIR/slurm.env (`export SLURM_CONF=...`), which tests/test_slurm.py reads.
set -euo pipefail

DIR=${1:-${RETRIEVAL_SLURM_DIR:-${TMPDIR:-/tmp}/retrieval-slurm}}
HERE=$(cd "$(dirname "$0")" && pwd)

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  echo "slurm-up: installing slurm-wlm" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq slurm-wlm >/dev/null
fi

# Already running from an earlier call: reuse it.
if [[ -f $DIR/slurm.env ]] && "$HERE/slurm-down.sh" --check "$DIR"; then
  echo "slurm-up: already running ($DIR)" >&2
  cat "$DIR/slurm.env"
  exit 0
fi

mkdir -p "$DIR"/{state,spool}
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) * 8 / 10 / 1024))
PORT_BASE=$((6817 + RANDOM % 2000 * 2))  # two adjacent free-ish ports, away from a system Slurm's 6817/6818
cat >"$DIR/slurm.conf" <<EOF
ClusterName=retrieval-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/state/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ReturnToService=2
JobRequeue=1
KillWait=5
AuthInfo=cred_expire=10  # also how long a requeued job waits before it may start again (default 120 s)
MinJobAge=600
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF=$DIR/slurm.conf

# -D: foreground (so $! is the daemon), -c: clear state from an earlier run.
slurmctld -D -c -f "$SLURM_CONF" >>"$DIR/slurmctld.out" 2>&1 &
echo $! >"$DIR/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" >>"$DIR/slurmd.out" 2>&1 &
echo $! >"$DIR/slurmd.pid"

for _ in $(seq 60); do
  state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
  [[ $state == idle ]] && break
  sleep 0.5
done
if [[ ${state:-} != idle ]]; then
  echo "slurm-up: node did not become idle (state '${state:-none}'); logs in $DIR" >&2
  tail -n 20 "$DIR"/slurmctld.log "$DIR"/slurmd.log >&2 || true
  "$HERE/slurm-down.sh" "$DIR" || true
  exit 1
fi
echo "export SLURM_CONF=$SLURM_CONF" >"$DIR/slurm.env"
echo "slurm-up: node $HOST idle ($CPUS CPUs), SLURM_CONF=$SLURM_CONF" >&2
cat "$DIR/slurm.env"
