"""Elastic resume: continue a run's schedule on another number of processes, by samples seen.

A checkpoint's data position is (epoch, micro-batches into that epoch) of ``world_size`` ranks. On a new world
of ``W'`` ranks (same per-rank batch and accumulation) the position is converted so that the same fraction of
the epoch's samples counts as done:

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
from dataclasses import replace

from retrieval import dist
from retrieval.config import Derived
from retrieval.errors import UserError
from retrieval.runs import TrainerState

log = logging.getLogger(__name__)


def rescale(state: TrainerState, world: int, d: Derived, grad_accum: int) -> TrainerState:
    """``state`` (written on ``state.world_size`` ranks) as a position on ``world`` ranks."""
    step = state.step_in_epoch * state.world_size // world
    step = min(step - step % grad_accum, d.steps_per_epoch)
    samples = state.samples_seen or state.global_step * state.per_rank_batch * state.world_size * grad_accum
    new = replace(
        state,
        step_in_epoch=step,
        global_step=state.epoch * d.optimizer_steps_per_epoch + step // grad_accum,
        world_size=world,
        samples_seen=samples,
    )
    log.warning(
        "elastic resume: checkpoint of %d process(es) at epoch %d, step %d in epoch (optimizer step %d) continues on "
        "%d at epoch %d, step %d/%d (optimizer step %d of %d); the rest of this epoch follows the new world's order",
        *(state.world_size, state.epoch, state.step_in_epoch, state.global_step, world),
        *(new.epoch, new.step_in_epoch, d.steps_per_epoch, new.global_step, d.total_optimizer_steps),
    )
    return new


def seek_schedule(scheduler, step: int) -> None:
    """Put a (prepared) LambdaLR at optimizer step ``step``: its lr and counter, as if it had stepped there."""
    inner = getattr(scheduler, "scheduler", scheduler)
    lrs = [base * f(step) for f, base in zip(inner.lr_lambdas, inner.base_lrs, strict=True)]
    inner.last_epoch = step
    for group, lr in zip(inner.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    inner._last_lr = lrs


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
