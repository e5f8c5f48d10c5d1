"""Run logging on rank 0: console lines, ``metrics.jsonl``, and wandb through accelerate's trackers.

wandb is never imported at module import and never prompts for a login: ``log.wandb`` is
``offline`` by default (files under ``<run>/wandb``, sync later with ``wandb sync``), ``disabled`` turns
it off, and ``online`` is only used when asked for. A training run is one wandb run: its id is kept in the
run folder (``RunFolder.wandb_id``) and every resume or requeue continues it (``resume="allow"``); offline,
each invocation writes its own ``offline-run-<time>-<id>`` folder with that one id, and ``wandb sync``
uploads them all into the same run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from retrieval.runs import RunFolder
from retrieval.util import peak_rss_gb

log = logging.getLogger(__name__)


def tracker_for(mode: str) -> str | None:
    return None if mode == "disabled" else "wandb"


def init_trackers(accelerator, cfg, run_dir: Path, config_dict: dict) -> None:
    if tracker_for(cfg.log.wandb) is None:
        return
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    init = {"mode": cfg.log.wandb, "dir": str(run_dir), "name": cfg.train.name}
    if accelerator.is_main_process:  # trackers live on the main process only
        # one wandb run per training run: the id is kept in the run folder, a resume or requeue continues it
        init.update(id=RunFolder(run_dir).wandb_id(), resume="allow")
    if cfg.log.entity:
        init["entity"] = cfg.log.entity
    accelerator.init_trackers(cfg.log.project, config=config_dict, init_kwargs={"wandb": init})


class MetricsLog:
    """Appends one record to the run's metrics log and to the trackers; only the main process writes (others
    hold a no-op)."""

    def __init__(self, accelerator, run: RunFolder):
        self.accelerator = accelerator
        self.run = run
        self.enabled = accelerator.is_main_process

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.run.append_metrics(record)
        numeric = {f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
        self.accelerator.log(numeric, step=record.get("step"))


class Throughput:
    """Images/s, data-wait fraction and peak memory over one log interval."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.wait = 0.0

    def add(self, images: int, wait_s: float) -> None:
        self.images += images
        self.wait += wait_s

    def summary(self, world: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.images / elapsed
        return {
            "images_per_s": rate,
            "images_per_s_per_gpu": rate / world,
            "data_wait": self.wait / elapsed,
            "peak_mem_gb": peak_memory_gb(self.device),
        }


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gb()


def console(record: dict[str, Any]) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "kind"]
    return f"[{record['kind']}] " + " ".join(parts)
