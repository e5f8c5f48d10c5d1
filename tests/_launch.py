"""Start real multi-process jobs for tests: `accelerate launch` on CPU with gloo, free ports only."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from retrieval import dist
from retrieval.util import free_port

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


__all__ = ["ACCELERATE", "REPO", "accelerate_cmd", "cpu_env", "free_port", "run", "serving", "wait_healthy"]
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


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120, headers: dict | None = None) -> None:
    """Wait until `retrieval serve` in ``proc`` answers ``GET url/healthz`` (fail if it exits or takes too long)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"server exited: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"server did not answer /healthz within {timeout:.0f} s"
        try:
            if httpx.get(f"{url}/healthz", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)


@contextlib.contextmanager
def serving(
    index: Path, *options: str, env: dict[str, str] | None = None, headers: dict | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`retrieval serve --index INDEX` in a child process on a free port, healthy; stopped (SIGTERM, then SIGKILL)
    whatever the caller does. Yields (base URL, process). ``headers``: what /healthz needs (a bearer token)."""
    port = free_port()
    cmd = [sys.executable, "-m", "retrieval", "serve", "--index", str(index), "--port", str(port), *options]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, headers=headers)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
