"""The training loop: fine-tune a timm backbone for retrieval with a metric-learning loss over the global batch.

``train(cfg, run_dir, resume)`` is the entry every rank calls; the command that launches it (and its launch
recipes: one CPU, one GPU, DDP, DeepSpeed, multi-node, Slurm) is :mod:`retrieval.cli.train`. The
:class:`Trainer` receives an Accelerator built by :func:`retrieval.dist.make_accelerator`; it does not build
the world itself.

Epochs are a fixed number of P x K batches per rank, so every rank runs the same number of steps.
On SIGUSR1/SIGTERM the trainer runs on to its next log step (``train.log_every``), checkpoints, marks the run
folder preempted and returns ``{"preempted": True, ...}`` (the command exits 3; ``--resume auto`` continues at the
same position in the data stream). What goes where in the run folder is :class:`retrieval.run_folder.RunFolder`'s business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from retrieval import dist
from retrieval.config.io import to_dict
from retrieval.config.schema import Config
from retrieval.data.loader import EpochSpan, Reader, train_loader
from retrieval.errors import UserError
from retrieval.model.files import export_model
from retrieval.run_folder import RunFolder, TrainerState
from retrieval.train import log as runlog
from retrieval.train import select
from retrieval.train.build import TrainParts, prepare
from retrieval.train.ema import RunWeights
from retrieval.train.guard import FiniteGuard, param_checksum
from retrieval.train.optim import seek_schedule
from retrieval.train.resume import fault_point, open_run
from retrieval.train.skips import SkipTally
from retrieval.train.stop import StopFlag
from retrieval.train.validation import Validation

log = logging.getLogger(__name__)

AHEAD_STEPS = 32  # steps before an epoch's end at which the next epoch's loader starts (_start_next_epoch)


def train(cfg: Config, run_dir: str | Path, resume: str | None = None) -> dict:
    """Train, validate, checkpoint; returns the run's summary dict. Every rank calls it.

    ``resume``: None (a fresh run), ``auto`` (latest checkpoint if any), ``latest``, or a checkpoint folder.
    """
    stop = StopFlag(cfg.train.max_minutes)  # before setup: a preemption signal during start-up must not be lost
    try:
        return Trainer.create(cfg, RunFolder(run_dir), stop).fit(resume)
    finally:
        stop.restore()


class Trainer:
    """Everything one training run holds: the prepared model, loss, optimizer and schedule, the input spec, the
    batch arithmetic (``derived``), the resumable ``state``, the run folder, the metrics log and the stop flag."""

    def __init__(
        self, cfg: Config, run: RunFolder, parts: TrainParts, stop: StopFlag, clock: runlog.StageClock | None = None
    ) -> None:
        self.cfg, self.run, self.stop = cfg, run, stop
        self.accelerator, self.model, self.criterion = parts.accelerator, parts.model, parts.criterion
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.spec, self.derived, self.states = parts.spec, parts.derived, parts.states
        self.state = TrainerState(**self._shape())
        self.weights = RunWeights(cfg.train, self.accelerator, self.model, self.states)  # validated, exported
        self.mlog = runlog.MetricsLog(self.accelerator, run)
        self.guard = FiniteGuard(self.accelerator.device)
        self.skips = SkipTally(cfg.data.max_skipped_fraction, cfg.data.shards)
        self.validation = Validation(cfg, self.accelerator, self.spec, self.mlog)
        self.clock = clock or runlog.StageClock()  # start-up, validation, checkpoint, export: their share of the run
        self._ahead: tuple[int, Iterator[dict]] | None = None  # the next epoch's batches (_start_next_epoch)

    @classmethod
    def create(cls, cfg: Config, run: RunFolder, stop: StopFlag) -> Trainer:
        """Check the shards, build the accelerator, model, optimizer and schedule, and prepare them."""
        clock = runlog.StageClock()
        with clock("startup"):
            parts = prepare(cfg, run)
        return cls(cfg, run, parts, stop, clock)

    # ------------------------------------------------------------------------------------------ the run

    def fit(self, resume: str | None = None) -> dict:
        """Epochs until done, early-stopped, capped (train.max_steps / max_minutes) or preempted; the summary."""
        try:
            self._start(resume)
            preempted = self._epochs()
            self._ahead = None  # an epoch started ahead and not run (early stop, preemption): its workers go now
            summary = self._finish(preempted)
        finally:
            self.run.unlock()
        runlog.log_run_end(
            self.accelerator, self.run, summary, self.validation.last, self.cfg.data.shards, self.cfg.data.val_split
        )
        self.accelerator.end_training()
        return summary

    def _shape(self) -> dict[str, int]:
        """What a checkpoint's data position and schedule depend on: a resume must match it."""
        return {
            "world_size": self.accelerator.num_processes,
            "per_rank_batch": self.derived.per_rank_batch,
            "grad_accum": self.cfg.optim.grad_accum,
        }

    def _start(self, resume: str | None) -> None:
        """Open the run folder (lock, fresh start or resume: :func:`~retrieval.train.resume.open_run`), the trackers,
        the checkpoint's state; repair a best export a kill left behind."""
        acc = self.accelerator
        opened = open_run(self.run, acc, resume, self.cfg, self._shape(), self.derived)
        self.state = opened.state
        runlog.init_trackers(acc, self.cfg, self.run.path, to_dict(self.cfg))
        if opened.checkpoint is not None:
            acc.load_state(str(opened.checkpoint))  # open_run checked that it unpickles nothing but data
            self.states.load(opened.checkpoint)
            if opened.elastic:  # the lr schedule of the new world, at the converted step
                seek_schedule(self.scheduler, self.state.global_step)
            if acc.is_main_process:  # one line, not one per rank
                log.info(
                    "resumed from %s at epoch %d, step %d", opened.checkpoint, self.state.epoch, self.state.global_step
                )
            self._repair_best(opened.checkpoint)
        runlog.log_world(self.accelerator, self.derived, self.cfg.data)

    def _repair_best(self, start: Path) -> None:
        """The checkpoint recording a new best is written before the best export and the ``best`` pointer: after a
        kill in between, ``best`` lags behind the state. Resumed from that very checkpoint, the weights in hand are
        the best ones: export them and point ``best`` at it, before anything else happens."""
        best_step = self.state.best_step
        stale = False
        if self.accelerator.is_main_process and best_step is not None and start.name == f"step_{best_step}":
            stale = self.run.best() != start or not self.run.has_model("best")
        if dist.broadcast_object(stale):
            if self.accelerator.is_main_process:
                log.warning("best export of step %s was interrupted: writing it again from %s", best_step, start)
            self._export("best")
            if self.accelerator.is_main_process:
                self.run.mark_best(start)
            self.accelerator.wait_for_everyone()

    def _epochs(self) -> bool:
        """Run epochs from the saved position; True if preempted."""
        cfg, state, d = self.cfg, self.state, self.derived
        while state.epoch < cfg.train.epochs and state.global_step < d.stop_at_step:
            outcome = self._epoch()
            if outcome == "preempted":
                return True
            if outcome == "capped":  # max_steps / max_minutes reached mid-epoch: keep the data position for a resume
                improved = self._validate() if self._validates_at_stop() else False
                ckpt = self._checkpoint()
                if improved:
                    self._mark_best(ckpt)
                return False
            state.epoch += 1
            state.step_in_epoch = 0
            done = state.epoch >= cfg.train.epochs or state.global_step >= d.stop_at_step
            evaluate_now = cfg.train.eval_every and (state.epoch % cfg.train.eval_every == 0 or done)
            improved = self._validate() if evaluate_now else False
            ckpt = self._checkpoint()
            if improved:
                self._mark_best(ckpt)
            if self._early_stop():
                log.info("early stopping: %d evaluations without improvement", state.evals_since_best)
                break
        return False

    def _epoch(self) -> str:
        """One epoch from the saved position: returns "done", "capped" (max_steps / max_minutes) or "preempted"."""
        cfg, state, d, acc = self.cfg, self.state, self.derived, self.accelerator
        batches = self._batches(state.epoch, state.step_in_epoch)
        meter = runlog.Throughput(acc.device)
        self.model.train()
        while state.step_in_epoch < d.steps_per_epoch:
            if state.global_step >= d.stop_at_step:
                return "capped"
            t0 = time.perf_counter()
            batch = next(batches)
            self.skips.add(int(batch.get("skipped", 0)), d.per_rank_batch)
            meter.add(d.per_rank_batch * acc.num_processes, time.perf_counter() - t0)
            loss, stats = self._step(batch)
            state.step_in_epoch += 1
            self._start_next_epoch()
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            state.samples_seen += d.global_batch
            logs = self._logs_at(state.global_step)
            if logs:
                self._log_train(loss, stats, meter)
            # the stop flag is agreed at log steps only: its all-reduce and host read would otherwise stall a GPU
            # every step; the step it stops at stays the same on every rank (keep log_every x step time well under
            # the preemption signal's lead: 120 s in slurm/train.sbatch)
            if logs and self.stop.agreed(acc):
                if self.stop.reason == "time":
                    log.info(
                        "train.max_minutes=%s spent at step %d: stopping", cfg.train.max_minutes, state.global_step
                    )
                    return "capped"
                self._checkpoint()
                return "preempted"
            at_boundary = state.step_in_epoch >= d.steps_per_epoch or state.global_step >= d.stop_at_step
            if cfg.train.checkpoint_every and state.global_step % cfg.train.checkpoint_every == 0 and not at_boundary:
                self._checkpoint()  # boundaries save once, in _epochs
        return "done"

    def _batches(self, epoch: int, start: int) -> Iterator[dict]:
        """``epoch``'s batches from step ``start``: those started ahead if they are these, else a new loader's."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch and start == 0:
            return ahead[1]
        span = EpochSpan(epoch, self.derived.steps_per_epoch, start)
        acc = self.accelerator
        return iter(
            train_loader(
                self.cfg.data.shards, self.cfg.data, self.spec, span, Reader(acc.process_index, acc.num_processes)
            )
        )

    def _start_next_epoch(self) -> None:
        """AHEAD_STEPS before an epoch's end, when the run goes on to the next one, start that epoch's loader: its
        workers fork, fill their pools and prefetch while this epoch ends, validates and checkpoints. The batches
        are a function of (seed, epoch, rank, workers), so starting them early changes none. Why: each new epoch's
        first batch used to wait 0.1-0.35 s for its workers on the demo (data wait 13-28 % of that log window)."""
        state, d = self.state, self.derived
        left = d.steps_per_epoch - state.step_in_epoch
        if left != min(AHEAD_STEPS, d.steps_per_epoch - 1) or state.epoch + 1 >= self.cfg.train.epochs:
            return
        if state.global_step + 1 + left >= d.stop_at_step:  # capped by then (micro-batches >= optimizer steps)
            return
        self._ahead = (state.epoch + 1, self._batches(state.epoch + 1, 0))

    def _validates_at_stop(self) -> bool:
        """A run capped mid-epoch (train.max_steps / max_minutes) validates its last step, unless validation is off
        or this step was validated already (a resume capped where it started); the reason is logged either way."""
        if not self.cfg.train.eval_every:
            if self.accelerator.is_main_process:
                log.info("stopped at step %d: no validation (train.eval_every=0)", self.state.global_step)
            return False
        return self.state.last_step != self.state.global_step

    def _logs_at(self, global_step: int) -> bool:
        """Whether optimizer step ``global_step`` is logged (and so needs the loss statistics)."""
        return global_step % self.cfg.train.log_every == 0

    def _step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """One micro-batch: forward, loss over the gathered batch, backward; an optimizer step when it completes one."""
        cfg, acc = self.cfg, self.accelerator
        images = batch["image"].to(acc.device, non_blocking=True)
        labels = batch["label"].to(acc.device, non_blocking=True)
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with acc.accumulate(self.model):
            embeddings = self.model(images)
            log_now = self._logs_at(self.state.global_step + 1)  # the step this batch completes; stats sync the host
            loss, stats = self.criterion(embeddings.float(), labels, step=self.state.global_step, with_stats=log_now)
            acc.backward(loss)
            norm = self._grad_norm() if acc.sync_gradients else None
            self.guard.observe(self.state.global_step + 1, loss, norm)  # on the device: no host sync
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
                self.weights.update(self.state.global_step + 1)
            self.optimizer.zero_grad(set_to_none=True)
        return loss, stats

    def _grad_norm(self) -> torch.Tensor | None:
        """Clip to optim.grad_clip (returns the norm before clipping); without clipping, just the norm."""
        if dist.uses_deepspeed():  # DeepSpeed clips inside its step (gradient_clipping) and keeps the norm itself
            return None
        clip = self.cfg.optim.grad_clip
        if clip is not None:
            return self.accelerator.clip_grad_norm_(self.model.parameters(), clip)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else None

    def _check_finite(self, before: str, weights: bool = False) -> None:
        """Stop every rank with a clear error if any step so far was non-finite (collective; syncs the host)."""
        latest = self.run.latest()
        last_good = str(latest.relative_to(self.run.path)) if latest is not None else None
        self.guard.check(self.state.global_step, before, self.weights.all() if weights else None, last_good)

    def _log_train(self, loss: torch.Tensor, stats: dict, meter: runlog.Throughput) -> None:
        acc = self.accelerator
        self._check_finite("logging")
        record = {
            "kind": "train",
            "step": self.state.global_step,
            "epoch": self.state.epoch,
            "samples": self.state.samples_seen,
            "loss": acc.reduce(loss.detach(), "mean").item() / acc.num_processes,  # undo the x world factor
            "lr": self.scheduler.get_last_lr()[0],
            "active_fraction": float(stats["active_fraction"]),
            "skipped": self.skips.flush(self.state, acc.device),
            **meter.summary(acc.num_processes),
        }
        record.update(runlog.progress(self.state.global_step, self.derived, record["images_per_s"], self.cfg.train))
        self.mlog.write(record)
        if acc.is_main_process:
            log.info(runlog.console(record))
        meter.reset()

    def _checkpoint(self) -> Path:
        self._check_finite("a checkpoint", weights=True)
        needed = (2 + len(self.weights.all())) * self._weight_bytes() + 2**20  # weights (+ EMA), AdamW's 2 moments
        with self.clock("checkpoint"):
            ckpt = self.run.save_checkpoint(
                self.accelerator, self.state, self.cfg.train.keep_checkpoints, needed, self.states.save
            )
        fault_point("after_checkpoint")
        return ckpt

    # --------------------------------------------------------------------- validation, selection, export

    def _validate(self) -> bool:
        """Embed the val split rank-sharded, score it on rank 0; returns True (on every rank) if it improved."""
        self._check_finite("validation", weights=True)
        with self.clock("validation"):
            improved = self.validation.run(self.weights.module(), self.state)
        self.model.train()
        return improved

    def _mark_best(self, ckpt: Path) -> None:
        """Export, then point ``best`` at the checkpoint: the pointer is the sign that the export is complete."""
        self._export("best")
        if self.accelerator.is_main_process:
            self.run.mark_best(ckpt)
        self.accelerator.wait_for_everyone()

    def _early_stop(self) -> bool:
        patience = self.cfg.train.early_stop_patience
        return bool(patience) and self.state.evals_since_best >= patience

    def _weight_bytes(self) -> int:
        return sum(p.numel() * 4 for p in self.model.parameters())

    def _export(self, which: str = "best") -> None:
        """Write model.safetensors + model.yaml (loadable without DeepSpeed); collective for ZeRO gathers."""
        acc = self.accelerator
        self._check_finite(f"the {which} export", weights=True)
        with self.clock("export"):
            state_dict = self.weights.state_dict()  # consolidates DeepSpeed shards where needed
            if acc.is_main_process:
                folder, needed = self.run.model_dir(which), self._weight_bytes() + 2**20
                problem = self.run.space_problem(folder, needed)
                if problem:
                    raise UserError(problem)
                with self.run.writing(folder, needed):
                    export_model(self.weights.module(), self.cfg.model, folder, state_dict, self.spec)
            acc.wait_for_everyone()

    def _finish(self, preempted: bool) -> dict:
        acc, state = self.accelerator, self.state
        agree = dist.all_equal([param_checksum(m) for m in self.weights.all()])
        self.skips.flush(state, acc.device)
        summary = {
            "preempted": preempted,
            "global_step": state.global_step,
            "epoch": state.epoch,
            **select.summary(state, self.cfg.train, select.scored_metric(self.cfg.train, tuple(self.cfg.eval.ks))),
            "weights_agree": agree,
            "skipped": state.skipped,
            "samples_read": state.samples_read,
        }
        if not preempted:
            self._export("final")
            if state.best_step is None:  # no validation ran: the final weights are the model
                self._export("best")
        summary["costs"] = self.clock.shares()
        if acc.is_main_process:
            log.info(runlog.costs_line(summary["costs"]))
            if preempted:
                self.run.mark_preempted(state.global_step)
            self.run.write_summary(summary)
            log.info("done: %s", summary)
        acc.wait_for_everyone()
        return summary
