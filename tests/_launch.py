"""Start real multi-process jobs for tests: `accelerate launch` on CPU with gloo, free ports only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from retrieval import dist
from retrieval.util import free_port

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


__all__ = ["ACCELERATE", "REPO", "accelerate_cmd", "cpu_env", "free_port", "run"]
accelerate_cmd = dist.accelerate_command  # the product's one launcher builder


def cpu_env(**extra: str) -> dict[str, str]:
    """The launcher's CPU environment (gloo, one thread per process) with the tests' isolation on top."""
    return dist.launch_env(
        cpu=True,
        WANDB_MODE="disabled",
        PYTHONPATH=str(REPO),
        TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache" / "torch_extensions"),
        **extra,
    )


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600, cwd: Path = REPO):
    proc = subprocess.run(cmd, env=env or cpu_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc
