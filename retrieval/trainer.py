"""The training loop: fine-tune a timm backbone for retrieval with triplet loss over the global batch.

``train(cfg, run_dir, resume)`` is the entry every rank calls; the command that launches it (and its launch
recipes: one CPU, one GPU, DDP, DeepSpeed, multi-node, Slurm) is :mod:`retrieval.cli.train`. The
:class:`Trainer` receives an Accelerator built by :func:`retrieval.dist.make_accelerator`; it does not build
the world itself.

Epochs are a fixed number of P x K batches per rank, so every rank runs the same number of steps.
On SIGUSR1/SIGTERM the trainer finishes the step, checkpoints, marks the run folder preempted and returns
``{"preempted": True, ...}`` (the command exits 3; ``--resume auto`` continues at the same position in the
data stream). What goes where in the run folder is :class:`retrieval.runs.RunFolder`'s business.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from retrieval import dist, elastic, runlog
from retrieval.config import Config, Derived, derived
from retrieval.config_io import to_dict
from retrieval.data.loader import EpochSpan, Reader, read_stats, train_loader
from retrieval.embedding import embed_split, gather_embeddings
from retrieval.errors import UserError
from retrieval.export import export_model
from retrieval.losses import build_loss
from retrieval.metrics import retrieval_metrics
from retrieval.models import InputSpec, initial_model, maybe_compile, param_groups
from retrieval.runs import RunFolder, TrainerState
from retrieval.schedule import StopFlag, lr_lambda

log = logging.getLogger(__name__)


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
        self,
        cfg: Config,
        run: RunFolder,
        accelerator,
        model: torch.nn.Module,
        criterion: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        spec: InputSpec,
        derived: Derived,
        stop: StopFlag,
    ) -> None:
        self.cfg, self.run, self.accelerator = cfg, run, accelerator
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.spec, self.derived, self.stop = spec, derived, stop
        self.state = TrainerState(**self._shape())
        self.mlog = runlog.MetricsLog(accelerator, run)

    @classmethod
    def create(cls, cfg: Config, run: RunFolder, stop: StopFlag) -> Trainer:
        """Check the shards, build the accelerator, model, optimizer and schedule, and prepare them."""
        stats = read_stats(cfg.data.shards)  # bad input fails here, before any process group or GPU work
        train_samples = int(stats.get(cfg.data.train_split, {}).get("samples", 0))
        if not train_samples:
            raise UserError(f"{cfg.data.shards}/stats.json: split {cfg.data.train_split!r} has no samples")
        accelerator = dist.make_accelerator(
            cfg.train.precision, cfg.optim.grad_accum, str(run.path), runlog.tracker_for(cfg.log.wandb)
        )
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        model = initial_model(cfg)
        spec = InputSpec.of(model, cfg.data)
        d = derived(cfg, accelerator.num_processes, train_samples)
        groups = param_groups(model, cfg.optim.lr, cfg.optim.backbone_lr, cfg.optim.weight_decay)
        optimizer = torch.optim.AdamW(groups, betas=cfg.optim.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(d.total_optimizer_steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
        )
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        _configure_deepspeed(accelerator, d.per_rank_batch, cfg)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        model = maybe_compile(model, cfg.model)
        criterion = build_loss(cfg.loss, seed=cfg.train.seed).to(accelerator.device)
        return cls(cfg, run, accelerator, model, criterion, optimizer, scheduler, spec, d, stop)

    # ------------------------------------------------------------------------------------------ the run

    def fit(self, resume: str | None = None) -> dict:
        """Epochs until done, early-stopped, capped (train.max_steps / max_minutes) or preempted; the summary."""
        self._start(resume)
        preempted = self._epochs()
        summary = self._finish(preempted)
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
        """Check what we resume (before writing anything), then run folder, resolved config, trackers, state."""
        acc, shape = self.accelerator, self._shape()
        start = self.run.resolve_resume(resume)
        if start is not None:
            self.state = TrainerState.load(start)
            saved = {k: getattr(self.state, k) for k in shape}
            if saved != shape:
                self._resume_elastic(start, saved, shape)
        elif self.run.has_checkpoints():
            raise UserError(
                f"{self.run.path} already holds a run (it has a 'latest' checkpoint): pass --resume auto to "
                "continue it, or choose a new --run-dir"
            )
        if acc.is_main_process:
            self.run.begin(self.cfg, fresh=start is None)
        acc.wait_for_everyone()
        runlog.init_trackers(acc, self.cfg, self.run.path, to_dict(self.cfg))
        if start is not None:
            acc.load_state(str(start))
            if saved != shape:  # elastic resume: the lr schedule of the new world, at the converted step
                elastic.seek_schedule(self.scheduler, self.state.global_step)
            log.info("resumed from %s at epoch %d, step %d", start, self.state.epoch, self.state.global_step)
        if acc.is_main_process:
            d, data = self.derived, self.cfg.data
            log.info(
                "world=%d per-rank batch=%d (P=%d x K=%d) global batch=%d, %d steps/epoch, %d optimizer steps",
                acc.num_processes,
                d.per_rank_batch,
                data.classes_per_batch,
                data.images_per_class,
                d.global_batch,
                d.steps_per_epoch,
                d.total_optimizer_steps,
            )

    def _resume_elastic(self, start: Path, saved: dict, shape: dict) -> None:
        """A checkpoint from another number of processes: convert its position (retrieval.elastic; issue 14)."""
        same_batch = {k: v for k, v in saved.items() if k != "world_size"} == {
            k: v for k, v in shape.items() if k != "world_size"
        }
        if not same_batch or dist.uses_deepspeed():
            raise UserError(
                f"checkpoint {start} was written with {saved}; this run has {shape}: resume with the same batch and "
                "accumulation (DeepSpeed: also the same number of processes), or start a new --run-dir"
            )
        self.state = elastic.rescale(self.state, shape["world_size"], self.derived, self.cfg.optim.grad_accum)

    def _epochs(self) -> bool:
        """Run epochs from the saved position; True if preempted."""
        cfg, state, d = self.cfg, self.state, self.derived
        while state.epoch < cfg.train.epochs and state.global_step < d.stop_at_step:
            outcome = self._epoch()
            if outcome == "preempted":
                return True
            if outcome == "capped":  # max_steps / max_minutes reached mid-epoch: keep the data position for a resume
                self._checkpoint()
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
        span = EpochSpan(state.epoch, d.steps_per_epoch, state.step_in_epoch)
        loader = train_loader(cfg.data.shards, cfg.data, self.spec, span, Reader(acc.process_index, acc.num_processes))
        meter = runlog.Throughput(acc.device)
        self.model.train()
        batches = iter(loader)
        while state.step_in_epoch < d.steps_per_epoch:
            if state.global_step >= d.stop_at_step:
                return "capped"
            t0 = time.perf_counter()
            batch = next(batches)
            meter.add(d.per_rank_batch * acc.num_processes, time.perf_counter() - t0)
            loss, stats = self._step(batch)
            state.step_in_epoch += 1
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            state.samples_seen += d.global_batch
            if self._logs_at(state.global_step):
                self._log_train(loss, stats, meter)
            if self.stop.agreed(acc):
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
            if acc.sync_gradients and cfg.optim.grad_clip is not None and not dist.uses_deepspeed():
                acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, stats

    def _log_train(self, loss: torch.Tensor, stats: dict, meter: runlog.Throughput) -> None:
        acc = self.accelerator
        record = {
            "kind": "train",
            "step": self.state.global_step,
            "epoch": self.state.epoch,
            "samples": self.state.samples_seen,
            "loss": acc.reduce(loss.detach(), "mean").item() / acc.num_processes,  # undo the x world factor
            "lr": self.scheduler.get_last_lr()[0],
            "active_fraction": float(stats["active_fraction"]),
            **meter.summary(acc.num_processes),
        }
        record.update(runlog.progress(self.state.global_step, self.derived, record["images_per_s"], self.cfg.train))
        self.mlog.write(record)
        if acc.is_main_process:
            log.info(runlog.console(record))
        meter.reset()

    def _checkpoint(self) -> Path:
        return self.run.save_checkpoint(self.accelerator, self.state, self.cfg.train.keep_checkpoints)

    # --------------------------------------------------------------------- validation, selection, export

    def _validate(self) -> bool:
        """Embed the val split rank-sharded, score it on rank 0; returns True (on every rank) if it improved."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        if acc.is_main_process:
            log.info(
                "validation at step %d: embedding split %r on %d process(es)",
                *(state.global_step, cfg.data.val_split, acc.num_processes),
            )
        local = embed_split(
            acc.unwrap_model(self.model),
            cfg.data.shards,
            cfg.data.val_split,
            self.spec,
            cfg.data.eval_batch_size,
            cfg.data.num_workers,
            acc.device,
            acc.mixed_precision,
            label_key=cfg.data.label_key,  # data-sources change (issue 14)
        )
        merged = gather_embeddings(local)
        improved = False
        if acc.is_main_process:
            metrics = retrieval_metrics(
                merged.embeddings,
                merged.labels,
                ks=tuple(cfg.eval.ks),
                backend=cfg.eval.backend,
                chunk=cfg.eval.chunk,
                dtype=cfg.eval.dtype,
            )
            improved = self._select(metrics)
        shared = dist.broadcast_object((improved, state.best_metric, state.best_step, state.evals_since_best))
        improved, state.best_metric, state.best_step, state.evals_since_best = shared
        self.model.train()
        return improved

    def _select(self, metrics: dict) -> bool:
        """Log a val record and update the best metric (main process); True if it improved."""
        state, select = self.state, self.cfg.train.select_metric
        record = {
            "kind": "val",
            "step": state.global_step,
            "epoch": state.epoch,
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        self.mlog.write(record)
        log.info(runlog.console(record))
        if select not in metrics:
            raise UserError(f"train.select_metric: {select!r} is not a metric; known: {sorted(metrics)}")
        value = float(metrics[select])
        improved = state.best_metric is None or value > state.best_metric
        if improved:
            state.best_metric, state.best_step, state.evals_since_best = value, state.global_step, 0
        else:
            state.evals_since_best += 1
        return improved

    def _mark_best(self, ckpt: Path) -> None:
        if self.accelerator.is_main_process:
            self.run.mark_best(ckpt)
        self._export("best")

    def _early_stop(self) -> bool:
        patience = self.cfg.train.early_stop_patience
        return bool(patience) and self.state.evals_since_best >= patience

    def _export(self, which: str = "best") -> None:
        """Write model.safetensors + model.yaml (loadable without DeepSpeed); collective for ZeRO gathers."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)  # consolidates DeepSpeed shards where needed
        if acc.is_main_process:
            export_model(acc.unwrap_model(self.model), self.cfg.model, self.run.model_dir(which), state_dict, self.spec)
        acc.wait_for_everyone()

    def _finish(self, preempted: bool) -> dict:
        acc, state = self.accelerator, self.state
        agree = dist.all_equal([param_checksum(acc.unwrap_model(self.model))])
        summary = {
            "preempted": preempted,
            "global_step": state.global_step,
            "epoch": state.epoch,
            "best_metric": state.best_metric,
            "best_step": state.best_step,
            "weights_agree": agree,
        }
        if not preempted:
            self._export("final")
            if state.best_step is None:  # no validation ran: the final weights are the model
                self._export("best")
        if acc.is_main_process:
            if preempted:
                self.run.mark_preempted(state.global_step)
            self.run.write_summary(summary)
            log.info("done: %s", summary)
        acc.wait_for_everyone()
        return summary


def _configure_deepspeed(accelerator, per_rank_batch: int, cfg: Config) -> None:
    """No DataLoader goes through prepare(), so tell DeepSpeed the micro batch and clipping itself."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = per_rank_batch
    ds["gradient_accumulation_steps"] = cfg.optim.grad_accum
    ds["train_batch_size"] = per_rank_batch * cfg.optim.grad_accum * accelerator.num_processes
    if cfg.optim.grad_clip is not None:
        ds["gradient_clipping"] = cfg.optim.grad_clip


def param_checksum(model: torch.nn.Module) -> str:
    """A bitwise fingerprint of the weights: ranks must agree after every step in data parallel training."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
