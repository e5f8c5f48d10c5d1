"""Everything a :class:`retrieval.train.trainer.Trainer` is built from, prepared in one place (:class:`TrainParts`).

The shards are checked against ``stats.json``/``sizes.json`` first (a missing or truncated shard fails before any
process group or GPU work), then the Accelerator, the model, its input spec, the batch arithmetic, AdamW over the
parameter groups (layer-wise lr decay with ``optim.layer_decay``), the warmup + cosine schedule, DeepSpeed's
batch settings, and the loss (built before the model is prepared: ProxyAnchor's proxies join the model and the
optimizer; a cross-batch memory is checkpointed with the run, as tensors: :mod:`retrieval.train.checkpoint`).

A run with ``model.init_from`` continues a trained model as a NEW run (:func:`retrieval.model.loading.starting_model`):
its weights (backbone and head) are the start, the optimizer and the lr schedule are fresh, the run folder is its own,
and the parent's path and weights' sha256 are recorded in the run's config (``model.init_from``,
``model.init_sha256``). ProxyAnchor's proxies are taken for the labels both runs have (ids below both
``loss.num_classes``: a label must name the same product in both, as a manifest's integer labels keep their ids);
the other labels' proxies start at their seeded init.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from retrieval import cpus, dist, losses
from retrieval.config.schema import Config, Derived, derived
from retrieval.data.check import check_split
from retrieval.data.input_spec import InputSpec
from retrieval.data.loader import read_stats, shard_urls
from retrieval.data.negatives import count_pairs, read_pairs
from retrieval.errors import UserError
from retrieval.losses.global_criterion import GlobalCriterion
from retrieval.model.files import LOSS_MODULE
from retrieval.model.loading import Parent, starting_model
from retrieval.model.network import maybe_compile
from retrieval.run_folder import RunFolder
from retrieval.train.checkpoint import TensorStates
from retrieval.train.log import trackers_of
from retrieval.train.optim import build_optimizer

log = logging.getLogger(__name__)


@dataclass
class TrainParts:
    """What one training run is made of, prepared by the accelerator (DDP / DeepSpeed wrapped, on the device)."""

    accelerator: Accelerator
    model: torch.nn.Module
    criterion: GlobalCriterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    spec: InputSpec  # how the run's images are prepared (exported beside the weights)
    derived: Derived  # the batch arithmetic: per-rank and global batch, steps per epoch and in all
    states: TensorStates  # what checkpoints hold beside accelerate's files (the memory; the trainer adds the EMA)


def prepare(cfg: Config, run: RunFolder) -> TrainParts:
    """Check the shards, then build and prepare every part of the run."""
    stats = read_stats(cfg.data.shards)  # bad input fails here, before any process group or GPU work
    for split in (cfg.data.train_split, *([cfg.data.val_split] if cfg.train.eval_every else [])):
        check_split(cfg.data.shards, split, stats, cfg.data.allow_incomplete)
        shard_urls(cfg.data.shards, split, stats.get(split) or {}, cfg.data.allow_listed_commands)  # trusted URLs
    if cfg.data.hard_negatives:  # a bad file fails here, not in a loader worker
        pairs = count_pairs(read_pairs(cfg.data.hard_negatives))
        log.info("data: %d hard-negative class pairs from %s forced into batches", pairs, cfg.data.hard_negatives)
    train_samples = int(stats.get(cfg.data.train_split, {}).get("samples", 0))
    if not train_samples:
        raise UserError(f"{cfg.data.shards}/stats.json: split {cfg.data.train_split!r} has no samples")
    accelerator = dist.make_accelerator(
        cfg.train.precision, cfg.optim.grad_accum, str(run.path), trackers_of(cfg.log) or None
    )
    cpus.use_cpu_share(cfg.data.num_workers, "train")  # threads beside the workers: the loader's are set, not sized
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    d = derived(cfg, accelerator.num_processes, train_samples)
    model, parent = starting_model(cfg)
    if parent is not None:  # recorded in the run's config (written after this): the lineage of its weights
        cfg.model.init_sha256 = parent.sha256
    spec = InputSpec.of(model, cfg.data)
    criterion = losses.build_loss(cfg.loss, seed=cfg.train.seed, embedding_size=model.embed_dim)
    loss_groups, proxies = losses.param_groups(criterion, cfg.optim.lr), losses.trainable(criterion)
    if proxies is not None and parent is not None:
        inherit_proxies(proxies.proxies, parent)
    optimizer, scheduler = build_optimizer(model, loss_groups, cfg.optim, d.total_optimizer_steps)
    if proxies is not None:  # after the model's groups: the proxies are in the loss's only
        model.add_module(LOSS_MODULE, proxies)  # see retrieval.losses.trainable
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dist.configure_deepspeed(accelerator, d.per_rank_batch, cfg.optim.grad_accum, cfg.optim.grad_clip)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model = maybe_compile(model, cfg.model)
    criterion = criterion.to(accelerator.device)
    states = TensorStates(accelerator.is_main_process)
    if criterion.memory is not None:  # the queue is part of the run's state: a resume continues it bitwise
        states.add("memory", criterion.memory)
    return TrainParts(accelerator, model, criterion, optimizer, scheduler, spec, d, states)


def inherit_proxies(proxies: torch.nn.Parameter, parent: Parent) -> None:
    """The parent's proxies for the labels both runs have (rows below both counts); the others keep their init."""
    theirs = (parent.loss or {}).get("proxies")
    if theirs is None or theirs.shape[1] != proxies.shape[1]:
        log.info(
            "loss: %s has no proxies of dimension %d: the proxies start at their init", parent.path, proxies.shape[1]
        )
        return
    n = min(len(theirs), len(proxies))
    with torch.no_grad():
        proxies[:n] = theirs[:n].to(proxies.dtype)
    log.info("loss: proxies of labels 0..%d from %s, %d new ones at their init", n - 1, parent.path, len(proxies) - n)
