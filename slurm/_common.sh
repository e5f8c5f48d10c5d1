#!/usr/bin/env bash
# Helpers shared by slurm/train.sbatch and slurm/embed.sbatch.
#
# Sourced by the batch script (first node); also executed by `srun` on every node as
#   bash slurm/_common.sh launch_node SIGNALS ACCELERATE_LAUNCH_ARGS...
# Slurm's variables are translated here and nowhere else in the shell scripts (retrieval/dist.py
# holds the same rules for Python).

log() { echo "[$(date +%H:%M:%S) ${SLURM_JOB_ID:-nojob}/${SLURM_NODEID:-?}] $*" >&2; }

# The repo root: sbatch copies the script to a spool folder, so $0 is useless; jobs run from where
# they were submitted (the repo root) unless RETRIEVAL_ROOT says otherwise.
repo_root() {
  local root=${RETRIEVAL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  if [[ ! -d $root/retrieval || ! -d $root/launch ]]; then
    log "error: $root is not the retrieval repo: submit from the repo root or set RETRIEVAL_ROOT"
    return 2
  fi
  echo "$root"
}

# Use the repo's .venv unless a Python environment is already active (sbatch exports the caller's env).
activate_env() {
  if [[ -z ${VIRTUAL_ENV:-} && -z ${CONDA_PREFIX:-} && -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
  fi
}

# Processes per node: NPROC_PER_NODE, else the GPUs Slurm gave this node, else the visible GPUs, else 1.
procs_per_node() {
  if [[ -n ${NPROC_PER_NODE:-} ]]; then
    echo "$NPROC_PER_NODE"
  elif [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} -gt 0 ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != "NoDevFiles" ]]; then
    awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}

# Main process address: the first host of the job (overridable with MAIN_PROCESS_IP).
main_host() {
  if [[ -n ${MAIN_PROCESS_IP:-} ]]; then
    echo "$MAIN_PROCESS_IP"
  else
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
  fi
}

# A port derived from the job id: stable across requeues of one job, different for jobs sharing a node.
main_port() { echo "${MAIN_PROCESS_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"; }

# The accelerate launch flags for this allocation (everything but --machine_rank, which is per node).
accelerate_flags() {
  local nproc=$1 profile=$2
  # shellcheck disable=SC2206  # LAUNCH_ARGS is a flag list on purpose
  local extra=(${LAUNCH_ARGS:-})
  printf '%s\n' --config_file "$profile" --num_machines "$SLURM_NNODES" \
    --num_processes "$((SLURM_NNODES * nproc))" --main_process_ip "$(main_host)" \
    --main_process_port "$(main_port)" "${extra[@]}"
}

# ---------------------------------------------------------------------------------------------
# Per node (run by srun): accelerate launch, and signal forwarding to the training processes.
#
# Signals go to the training processes (the launcher's children), never to the launcher: torchrun's
# agent dies on SIGUSR1 and answers SIGTERM by killing its workers after 30 s, before a checkpoint of a
# large model is safe. So the launcher starts with the given signals ignored, and this wrapper forwards
# them. Workers inherit the ignore until the trainer installs its own handlers.

launch_node() {
  local ignore=$1
  shift
  # shellcheck disable=SC2086  # $ignore is a signal list
  (if [[ -n $ignore ]]; then trap '' $ignore; fi && exec accelerate launch --machine_rank "${SLURM_NODEID:-0}" "$@") &
  LAUNCHER_PID=$!
  local sig
  for sig in $ignore; do
    # shellcheck disable=SC2064  # expand $sig now
    trap "forward_to_workers $sig" "$sig"
  done
  wait_for "$LAUNCHER_PID"
}

forward_to_workers() {
  local pids
  pids=$(pgrep -P "$LAUNCHER_PID" || true)
  log "forwarding SIG$1 to training processes: ${pids//$'\n'/ }"
  # shellcheck disable=SC2086
  [[ -z $pids ]] || kill -s "$1" $pids 2>/dev/null || true
}

# `wait PID` through trapped signals (a trap interrupts `wait`); returns the process's exit status.
wait_for() {
  local rc again
  while :; do
    rc=0
    wait "$1" || rc=$?
    kill -0 "$1" 2>/dev/null || break
  done
  # If a trap interrupted the last wait, bash still holds the status and a second wait returns it;
  # if that wait reaped the process, the second one answers 127 (not a child) and rc stands.
  again=0
  wait "$1" 2>/dev/null || again=$?
  [[ $again -eq 127 ]] || rc=$again
  return "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  "$@"
fi
