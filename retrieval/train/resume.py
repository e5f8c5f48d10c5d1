"""Opening a run folder to train in: its lock, a fresh start or a resume, and an elastic resume on another world.

:func:`open_run` is the one entry the trainer calls before it touches the folder: it takes the folder's lock
(one trainer per run folder), resolves ``--resume``, checks the resume, converts its position when the number of
processes changed, and begins the folder (resolved config, attempt config, metrics log) on rank 0.

A resume must match the checkpoint's shape (world size, per-rank batch, accumulation: they fix the data position)
and the run's saved config. Keys that define the model, the data or the optimisation (``model.*``, ``data.*``,
``loss.*``, ``optim.*``, ``train.epochs``/``seed``/``precision``/...) are refused when they differ, listing each
one: the optimizer and the lr schedule are restored from the checkpoint (AdamW's lr, betas and weight decay
included), so a changed ``optim.lr`` would be silently ignored, and a changed model or data would silently continue
another experiment. Only keys that change how the run is executed or logged may change (:data:`MAY_CHANGE`).

Elastic resume (another number of processes, same per-rank batch and accumulation): a checkpoint's data position
is (epoch, micro-batches into that epoch) of ``world_size`` ranks. On ``W'`` ranks it is converted so that the
same fraction of the epoch's samples counts as done:

* ``step_in_epoch' = floor(step_in_epoch x W / W')``, rounded down to whole optimizer steps and capped at
  the new epoch length (an epoch of the default ``data.steps_per_epoch`` holds the same samples on any world);
* ``global_step' = epoch x optimizer_steps_per_epoch' + step_in_epoch' / grad_accum``: the new lr schedule
  (built for the new world's step count) continues at the same fraction of the run, so the lr is continuous
  (``optim.warmup_steps`` and ``train.max_steps`` are counted in the new world's optimizer steps);
* epochs, best metric and the samples-seen counter are kept; the model and optimizer state load as saved.

The data order of the rest of the interrupted epoch is the new world's (the same seeds, another split of
shards over ranks), so a few samples of that epoch may be seen twice or not at all; later epochs are the new
world's own. Not bitwise equal to an uninterrupted run, never a crash or a silent restart. The same world
still resumes bitwise. Not for DeepSpeed ZeRO checkpoints, which are sharded by rank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from retrieval import dist
from retrieval.config.io import to_dict
from retrieval.config.schema import Config, Derived
from retrieval.errors import UserError
from retrieval.run_folder import RunFolder, TrainerState
from retrieval.train.checkpoint import check_loadable

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
    "data.val_cache_mb",
    "data.shard_cache_mb",
    "data.allow_listed_commands",
    "model.compile",
    "model.grad_checkpointing",
    "model.channels_last",
    "eval.backend",
    "eval.chunk",
    "eval.dtype",
    "log.",
)


@dataclass
class Opened:
    """Where a trainer starts: a fresh state, or a checkpoint's (converted when the world changed)."""

    state: TrainerState
    checkpoint: Path | None = None  # None: a fresh run
    elastic: bool = False  # the checkpoint was written by another number of processes


def open_run(run: RunFolder, accelerator, resume: str | None, cfg: Config, shape: dict[str, int], d: Derived) -> Opened:
    """Lock the folder, check what we resume (before writing anything), then begin the folder on rank 0.

    ``resume``: None (a fresh run), ``auto`` (latest checkpoint if any), ``latest``, or a checkpoint folder;
    ``shape``: this run's world size, per-rank batch and accumulation. A start that fails into a folder it
    created removes that folder again (no run folder holding only ``.lock``)."""
    created = not run.path.exists()
    lock_run(run, accelerator)
    try:
        opened, saved = _start_point(run, resume, cfg, shape, d)
    except UserError:
        if created and accelerator.is_main_process:
            run.discard_if_only_lock()
        raise
    if accelerator.is_main_process:  # the log's numbering is the checkpoint's (an elastic resume renumbers steps)
        run.begin(cfg, fresh=opened.checkpoint is None, resumed=saved)
    accelerator.wait_for_everyone()
    return opened


def _start_point(
    run: RunFolder, resume: str | None, cfg: Config, shape: dict[str, int], d: Derived
) -> tuple[Opened, TrainerState | None]:
    """Where this start begins (and the checkpoint's saved state), every check done, nothing written."""
    start = run.resolve_resume(resume)
    if start is None and run.has_checkpoints():
        raise UserError(
            f"{run.path} already holds a run (it has a 'latest' checkpoint): pass --resume auto to "
            "continue it, or choose a new --run-dir"
        )
    saved = TrainerState.load(start) if start is not None else None
    if start is not None:
        check_loadable(start)  # before anything unpickles it: data only, never code (README "Trust model")
    saved_cfg = run.read_config() if start is not None and RunFolder.is_run(run.path) else None
    opened = Opened(TrainerState(**shape))
    if saved is not None:
        check_config(saved_cfg, cfg, run.config_path)
        state, elastic = adapt(saved, shape, start, d, cfg.optim.grad_accum)
        opened = Opened(state, start, elastic)
    return opened, saved


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


def check_config(saved: Config | None, cfg: Config, where: Path) -> None:
    """Refuse a resume whose config differs from the run's saved one (``where``) in a key that may not change
    (its world and batch shape are :func:`adapt`'s to check: another number of processes is an elastic resume)."""
    changed = config_changes(saved, cfg) if saved is not None else []
    if changed:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
        raise UserError(
            f"--resume: this config differs from the run's ({where}) in keys a resume cannot change: "
            f"{listed}. Resume with the run's config (only {', '.join(MAY_CHANGE)} may change), or start a new "
            "--run-dir"
        )


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


# ---------------------------------------------------------------------------------------------------- elastic


def rescale(state: TrainerState, world: int, d: Derived, grad_accum: int) -> TrainerState:
    """``state`` (written on ``state.world_size`` ranks) as a position on ``world`` ranks."""
    step = state.step_in_epoch * state.world_size // world
    step = min(step - step % grad_accum, d.steps_per_epoch)
    samples = state.samples_seen or state.global_step * state.per_rank_batch * state.world_size * grad_accum
    global_step = state.epoch * d.optimizer_steps_per_epoch + step // grad_accum
    new = replace(
        state,
        step_in_epoch=step,
        global_step=global_step,
        world_size=world,
        samples_seen=samples,
        # the checkpoint's own validation keeps naming it in the new numbering (a stop there is not validated twice)
        last_step=global_step if state.last_step == state.global_step else None,
    )
    log.warning(
        "elastic resume: checkpoint of %d process(es) at epoch %d, step %d in epoch (optimizer step %d) continues on "
        "%d at epoch %d, step %d/%d (optimizer step %d of %d); the rest of this epoch follows the new world's order",
        *(state.world_size, state.epoch, state.step_in_epoch, state.global_step, world),
        *(new.epoch, new.step_in_epoch, d.steps_per_epoch, new.global_step, d.total_optimizer_steps),
    )
    return new


def adapt(state: TrainerState, shape: dict[str, int], start, d: Derived, grad_accum: int) -> tuple[TrainerState, bool]:
    """The checkpoint's state for this world: as saved when ``shape`` (world, per-rank batch, accumulation) matches,
    converted when only the number of processes differs (an elastic resume: True), refused otherwise."""
    saved = {k: getattr(state, k) for k in shape}
    if saved == shape:
        return state, False
    same_batch = {k: v for k, v in saved.items() if k != "world_size"} == {
        k: v for k, v in shape.items() if k != "world_size"
    }
    if not same_batch or dist.uses_deepspeed():
        raise UserError(
            f"checkpoint {start} was written with {saved}; this run has {shape}: resume with the same batch and "
            "accumulation (DeepSpeed: also the same number of processes), or start a new --run-dir"
        )
    return rescale(state, shape["world_size"], d, grad_accum), True
