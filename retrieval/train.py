"""Fine-tune a timm backbone for retrieval with triplet loss over the global batch.

The same code path runs on one CPU, one GPU, eight GPUs or many nodes; the launcher decides::

    # one process (CPU or one GPU)
    retrieval train --config configs/tiny.yaml --shards shards/out --run-dir runs/tiny
    # 1 node x 8 GPUs, DDP
    accelerate launch --config_file launch/ddp_1node.yaml --num_processes 8 -m retrieval train --config configs/sop_swinv2_base.yaml
    # DeepSpeed ZeRO-2
    accelerate launch --config_file launch/zero2.yaml --num_processes 8 -m retrieval train --config configs/sop_swinv2_base.yaml
    # 2 nodes x 8 GPUs (run on each node with its --machine_rank)
    accelerate launch --config_file launch/ddp_multinode.yaml --num_machines 2 --num_processes 16 --machine_rank R \
        --main_process_ip HOST0 --main_process_port 29500 -m retrieval train --config configs/sop_swinv2_base.yaml
    # Slurm (multi-node, preemptible, requeues itself)
    sbatch --nodes 2 slurm/train.sbatch configs/sop_swinv2_base.yaml --shards /data/sop-shards
    # 2 CPU processes (gloo), as the tests do
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m retrieval train --config configs/tiny.yaml

Epochs are a fixed number of P x K batches per rank, so every rank runs the same number of steps.
On SIGUSR1/SIGTERM the trainer finishes the step, checkpoints, writes ``<run>/preempted`` and exits
with code 3 (``--resume auto`` continues from there, at the same position in the data stream).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from retrieval import checkpoint, dist, runlog
from retrieval.config import Config, derived
from retrieval.config_io import load_config, save_config, to_dict
from retrieval.errors import UserError
from retrieval.export import export_model
from retrieval.models import InputSpec, initial_model, maybe_compile, param_groups

# The data stack (webdataset), the losses (pytorch-metric-learning) and evaluation (faiss) are imported where
# they are used, so `_step` imports with torch + timm + accelerate alone: bench/gpu_check.sh times this exact
# step on GPU hosts that have nothing else installed.

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--shards", help="shard folder (overrides data.shards)")
    p.add_argument("--run-dir", help="output folder (default runs/<train.name>)")
    p.add_argument("--resume", help="auto (latest if present) | latest | path to a checkpoints/step_N folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 optim.lr=1e-4")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"data.shards={args.shards}"] if args.shards else [])
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir or f"runs/{cfg.train.name}")
    result = train(cfg, run_dir, resume=args.resume)
    return PREEMPTED_EXIT if result.get("preempted") else 0


# ---------------------------------------------------------------------------------------------
# Setup


def lr_lambda(total_steps: int, warmup: int, floor: float):
    """Linear warmup then cosine to ``floor`` x peak, per optimizer step."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass
class Setup:
    accelerator: object
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    spec: InputSpec
    train_samples: int


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


def setup(cfg: Config, run_dir: Path) -> Setup:
    from retrieval.data.loader import read_stats
    from retrieval.losses import build_loss

    stats = read_stats(cfg.data.shards)  # bad input fails here, before any process group or GPU work
    train_samples = int(stats.get(cfg.data.train_split, {}).get("samples", 0))
    if not train_samples:
        raise UserError(f"{cfg.data.shards}/stats.json: split {cfg.data.train_split!r} has no samples")
    accelerator = dist.make_accelerator(
        cfg.train.precision, cfg.optim.grad_accum, str(run_dir), runlog.tracker_for(cfg.log.wandb)
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
    return Setup(accelerator, model, criterion, optimizer, scheduler, spec, train_samples)


# ---------------------------------------------------------------------------------------------
# Stop signals (Slurm preemption)


class StopFlag:
    """Set by SIGUSR1/SIGTERM or by the train.max_minutes budget; acted on at the next step boundary once all
    ranks agree. ``reason`` is then "signal" (preemption: exit 3) or "time" (budget spent: finish normally)."""

    def __init__(self, max_minutes: float | None = None) -> None:
        self.raised = False
        self.reason: str | None = None
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def restore(self) -> None:
        """Give the signals back (a caller that trains in-process, e.g. a benchmark, keeps its own handling)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.raised = True
        log.warning("received signal %d: checkpointing at the next step boundary", signum)

    def _out_of_time(self, accelerator) -> bool:
        # rank 0's clock alone decides, so ranks whose clocks straddle the deadline cannot stop a step apart
        return accelerator.is_main_process and self.deadline is not None and time.monotonic() >= self.deadline

    def agreed(self, accelerator) -> bool:
        timed = self._out_of_time(accelerator)  # read once: the trigger and the reason must tell the same story
        if self.raised or timed:
            accelerator.set_trigger()
        if not accelerator.check_trigger():  # one tiny all-reduce: every rank stops at the same step
            return False
        self.reason = "time" if dist.broadcast_object(timed and not self.raised) else "signal"
        return True


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, run_dir: Path, resume: str | None = None) -> dict:
    """Train, validate, checkpoint; returns a summary dict. Every rank calls it."""
    run_dir = Path(run_dir)
    stop = StopFlag(cfg.train.max_minutes)  # before setup: a preemption signal during start-up must not be lost
    try:
        s = setup(cfg, run_dir)
        d = derived(cfg, s.accelerator.num_processes, s.train_samples)
        state = _start(cfg, s, d, run_dir, resume)
        preempted = _loop(cfg, s, d, state, run_dir, runlog.MetricsLog(s.accelerator, run_dir), stop)
        summary = _finish(cfg, s, state, run_dir, preempted)
        s.accelerator.end_training()
        return summary
    finally:
        stop.restore()


def _start(cfg: Config, s: Setup, d, run_dir: Path, resume: str | None) -> checkpoint.TrainerState:
    """Check what we resume (before writing anything), then run folder, resolved config, trackers, state."""
    acc = s.accelerator
    shape = {"world_size": acc.num_processes, "per_rank_batch": d.per_rank_batch, "grad_accum": cfg.optim.grad_accum}
    state = checkpoint.TrainerState(**shape)
    start = checkpoint.resolve_resume(run_dir, resume)
    if start is not None:
        state = checkpoint.TrainerState.load(start)
        saved = {k: getattr(state, k) for k in shape}
        if saved != shape:
            raise UserError(
                f"checkpoint {start} was written with {saved}; this run has {shape}: resume with the "
                "same number of processes, batch and accumulation (or start a new --run-dir)"
            )
    elif (run_dir / "latest").is_file():
        raise UserError(
            f"{run_dir} already holds a run (it has a 'latest' checkpoint): pass --resume auto to "
            "continue it, or choose a new --run-dir"
        )
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "preempted").unlink(missing_ok=True)
        if start is None:  # a fresh run: no log lines from an earlier attempt that never checkpointed
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    acc.wait_for_everyone()
    runlog.init_trackers(acc, cfg, run_dir, to_dict(cfg))
    if start is not None:
        acc.load_state(str(start))
        log.info("resumed from %s at epoch %d, step %d", start, state.epoch, state.global_step)
    if acc.is_main_process:
        log.info(
            "world=%d per-rank batch=%d (P=%d x K=%d) global batch=%d, %d steps/epoch, %d optimizer steps",
            acc.num_processes,
            d.per_rank_batch,
            cfg.data.classes_per_batch,
            cfg.data.images_per_class,
            d.global_batch,
            d.steps_per_epoch,
            d.total_optimizer_steps,
        )
    return state


def _loop(cfg, s: Setup, d, state, run_dir, mlog, stop) -> bool:
    """Epochs until done, early-stopped, capped by train.max_steps, or preempted (returns True then)."""
    acc = s.accelerator
    while state.epoch < cfg.train.epochs and state.global_step < d.stop_at_step:
        outcome = _run_epoch(cfg, s, d, state, run_dir, mlog, stop)
        if outcome == "preempted":
            return True
        if outcome == "capped":  # max_steps / max_minutes reached mid-epoch: keep the data position for a resume
            checkpoint.save(acc, run_dir, state, cfg.train.keep_checkpoints)
            return False
        state.epoch += 1
        state.step_in_epoch = 0
        done = state.epoch >= cfg.train.epochs or state.global_step >= d.stop_at_step
        evaluate_now = cfg.train.eval_every and (state.epoch % cfg.train.eval_every == 0 or done)
        improved = _validate(cfg, s, state, mlog) if evaluate_now else False
        ckpt = checkpoint.save(acc, run_dir, state, cfg.train.keep_checkpoints)
        if improved:
            _mark_best(cfg, s, run_dir, ckpt)
        if _early_stop(cfg, state):
            log.info("early stopping: %d evaluations without improvement", state.evals_since_best)
            break
    return False


def _run_epoch(cfg, s: Setup, d, state, run_dir, mlog, stop) -> str:
    """One epoch from the saved position: returns "done", "capped" (train.max_steps) or "preempted"."""
    from retrieval.data.loader import EpochSpan, Reader, train_loader

    acc = s.accelerator
    span = EpochSpan(state.epoch, d.steps_per_epoch, state.step_in_epoch)
    loader = train_loader(cfg.data.shards, cfg.data, s.spec, span, Reader(acc.process_index, acc.num_processes))
    meter = runlog.Throughput(acc.device)
    s.model.train()
    batches = iter(loader)
    while state.step_in_epoch < d.steps_per_epoch:
        if state.global_step >= d.stop_at_step:
            return "capped"
        t0 = time.perf_counter()
        batch = next(batches)
        meter.add(d.per_rank_batch * acc.num_processes, time.perf_counter() - t0)
        loss, stats = _step(cfg, s, batch, state)
        state.step_in_epoch += 1
        if not acc.sync_gradients:
            continue
        state.global_step += 1
        if _logs_at(cfg, state.global_step):
            _log_train(s, state, loss, stats, meter, mlog)
        if stop.agreed(acc):
            if stop.reason == "time":
                log.info("train.max_minutes=%s spent at step %d: stopping", cfg.train.max_minutes, state.global_step)
                return "capped"
            checkpoint.save(acc, run_dir, state, cfg.train.keep_checkpoints)
            return "preempted"
        at_boundary = state.step_in_epoch >= d.steps_per_epoch or state.global_step >= d.stop_at_step
        if cfg.train.checkpoint_every and state.global_step % cfg.train.checkpoint_every == 0 and not at_boundary:
            checkpoint.save(acc, run_dir, state, cfg.train.keep_checkpoints)  # boundaries save once, below
    return "done"


def _logs_at(cfg, global_step: int) -> bool:
    """Whether optimizer step ``global_step`` is logged (and so needs the loss statistics)."""
    return global_step % cfg.train.log_every == 0


def _step(cfg, s: Setup, batch: dict, state) -> tuple[torch.Tensor, dict]:
    acc = s.accelerator
    images = batch["image"].to(acc.device, non_blocking=True)
    labels = batch["label"].to(acc.device, non_blocking=True)
    if cfg.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with acc.accumulate(s.model):
        embeddings = s.model(images)
        log_now = _logs_at(cfg, state.global_step + 1)  # the step this batch completes; stats sync the host
        loss, stats = s.criterion(embeddings.float(), labels, step=state.global_step, with_stats=log_now)
        acc.backward(loss)
        if acc.sync_gradients and cfg.optim.grad_clip is not None and not dist.uses_deepspeed():
            acc.clip_grad_norm_(s.model.parameters(), cfg.optim.grad_clip)
        s.optimizer.step()
        if acc.sync_gradients:
            s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
    return loss, stats


def _log_train(s: Setup, state, loss, stats, meter, mlog) -> None:
    acc = s.accelerator
    record = {
        "kind": "train",
        "step": state.global_step,
        "epoch": state.epoch,
        "loss": acc.reduce(loss.detach(), "mean").item() / acc.num_processes,  # undo the x world factor
        "lr": s.scheduler.get_last_lr()[0],
        "active_fraction": float(stats["active_fraction"]),
        **meter.summary(acc.num_processes),
    }
    mlog.write(record)
    if acc.is_main_process:
        log.info(runlog.console(record))
    meter.reset()


# ---------------------------------------------------------------------------------------------
# Validation, selection, export


def _validate(cfg, s: Setup, state, mlog) -> bool:
    """Embed the val split rank-sharded, score it on rank 0; returns True (on every rank) if it improved."""
    from retrieval.embedding import embed_split, gather_embeddings
    from retrieval.metrics import retrieval_metrics

    acc = s.accelerator
    local = embed_split(
        acc.unwrap_model(s.model),
        cfg.data.shards,
        cfg.data.val_split,
        s.spec,
        cfg.data.eval_batch_size,
        cfg.data.num_workers,
        acc.device,
        acc.mixed_precision,
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
        record = {
            "kind": "val",
            "step": state.global_step,
            "epoch": state.epoch,
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        mlog.write(record)
        log.info(runlog.console(record))
        if cfg.train.select_metric not in metrics:
            raise UserError(
                f"train.select_metric: {cfg.train.select_metric!r} is not a metric; known: {sorted(metrics)}"
            )
        value = float(metrics[cfg.train.select_metric])
        improved = state.best_metric is None or value > state.best_metric
        if improved:
            state.best_metric, state.best_step, state.evals_since_best = value, state.global_step, 0
        else:
            state.evals_since_best += 1
    shared = dist.broadcast_object((improved, state.best_metric, state.best_step, state.evals_since_best))
    improved, state.best_metric, state.best_step, state.evals_since_best = shared
    s.model.train()
    return improved


def _mark_best(cfg, s: Setup, run_dir: Path, ckpt: Path) -> None:
    if s.accelerator.is_main_process:
        checkpoint.mark_best(run_dir, ckpt)
    _export(cfg, s, run_dir)


def _early_stop(cfg, state) -> bool:
    return bool(cfg.train.early_stop_patience) and state.evals_since_best >= cfg.train.early_stop_patience


def _export(cfg, s: Setup, run_dir: Path, sub: str = "") -> None:
    """Write model.safetensors + model.yaml (loadable without DeepSpeed); collective for ZeRO gathers."""
    acc = s.accelerator
    state_dict = acc.get_state_dict(s.model)  # consolidates DeepSpeed shards where needed
    if acc.is_main_process:
        export_model(acc.unwrap_model(s.model), cfg.model, run_dir / sub if sub else run_dir, state_dict, s.spec)
    acc.wait_for_everyone()


def _finish(cfg, s: Setup, state, run_dir: Path, preempted: bool) -> dict:
    acc = s.accelerator
    agree = dist.all_equal([_param_checksum(acc.unwrap_model(s.model))])
    summary = {
        "preempted": preempted,
        "global_step": state.global_step,
        "epoch": state.epoch,
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "weights_agree": agree,
    }
    if not preempted:
        _export(cfg, s, run_dir, sub="final")
        if state.best_step is None:  # no validation ran: the final weights are the model
            _export(cfg, s, run_dir)
    if acc.is_main_process:
        if preempted:
            (run_dir / "preempted").write_text(str(state.global_step))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("done: %s", summary)
    acc.wait_for_everyone()
    return summary


def _param_checksum(model: torch.nn.Module) -> str:
    """A bitwise fingerprint of the weights: ranks must agree after every step in data parallel training."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
