"""Run logging on rank 0: console lines, ``metrics.jsonl``, and the trackers through accelerate's ``log_with``.

``log.trackers`` picks any of wandb, tensorboard (event files under ``<run>/tensorboard/<project>``) and MLflow
(an SQLite store, MLflow 3's default kind, in ``<run>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` names another:
a server, or a file store ``file:DIR`` with ``MLFLOW_ALLOW_FILE_STORE=true``); every train and val record
goes to each. Environment variables the trackers document win over our defaults: ``WANDB_MODE``,
``WANDB_PROJECT``, ``WANDB_DIR``, ``WANDB_NAME``, ``WANDB_RUN_ID``, ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_RUN_ID`` (an explicit ``log.project``/``log.entity`` in the config wins
over the environment). Without ``log.trackers`` the setting before it holds for one release: wandb unless
``log.wandb=disabled``.

wandb is never imported at module import and never prompts for a login: its mode is ``log.wandb`` (``offline``
by default: files under ``<run>/wandb``, sync later with ``wandb sync``) unless ``WANDB_MODE`` is set; ``online``
is only used when asked for. At the end of a run (:func:`log_run_end`) the run page gets
a table of the final metrics (also in the run summary) and the last validation's worst failures as a table of
images and a gallery (query | wrong top-1 | best correct match), the same failures ``retrieval report`` shows.
A training run is one wandb run: its id is kept in the
run folder (``RunFolder.wandb_id``) and every resume or requeue continues it (``resume="allow"``); offline,
each invocation writes its own ``offline-run-<time>-<id>`` folder with that one id, and ``wandb sync``
uploads them all into the same run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from retrieval import dist
from retrieval.errors import require
from retrieval.run_folder import RunFolder
from retrieval.util import peak_rss_gb

log = logging.getLogger(__name__)


# what each tracker needs installed (the `trackers` extra; wandb is a core dependency)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
MLFLOW_DB = "mlflow.db"
# wandb.init keyword -> the variable that wins over it when set
WANDB_ENV = {"mode": "WANDB_MODE", "dir": "WANDB_DIR", "name": "WANDB_NAME", "id": "WANDB_RUN_ID"}


def trackers_of(log_cfg) -> list[str]:
    """accelerate's ``log_with`` for ``log`` (its packages checked: a missing one is one line naming the extra)."""
    names = ["wandb"] if log_cfg.trackers is None else list(log_cfg.trackers)
    names = [n for n in names if not (n == "wandb" and log_cfg.wandb == "disabled")]
    for name in names:
        if name in TRACKER_PACKAGES:
            require(TRACKER_PACKAGES[name], "trackers", f"log.trackers: {name}")
    return names


def project_name(log_cfg) -> str:
    return log_cfg.project or dist.env("WANDB_PROJECT") or dist.env("MLFLOW_EXPERIMENT_NAME") or "retrieval"


def wandb_init(cfg, run_dir: Path, main: bool) -> dict[str, Any]:
    """wandb.init's keywords: ours where the user's environment says nothing."""
    init = {"mode": cfg.log.wandb, "dir": str(run_dir), "name": cfg.train.name}
    if main:  # one wandb run per training run: the id is kept in the run folder, a resume or requeue continues it
        init.update(id=RunFolder(run_dir).wandb_id(), resume="allow")
    if cfg.log.entity:
        init["entity"] = cfg.log.entity
    return {k: v for k, v in init.items() if k not in WANDB_ENV or dist.env(WANDB_ENV[k]) is None}


def init_trackers(accelerator, cfg, run_dir: Path, config_dict: dict) -> None:
    names = trackers_of(cfg.log)
    if not names:
        return
    init: dict[str, dict] = {}
    if "wandb" in names:
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        init["wandb"] = wandb_init(cfg, run_dir, accelerator.is_main_process)
    if "mlflow" in names:
        init["mlflow"] = {"run_name": cfg.train.name}
        if accelerator.is_main_process:
            import mlflow

            # the user's MLFLOW_TRACKING_URI as it is; else MLflow 3's own default kind of store (an SQLite file) in
            # the run folder instead of the working directory. Set every time: the URI is global to the process.
            default = f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}"
            mlflow.set_tracking_uri(dist.env("MLFLOW_TRACKING_URI") or default)
    accelerator.init_trackers(project_name(cfg.log), init_kwargs=init)
    flat = _flat(config_dict)  # tensorboard's hparams and MLflow's params take scalars only
    for tracker in accelerator.trackers:
        tracker.store_init_configuration(config_dict if tracker.name == "wandb" else flat)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class MetricsLog:
    """Appends one record to the run's metrics log and to the trackers; only the main process writes (others
    hold a no-op).

    Every record carries ``samples`` (training images seen, all ranks), the ``world_size`` and the ``attempt``
    (1 for the fresh start, +1 per resume: ``configs/attempt-N.yaml``): ``step`` counts optimizer steps of the
    world that ran them, so an elastic resume renumbers it, while ``samples`` grows across worlds (the report's
    curves run on it, and a resume truncates the log by it)."""

    def __init__(self, accelerator, run: RunFolder):
        self.accelerator = accelerator
        self.run = run
        self.enabled = accelerator.is_main_process
        self.attempt: int | None = None  # known once the run folder is begun (the first write)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.attempt is None:
            self.attempt = max(len(self.run.attempt_configs()), 1)
        record = {**record, "world_size": self.accelerator.num_processes, "attempt": self.attempt}
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.run.append_metrics(record)
        numeric = {f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
        for tracker in self.accelerator.trackers:  # what accelerator.log does, with each tracker's names
            tracker.log(tracker_names(tracker.name, numeric), step=record.get("step"))


def tracker_names(tracker: str, values: dict[str, Any]) -> dict[str, Any]:
    """MLflow refuses ``@`` in a metric name: ``val/recall@1`` is ``val/recall_at_1`` there; others keep ours."""
    return {k.replace("@", "_at_"): v for k, v in values.items()} if tracker == "mlflow" else values


class StageClock:
    """Seconds spent in the run's extra work (validation, checkpoint, export) beside the invocation's wall time: the
    summary shows each as a share of the run, so an overhead that dominates a small run is visible."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def shares(self) -> dict[str, float]:
        """``wall_s``, and per stage its seconds and share of the wall time; training is the rest."""
        wall = max(time.perf_counter() - self.start, 1e-9)
        out = {"wall_s": round(wall, 2)}
        for stage, seconds in sorted(self.seconds.items()):
            out[f"{stage}_s"], out[f"{stage}_share"] = round(seconds, 2), round(seconds / wall, 4)
        out["train_share"] = round(1 - sum(self.seconds.values()) / wall, 4)
        return out


def costs_line(costs: dict[str, float]) -> str:
    """One log line: where this invocation's time went."""
    parts = [f"{k.removesuffix('_share')} {100 * v:.1f} %" for k, v in costs.items() if k.endswith("_share")]
    return f"time: {costs['wall_s']:.1f} s, " + ", ".join(parts)


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


# ---------------------------------------------------------------------------------------------
# The end of a run in wandb: what a user opens the run page for


def wandb_tracker(accelerator) -> Any | None:
    """The wandb run behind accelerate's tracker on this process, or None (wandb off, or not rank 0)."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "wandb":
            return tracker.tracker
    return None


def log_run_end(accelerator, run: RunFolder, summary: dict, val_set, shards: str | None, split: str) -> None:
    """wandb: the final metrics as a summary table (and in the run summary) and the report's failure gallery (the
    last validation's queries whose wrong top-1 scores highest, beside their best correct match) as a table of
    images. A no-op when wandb is off; a failure here is logged, never fatal (the model is already exported)."""
    wb_run = wandb_tracker(accelerator) if accelerator.is_main_process else None
    if wb_run is None:
        return
    try:
        import wandb

        final = {**_last_val(run), **summary}
        numbers = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        payload = {"final/metrics": wandb.Table(columns=["metric", "value"], data=[[k, v] for k, v in numbers.items()])}
        if val_set is not None and len(val_set) > 1:
            from retrieval.report.analysis import failure_gallery

            rows = failure_gallery(val_set, shards, split)
            payload["final/failures"] = _failure_table(wandb, rows)
            payload["final/failure_gallery"] = [_side_by_side(wandb, row) for row in rows]
        wb_run.log(payload)
        wb_run.summary.update({f"final/{k}": v for k, v in numbers.items()})
    except Exception as e:  # a tracker problem must not turn a finished run into a failed one
        log.warning("wandb: could not log the run's final tables (%s: %s)", type(e).__name__, e)


def _last_val(run: RunFolder) -> dict:
    vals = [r for r in run.read_metrics() if r.get("kind") == "val"]
    return {k: v for k, v in vals[-1].items() if k not in ("kind",)} if vals else {}


def _failure_table(wandb, rows: list[dict]):
    """One row per failure: the three images (stored with the table in the run's artifact) and their ids/scores."""
    columns = ["query", "wrong top-1", "best correct", "query id", "query class", "wrong id", "wrong class"]
    columns += ["wrong score", "correct id", "correct score"]
    table = wandb.Table(columns=columns)

    def image(item: dict | None):
        return (
            wandb.Image(item["image"], caption=f"{item['id']} · c{item['label']}")
            if item and item.get("image") is not None
            else None
        )

    for row in rows:
        q, w, c = row["query"], row["wrong"], row["correct"]
        table.add_data(
            image(q),
            image(w),
            image(c),
            q["id"],
            q["label"],
            w["id"],
            w["label"],
            w["score"],
            c["id"] if c else None,
            c["score"] if c else None,
        )
    return table


def _side_by_side(wandb, row: dict):
    """Query | wrong top-1 | best correct match as one image for the media panel, the ids and scores as caption."""
    from PIL import Image

    cell, gap = 96, 8  # fixed cells: every gallery image has one size (wandb warns otherwise)
    items = [row["query"], row["wrong"], row["correct"]]
    canvas = Image.new("RGB", (3 * cell + 2 * gap, cell), "white")
    for n, item in enumerate(items):
        im = (
            item["image"].copy()
            if item and item.get("image") is not None
            else Image.new("RGB", (cell, cell), (200, 200, 200))
        )
        im.thumbnail((cell, cell))
        canvas.paste(im, (n * (cell + gap) + (cell - im.width) // 2, (cell - im.height) // 2))
    q, w, c = items
    caption = f"query {q['id']} (c{q['label']}) | wrong {w['id']} (c{w['label']}) {w['score']:.3f}"
    caption += f" | correct {c['id']} {c['score']:.3f}" if c else " | no other image of its class"
    return wandb.Image(canvas, caption=caption)


def log_world(accelerator, d, data) -> None:
    """The run's batch arithmetic, once (rank 0): world, per-rank and global batch, steps per epoch and in all."""
    if accelerator.is_main_process:
        shape = (accelerator.num_processes, d.per_rank_batch, data.classes_per_batch, data.images_per_class)
        log.info(
            "world=%d per-rank batch=%d (P=%d x K=%d) global batch=%d, %d steps/epoch, %d optimizer steps",
            *(*shape, d.global_batch, d.steps_per_epoch, d.total_optimizer_steps),
        )
