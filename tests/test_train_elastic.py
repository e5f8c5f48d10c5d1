"""Elastic resume arithmetic: a position on one world as a position on another, by samples seen."""

from __future__ import annotations

import torch

from retrieval.config.schema import Derived
from retrieval.run_folder import TrainerState
from retrieval.train.optim import lr_lambda, seek_schedule
from retrieval.train.resume import rescale


def test_rescale_keeps_the_fraction_of_epoch_and_run():
    state = TrainerState(epoch=1, step_in_epoch=3, global_step=9, world_size=2, per_rank_batch=16, last_step=9)
    on_one = rescale(state, 1, Derived(16, 16, 12, 12, 24, 24), 1)  # 1 process: epochs of 12 steps
    assert (on_one.epoch, on_one.step_in_epoch, on_one.global_step, on_one.world_size) == (1, 6, 18, 1)
    assert on_one.last_step == 18  # validated at the checkpoint: named in the new numbering, not validated again
    assert on_one.samples_seen == 9 * 32
    back = rescale(on_one, 4, Derived(16, 128, 3, 1, 6, 6), 2)  # 4 processes, grad_accum 2: whole optimizer steps
    assert (back.step_in_epoch, back.global_step) == (0, 1)


def test_seek_schedule_sets_the_lr_of_the_new_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, 0, 0.0))
    seek_schedule(sched, 50)
    assert sched.last_epoch == 50 and abs(opt.param_groups[0]["lr"] - 0.5) < 1e-9
    sched.step()
    assert abs(sched.get_last_lr()[0] - lr_lambda(100, 0, 0.0)(51)) < 1e-12
