"""``retrieval launch``: run a command on N processes through ``accelerate launch``, its one-line error last.

    retrieval launch --processes 2 train --config configs/tiny.yaml --shards shards/out --run-dir runs/tiny
    retrieval launch --profile launch/zero2.yaml --processes 8 train --config configs/sop_swinv2_base.yaml

It is ``accelerate launch [--config_file PROFILE] --num_processes N -m retrieval COMMAND ...`` on this machine
(CPU: gloo, as ``ACCELERATE_USE_CPU=1``), with one difference a user sees: when a worker stops with a clear
error (a bad config value, a missing shard), ``accelerate launch`` prints torch elastic's ``ChildFailedError``
block after it and exits 1; here the worker's line is printed again after that block, as the last line, and
the exit code is 2 as for a one-process run. Other failures keep the launcher's exit code. SIGTERM/SIGINT are
passed on to the launcher (which forwards them to the workers: they checkpoint and exit 3; the launcher then
exits 1, so a preempted run is told by ``<run>/preempted``). Multi-node and Slurm runs use
``slurm/train.sbatch``, which relays the line the same way.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from retrieval import dist


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, default=2, help="processes on this machine (default 2)")
    p.add_argument("--profile", help="accelerate config file (launch/*.yaml); default: --multi_gpu")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even where a GPU is present (auto without CUDA)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the retrieval command and its arguments")


def run(args: argparse.Namespace) -> int:
    if not args.command:
        print(
            "retrieval launch: error: expected a command after the options, e.g. `train --config ...`", file=sys.stderr
        )
        return 2
    if args.processes < 1:
        print(f"retrieval launch: error: --processes: expected >= 1, got {args.processes}", file=sys.stderr)
        return 2
    if args.profile and not Path(args.profile).is_file():
        print(f"retrieval launch: error: --profile {args.profile}: no such file", file=sys.stderr)
        return 2
    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="retrieval-launch-") as tmp:
        error_file = Path(tmp) / "error"
        cmd = dist.accelerate_command(args.processes, args.command, args.profile)
        rc = _run_forwarding_signals(cmd, dist.launch_env(cpu, RETRIEVAL_ERROR_FILE=str(error_file)))
        line = error_file.read_text().strip() if error_file.is_file() else ""
    if rc != 0 and line:
        print(line, file=sys.stderr, flush=True)  # after the launcher's ChildFailedError block: the last line
        return 2
    return rc


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher; SIGTERM/SIGINT sent to this process go on to it (it forwards them to its workers)."""
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
