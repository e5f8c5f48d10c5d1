"""``bench scaling``: weak scaling of the real trainer, ``accelerate launch -m retrieval train`` with 1, 2, ...
processes and the same per-rank P×K batch: gloo on CPU (``ACCELERATE_USE_CPU=1 ... --multi_gpu``), NCCL on CUDA
(up to the GPUs present). Global images/s is what each run logs in ``metrics.jsonl``; efficiency at N is
images/s(N) / (N × images/s(1)): 1.0 means the gather for global mining, the all-reduce and the lock-step are free.

On CPU every rank runs one torch thread and loads data in-process (``data.num_workers=0``), so N ranks need N cores;
with fewer cores (or other jobs) the ranks share them and the efficiency measures that too (the notes say so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from bench import common

SIZES = {"tiny": (6, 2, 1), "quick": (24, 4, 1), "full": (80, 10, 2)}  # steps, log interval, intervals skipped


def run(opts: common.Options) -> dict:
    steps, block, warm = SIZES[opts.level]
    shards = common.synthetic_shards(opts.work, "gpu" if common.cuda() else opts.level)
    path, cfg = common.experiments(opts)[-1]  # on CUDA the fast SwinV2-B recipe, else the chosen config
    gpus = torch.cuda.device_count()
    counts = [n for n in (1, 2, 4, 8) if n <= gpus] if common.cuda() else [1, 2]
    overrides = common.train_overrides(shards, steps, block) + ([] if common.cuda() else ["data.num_workers=0"])
    results = {}
    for n in counts:
        run_dir = Path(opts.work) / f"scaling-{n}proc"
        shutil.rmtree(run_dir, ignore_errors=True)
        common.launch_train(n, Path(path), run_dir, overrides, one_thread=not common.cuda())
        results[f"{n}proc"] = common.trainer_figures(run_dir, warm) | {"processes": n}
    base = results["1proc"]["median"]
    ratios = {f"efficiency {n}proc": results[f"{n}proc"]["median"] / (n * base) for n in counts if n > 1}
    cores = os.cpu_count() or 1
    where = f"NCCL, {gpus} GPU(s)" if common.cuda() else f"gloo, 1 torch thread per rank, {cores} CPU cores"
    notes = [f"{where}; load average at the end {os.getloadavg()[0]:.2f}"]
    notes += [f"{max(counts)} processes share {cores} CPU cores with the OS and any other job"] if not common.cuda() and max(counts) >= cores else []  # fmt: skip
    config = {"file": path, "model": common.label(cfg), "processes": counts, "overrides": overrides}
    return common.publish("scaling", opts, config, results, ratios, notes)
