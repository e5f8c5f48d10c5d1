"""What a trainer checks before it touches a run folder: the folder's lock, and that a resume continues the same run.

A resume must match the checkpoint's shape (world size, per-rank batch, accumulation: they fix the data position)
and the run's saved config. Keys that define the model, the data or the optimisation (``model.*``, ``data.*``,
``loss.*``, ``optim.*``, ``train.epochs``/``seed``/``precision``/...) are refused when they differ, listing each
one: the optimizer and the lr schedule are restored from the checkpoint (AdamW's lr, betas and weight decay
included), so a changed ``optim.lr`` would be silently ignored, and a changed model or data would silently continue
another experiment. Only keys that change how the run is executed or logged may change (:data:`MAY_CHANGE`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from retrieval import dist
from retrieval.config import Config
from retrieval.config_io import to_dict
from retrieval.errors import UserError
from retrieval.runs import RunFolder, TrainerState

log = logging.getLogger(__name__)

# dotted keys (or sections ending in ".") a resume may change: budgets, logging, checkpoint cadence, execution
MAY_CHANGE = (
    "train.name",
    "train.max_steps",
    "train.max_minutes",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.early_stop_patience",
    "train.deterministic",
    "data.num_workers",
    "data.eval_batch_size",
    "model.compile",
    "model.grad_checkpointing",
    "model.channels_last",
    "eval.backend",
    "eval.chunk",
    "eval.dtype",
    "log.",
)


def lock_run(run: RunFolder, accelerator) -> None:
    """One trainer per run folder: rank 0 takes the folder's lock; every rank fails together if it is held."""
    problem = None
    if accelerator.is_main_process:
        try:
            run.lock()
        except UserError as e:
            problem = str(e)
    problem = dist.broadcast_object(problem)  # no rank is left waiting at a barrier
    if problem:
        raise UserError(problem)


def check_resumable(run: RunFolder, start: Path, cfg: Config) -> TrainerState:
    """The checkpoint's state, once the run's saved config agrees with this invocation (its world and batch shape
    are the trainer's to check: another number of processes is an elastic resume)."""
    state = TrainerState.load(start)
    if RunFolder.is_run(run.path):
        changed = config_changes(run.read_config(), cfg)
        if changed:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
            raise UserError(
                f"--resume: this config differs from the run's ({run.config_path}) in keys a resume cannot change: "
                f"{listed}. Resume with the run's config (only {', '.join(MAY_CHANGE)} may change), or start a new "
                "--run-dir"
            )
    return state


def config_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` of every value that differs and may not change on a resume."""
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k) and not _may_change(k)]


def _may_change(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fault_point(point: str) -> None:
    """Test hook: ``RETRIEVAL_FAULT=<point>`` makes rank 0 die right there (``os._exit``: no cleanup, as a kill)."""
    if dist.env("RETRIEVAL_FAULT") == point and dist.is_main():
        log.warning("RETRIEVAL_FAULT=%s: rank 0 exits now", point)
        os._exit(137)
