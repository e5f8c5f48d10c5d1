"""Start real multi-process jobs for tests: `accelerate launch` on CPU with gloo, free ports only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        PYTHONPATH=str(REPO),
        TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache" / "torch_extensions"),
    )
    env.update(extra)
    return env


def accelerate_cmd(
    nproc: int, module_args: list[str], config_file: str | None = None, extra: list[str] | None = None
) -> list[str]:
    cmd = [ACCELERATE, "launch"]
    if config_file:
        cmd += ["--config_file", config_file]
    else:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(nproc), "--num_machines", "1", "--main_process_port", str(free_port())]
    cmd += list(extra or []) + ["-m", "retrieval", *module_args]
    return cmd


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600, cwd: Path = REPO):
    proc = subprocess.run(cmd, env=env or cpu_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc
