#!/usr/bin/env bash
# Stop the local Slurm started by .ci/slurm-up.sh, by the PIDs it recorded.
#
#   .ci/slurm-down.sh [STATE_DIR]           stop slurmd and slurmctld
#   .ci/slurm-down.sh --check [STATE_DIR]   exit 0 if both daemons are running, 1 otherwise
set -uo pipefail

check=0
if [[ ${1:-} == --check ]]; then
  check=1
  shift
fi
DIR=${1:-${RETRIEVAL_SLURM_DIR:-${TMPDIR:-/tmp}/retrieval-slurm}}

alive() { [[ -f $DIR/$1.pid ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

if [[ $check == 1 ]]; then
  alive slurmctld && alive slurmd
  exit
fi

for daemon in slurmd slurmctld; do
  alive "$daemon" || continue
  pid=$(cat "$DIR/$daemon.pid")
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  echo "slurm-down: stopped $daemon ($pid)" >&2
done
rm -f "$DIR/slurm.env"
exit 0
