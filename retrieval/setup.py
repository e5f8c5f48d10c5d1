"""Everything a :class:`retrieval.trainer.Trainer` is built from, prepared in one place.

The shards are checked against ``stats.json``/``sizes.json`` first (a missing or truncated shard fails before any
process group or GPU work), then the Accelerator, the model, its input spec, the batch arithmetic, AdamW over the
parameter groups (layer-wise lr decay with ``optim.layer_decay``), the warmup + cosine schedule, DeepSpeed's
batch settings, and the loss (built before the model is prepared: ProxyAnchor's proxies join the model and the
optimizer; a cross-batch memory is checkpointed with the run).
"""

from __future__ import annotations

import torch

from retrieval import dist, losses, runlog
from retrieval.config import Config, ConfigError, Derived, derived
from retrieval.data.check import check_split
from retrieval.data.loader import read_stats
from retrieval.errors import UserError
from retrieval.export import LOSS_MODULE
from retrieval.models import InputSpec, initial_model, maybe_compile, param_groups
from retrieval.runs import RunFolder
from retrieval.schedule import lr_lambda


def prepare(cfg: Config, run: RunFolder) -> tuple:
    """``(accelerator, model, criterion, optimizer, scheduler, spec, derived)``, prepared by the accelerator."""
    stats = read_stats(cfg.data.shards)  # bad input fails here, before any process group or GPU work
    for split in (cfg.data.train_split, *([cfg.data.val_split] if cfg.train.eval_every else [])):
        check_split(cfg.data.shards, split, stats, cfg.data.allow_incomplete)
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
    criterion = losses.build_loss(cfg.loss, seed=cfg.train.seed, embedding_size=model.embed_dim)
    _check_memory(cfg, d)
    groups = param_groups(model, cfg.optim.lr, cfg.optim.backbone_lr, cfg.optim.weight_decay, cfg.optim.layer_decay)
    groups += losses.param_groups(criterion, cfg.optim.lr)
    proxies = losses.trainable(criterion)
    if proxies is not None:  # after the model's groups: the proxies are in the loss's only
        model.add_module(LOSS_MODULE, proxies)  # see retrieval.losses.trainable
    optimizer = torch.optim.AdamW(groups, betas=cfg.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(d.total_optimizer_steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
    )
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dist.configure_deepspeed(accelerator, d.per_rank_batch, cfg.optim.grad_accum, cfg.optim.grad_clip)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model = maybe_compile(model, cfg.model)
    criterion = criterion.to(accelerator.device)
    if criterion.memory is not None:  # the queue is part of the run's state: a resume continues it bitwise
        accelerator.register_for_checkpointing(criterion.memory)
    return accelerator, model, criterion, optimizer, scheduler, spec, d


def _check_memory(cfg: Config, d: Derived) -> None:
    gathered = d.global_batch // cfg.optim.grad_accum  # one call of the loss enqueues every rank's micro-batch
    if cfg.loss.xbm_size and cfg.loss.xbm_size < gathered:
        raise ConfigError(
            f"loss.xbm_size: {cfg.loss.xbm_size} embeddings hold less than one gathered batch ({gathered} = processes "
            "x data.classes_per_batch x data.images_per_class); raise it or set 0 (off)"
        )
