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


def progress(step: int, d, images_per_s: float, train_cfg) -> dict[str, Any]:
    """Where a run stands for a reader: the step it stops at this invocation, epochs, and the time left."""
    remaining = max(d.stop_at_step - step, 0) * d.global_batch  # images left in this invocation
    return {
        "total_steps": d.stop_at_step,
        "epochs": train_cfg.epochs,
        "eta_s": round(remaining / images_per_s, 1) if images_per_s > 0 else None,
    }


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def console(record: dict[str, Any]) -> str:
    """One log line; a train record leads with step/total, epoch, images/s and the ETA."""
    skip = {"kind"}
    head = ""
    if record["kind"] == "train" and "total_steps" in record:
        step, total = record["step"], record["total_steps"]
        head = (
            f"step {step}/{total} ({100 * step / max(total, 1):.0f}%) epoch {record['epoch'] + 1}/{record['epochs']} "
            f"{record['images_per_s']:.1f} img/s eta {_clock(record.get('eta_s'))} | "
        )
        skip |= {"step", "total_steps", "epoch", "epochs", "images_per_s", "eta_s"}
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k not in skip]
    return f"[{record['kind']}] " + head + " ".join(parts)
