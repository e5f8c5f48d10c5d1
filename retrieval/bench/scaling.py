"""``retrieval bench scaling``: weak scaling of the real trainer over processes.

The trainer (``-m retrieval train``) is started with ``accelerate launch`` for N = 1, 2, … processes with
the same per-rank P×K batch: gloo on CPU (``ACCELERATE_USE_CPU=1 … --multi_gpu``), NCCL on CUDA (N up to
the GPUs present). Global images/s comes from each run's ``metrics.jsonl`` (log intervals after warm-up).
Weak-scaling efficiency = images/s at N / (N × images/s at 1); 1.0 means the gather for global mining,
the gradient all-reduce and the lock-step cost nothing.

On CPU every rank runs one torch thread with in-process data loading (``data.num_workers=0``), so N ranks
need N cores: on a machine with fewer cores than ranks (or other jobs running) the processes share cores
and the efficiency measures that sharing too. The output says how many cores there were.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from retrieval import dist
from retrieval.bench import common
from retrieval.bench.train import _workdir, case_label, cases, trainer_stats
from retrieval.config_io import save_config, to_dict

log = logging.getLogger(__name__)

# (trainer steps, steps per log interval, intervals skipped as warm-up)
SIZES = {"tiny": (6, 2, 1), "quick": (24, 4, 1), "full": (80, 10, 2)}
TIMEOUT_S = 900


def run_bench(
    quick: bool,
    out_dir: Path,
    *,
    tiny: bool = False,
    config: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    work: Path | None = None,
) -> dict[str, Any]:
    """Run the trainer at each process count, write ``out_dir/bench-scaling.json`` (+ PNG), return the payload."""
    import torch

    level = common.level_of(quick, tiny)
    cuda = torch.cuda.is_available()
    device = common.default_device()
    counts = process_counts(cuda)
    steps, block, warm = SIZES[level]
    cfg, source = cases(config, overrides, cuda)[0]
    label = case_label(cfg)
    notes = [scaling_note(cuda, counts)]
    results: dict[str, Any] = {}
    with _workdir(work) as wd:
        shards = common.synthetic_shards(wd, "gpu" if cuda else level, 256 if cuda else None)
        cfg_file = wd / f"scaling-{cfg.train.name}.yaml"
        save_config(cfg, cfg_file)
        for n in counts:
            run_dir = wd / f"scaling-{label}-{n}proc"
            launch(n, cfg_file, shards, run_dir, steps, block, cuda, dist.resolve_precision(cfg.train.precision, cuda))
            results[f"{n}proc"] = {**trainer_stats(run_dir / "metrics.jsonl", warm), "processes": n}
    ratios = efficiencies(results)
    if len(counts) == 1:
        notes.append("one GPU only: no efficiency to report")
    plot = plot_scaling(out_dir, label, results)
    cfg_info = {
        "file": source,
        "model": label,
        "per_rank_batch": cfg.data.classes_per_batch * cfg.data.images_per_class,
        "resolved": to_dict(cfg),
        "cpu_overrides": [] if cuda else ["data.num_workers=0", "OMP_NUM_THREADS=1"],
    }
    payload = common.envelope(
        "scaling",
        level,
        device,
        cfg_info,
        results,
        ratios,
        notes,
        sizes={"steps": steps, "block": block, "warmup_blocks": warm, "processes": counts},
        plots=[str(plot)] if plot else [],
    )
    return common.publish(out_dir, payload)


def process_counts(cuda: bool) -> list[int]:
    if not cuda:
        return [1, 2]
    import torch

    gpus = torch.cuda.device_count()
    return [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= gpus]


def scaling_note(cuda: bool, counts: list[int]) -> str:
    if cuda:
        return f"NCCL, {counts[-1]} GPU(s) present; one process per GPU"
    cores = os.cpu_count() or 1
    load = common.load_average()
    shared = (
        (
            f"{max(counts)} processes share {cores} CPU cores with the OS and any other job "
            f"(load average at start {load})"
        )
        if max(counts) >= cores
        else f"{cores} CPU cores"
    )
    return f"gloo on CPU, 1 torch thread and in-process data loading per rank: {shared}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    n: int, cfg_file: Path, shards: Path, run_dir: Path, steps: int, block: int, cuda: bool, precision: str
) -> list[str]:
    """``accelerate launch`` of ``retrieval train`` with N processes; ``env`` sets the child's variables so
    that this library code reads none."""
    env = ["env", "WANDB_MODE=disabled", "HF_HUB_OFFLINE=1"]
    if not cuda:
        env += ["ACCELERATE_USE_CPU=1", "OMP_NUM_THREADS=1"]
    cmd = [
        *env,
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        precision,
        "--dynamo_backend",
        "no",
    ]
    if n > 1:
        cmd.append("--multi_gpu")
    overrides = [
        f"data.shards={shards}",
        "train.epochs=1",
        f"data.steps_per_epoch={steps}",
        f"train.log_every={block}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.max_steps=null",
        "log.wandb=disabled",
    ]
    if not cuda:
        overrides.append("data.num_workers=0")
    return [*cmd, "-m", "retrieval", "train", "--config", str(cfg_file), "--run-dir", str(run_dir), *overrides]


def launch(
    n: int, cfg_file: Path, shards: Path, run_dir: Path, steps: int, block: int, cuda: bool, precision: str
) -> None:
    cmd = launch_command(n, cfg_file, shards, run_dir, steps, block, cuda, precision)
    log.info("scaling: %d process(es): %s", n, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(
            f"trainer with {n} process(es) failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}"
        )


def efficiencies(results: dict[str, Any]) -> dict[str, float]:
    """Weak-scaling efficiency of every N > 1 against N = 1, on median images/s."""
    base = results.get("1proc", {}).get("median")
    out = {}
    for res in results.values():
        n = res["processes"]
        if n > 1 and base:
            out[f"efficiency {n}proc"] = res["median"] / (n * base)
    return out


def plot_scaling(out_dir: Path, label: str, results: dict[str, Any]) -> Path | None:
    ns = [r["processes"] for r in results.values()]
    measured = [r["median"] for r in results.values()]
    base = measured[0] if ns and ns[0] == 1 else None
    series = {"measured": (ns, measured)}
    if base:
        series["ideal (N x 1 process)"] = (ns, [n * base for n in ns])
    return common.plot_curves(
        Path(out_dir) / "bench-scaling.png", f"weak scaling, {label}", "processes", "images/s (global)", series
    )
