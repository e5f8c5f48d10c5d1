"""Metric-learning losses over the global batch (all ranks), built on pytorch-metric-learning (pml).

    criterion = build_loss(cfg.loss, seed=cfg.train.seed, embedding_size=model.embed_dim)
    model.add_module("loss", trainable(criterion))   # ProxyAnchor only, before accelerator.prepare (setup.py)
    loss, stats = criterion(embeddings_local, labels_local, step=global_step)   # then loss.backward()

``loss.name`` (all on L2-normalised embeddings):
- ``triplet`` (the default): triplet margin loss, triplets mined by ``loss.miner`` (:mod:`.triplet`).
- ``multi_similarity``: pml ``MultiSimilarityLoss(alpha=loss.ms_alpha, beta=loss.ms_beta, base=loss.ms_base)``
  over every pair of the batch, cosine similarity.
- ``contrastive``: pml ``ContrastiveLoss(pos_margin, neg_margin)`` over every pair, in ``loss.distance`` (cosine:
  positives pulled up to ``pos_margin=1``, negatives pushed below ``neg_margin=0.5``, the XBM paper's setting).
- ``supcon``: pml ``SupConLoss(temperature=loss.temperature)``, cosine similarity.
- ``proxy_anchor``: Proxy Anchor (``loss.pa_margin``, ``loss.pa_alpha``), one learned proxy per label in
  ``[0, loss.num_classes)``. The proxies are parameters: :mod:`retrieval.train.build` puts them (:func:`trainable`) inside the model
  accelerate prepares (DDP reduces their gradient, DeepSpeed ZeRO shards their optimizer state, checkpoints hold them), in
  their own AdamW group at ``optim.lr * loss.proxy_lr_mult`` without weight decay (:func:`param_groups`); the
  export writes them to ``loss.safetensors`` beside ``model.safetensors`` (which stays the embedding model only).

Cross-batch memory (``loss.xbm_size > 0``, :mod:`.xbm`; triplet with ``batch_hard``, multi_similarity,
contrastive, supcon): from optimizer step ``loss.xbm_start_step`` on, each call enqueues the gathered batch
(detached) and adds ``loss.xbm_weight`` times the loss of the batch against the memory to the in-batch loss, as in
the paper's code. The memory is checkpointed with the run (``accelerator.register_for_checkpointing``).

Global batch and the ``* world_size`` factor: every rank gathers all ranks' embeddings (``dist.all_gather_cat``,
rank order, only the local slice carries gradient), mines and reduces over the gathered batch, so the loss value
(and pml's mean over active triplets or pairs) is the single-process loss of the concatenated batch on every rank.
Each rank back-propagates only through its own slice, and DDP *averages* gradients over ranks, which would divide
the true gradient by ``world_size``; the returned loss is therefore multiplied by ``world_size``, and DDP-averaged
gradients equal the single-process gradient of the concatenated batch (``tests/test_losses_dist.py``, for every
loss and for the memory over several steps). ``stats["loss"]`` is the unscaled global loss, for logging. We do not
use pml's ``DistributedLossWrapper``: it does the same ``* world_size`` but puts the local slice first (triplet
indices then differ per rank) and calls torch.distributed itself, while this project gathers in ``retrieval.dist``
only.
"""

from __future__ import annotations

import logging
from typing import Any

from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner
from torch import nn

from retrieval.config.schema import LossConfig
from retrieval.losses.cross_batch_memory import GlobalMemory
from retrieval.losses.global_criterion import GlobalCriterion
from retrieval.losses.pml_criterion import PmlCriterion, pml_loss
from retrieval.losses.proxy_anchor import ProxyAnchorCriterion
from retrieval.losses.triplet import TripletCriterion, all_triplets, make_distance, mine, seed_triplets

log = logging.getLogger(__name__)

__all__ = [
    "GlobalCriterion",
    "TripletCriterion",
    "all_triplets",
    "build_loss",
    "make_distance",
    "mine",
    "param_groups",
    "seed_triplets",
    "trainable",
]


def build_loss(cfg: LossConfig, seed: int = 0, embedding_size: int | None = None) -> GlobalCriterion:
    """The criterion for ``cfg``. ``seed`` (use ``train.seed``): the seed miner's draws, the proxies' init;
    ``embedding_size``: the model's output size (needed by proxy_anchor and the memory)."""
    if cfg.name == "triplet" and cfg.miner == "seed" and cfg.margin != 1.0:
        log.warning("loss.miner=seed with loss.margin=%s: the seed recipe used margin 1", cfg.margin)
    needs_size = cfg.name == "proxy_anchor" or cfg.xbm_size
    if needs_size and not embedding_size:
        raise ValueError(f"loss.name={cfg.name} (loss.xbm_size={cfg.xbm_size}) needs the embedding size")
    if cfg.name == "triplet":
        criterion: GlobalCriterion = TripletCriterion(cfg, seed=seed)
    elif cfg.name == "proxy_anchor":
        criterion = ProxyAnchorCriterion(cfg, int(embedding_size or 0), seed)
    else:
        criterion = PmlCriterion(cfg)
    if cfg.xbm_size:
        criterion.memory = _memory(cfg, int(embedding_size or 0))
    return criterion


def _memory(cfg: LossConfig, embedding_size: int) -> GlobalMemory:
    if cfg.name == "triplet":  # batch_hard only (config): the triplets against the memory are mined by pml
        distance = make_distance(cfg)
        inner: nn.Module = TripletMarginLoss(margin=cfg.margin, distance=distance)
        return GlobalMemory(inner, embedding_size, cfg.xbm_size, miner=BatchHardMiner(distance=distance))
    return GlobalMemory(pml_loss(cfg), embedding_size, cfg.xbm_size)


def trainable(criterion: GlobalCriterion) -> nn.Module | None:
    """The module holding the loss's parameters (ProxyAnchor's proxies), None for a loss without any. The trainer
    puts it inside the model before ``accelerator.prepare`` (as ``model.files.LOSS_MODULE``), so that DDP reduces the
    proxies' gradient, DeepSpeed ZeRO shards their optimizer state and checkpoints save them with the model."""
    return criterion.params if isinstance(criterion, ProxyAnchorCriterion) else None


def param_groups(criterion: GlobalCriterion, lr: float) -> list[dict[str, Any]]:
    """The loss's AdamW group (none for a loss without parameters): the proxies at ``lr * loss.proxy_lr_mult``,
    without weight decay (cosine similarity ignores their norm)."""
    if not isinstance(criterion, ProxyAnchorCriterion):
        return []
    params = list(criterion.params.parameters())
    return [{"name": "loss_proxies", "params": params, "lr": lr * criterion.cfg.proxy_lr_mult, "weight_decay": 0.0}]
