"""Triplet margin loss with mining over the global batch (all ranks), built on pytorch-metric-learning (pml).

    criterion = build_loss(cfg.loss, seed=cfg.train.seed)
    loss, stats = criterion(embeddings_local, labels_local, step=global_step)   # then loss.backward()

``loss.miner``:
- ``batch_hard``: pml ``BatchHardMiner``: for each anchor its farthest positive and its closest negative.
- ``semi_hard``: pml ``TripletMarginMiner(type_of_triplets="semihard")``: every triplet whose negative is farther
  than the positive but inside the margin, ``0 < d(a,n) - d(a,p) <= margin``.
- ``all``: every valid triplet (same label a/p with a != p, other label n).
- ``seed``: the original recipe: per anchor one random positive and one random negative of the global batch,
  drawn with a generator seeded from ``(seed, step)`` so every rank draws the same; Euclidean distance (p=2, not
  squared) on the raw features, mean over all triplets (``torch.nn.TripletMarginLoss``). Reproducing the seed also
  needs ``loss.margin=1`` and ``model.normalize=false`` (the seed trained on unnormalised pooled features). Its bug
  is fixed: negatives come from every other class of the batch, not from a fixed slice of the list.

Loss: pml ``TripletMarginLoss`` with pml's default ``AvgNonZeroReducer`` (mean over the triplets with a positive
loss, so easy triplets do not dilute the gradient as training progresses), ``MeanReducer`` for ``seed``.
``loss.distance``: ``cosine`` = pml ``CosineSimilarity`` (loss ``relu(s_an - s_ap + margin)``); ``squared_l2`` =
pml ``LpDistance(power=2)`` on L2-normalised embeddings (pml normalises), i.e. ``2 - 2 cos``: twice the cosine scale.

Global batch and the ``* world_size`` factor: every rank gathers all ranks' embeddings (``dist.all_gather_cat``,
rank order, only the local slice carries gradient), mines and reduces over the gathered batch, so the loss value
(and pml's mean over active triplets) is the single-process loss of the concatenated batch on every rank. Each rank
back-propagates only through its own slice, and DDP *averages* gradients over ranks, which would divide the true
gradient by ``world_size``; the returned loss is therefore multiplied by ``world_size``, and DDP-averaged gradients
equal the single-process gradient of the concatenated batch (``tests/test_losses_dist.py``). ``stats["loss"]`` is
the unscaled global loss, for logging. We do not use pml's ``DistributedLossWrapper``: it does the same ``*
world_size`` but puts the local slice first (triplet indices then differ per rank) and calls torch.distributed
itself, while this project gathers in ``retrieval.dist`` only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer
from torch import nn

from retrieval import dist
from retrieval.config import LossConfig

log = logging.getLogger(__name__)

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TripletCriterion(nn.Module):
    """``forward(embeddings_local, labels_local, step=None) -> (loss * world_size, stats)``; see the module doc."""

    def __init__(self, cfg: LossConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.distance = make_distance(cfg)
        reducer = MeanReducer() if cfg.miner == "seed" else AvgNonZeroReducer()
        self.loss_fn = TripletMarginLoss(margin=cfg.margin, distance=self.distance, reducer=reducer)
        self.last_triplets: Triplets | None = None  # global indices of the last mined triplets (tests, debugging)
        self._calls = 0

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, step: int | None = None, with_stats: bool = True
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``with_stats=False`` skips the statistics: they cost a distance matrix and host syncs (the trainer
        asks for them on logging steps only)."""
        if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"expected B x d embeddings and B labels, got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        step = self._calls if step is None else step  # seed mode: same draw on every rank for the same step
        self._calls += 1
        # Distances in fp32 (or the input's fp64) even when the caller runs under autocast: mining compares them.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if embeddings.dtype in (torch.float16, torch.bfloat16):
                embeddings = embeddings.float()
            emb_all = dist.all_gather_cat(embeddings)
            labels_all = dist.all_gather_cat(labels.to(embeddings.device))
            triplets = _mine(emb_all, labels_all, self.cfg, self.distance, self.seed, step)
            loss = self.loss_fn(emb_all, labels_all, triplets)
            stats = self._stats(emb_all, triplets, loss) if with_stats else {}
        self.last_triplets = triplets
        world = dist.world_size() if dist.is_dist() else 1
        return loss * world, stats

    @torch.no_grad()
    def _stats(self, emb: torch.Tensor, triplets: Triplets, loss: torch.Tensor) -> dict[str, Any]:
        a, p, n = triplets
        num = int(a.numel())
        active = 0.0
        if num:
            mat = self.distance(emb.detach())
            violation = self.distance.margin(mat[a, p], mat[a, n]) + self.cfg.margin
            active = int((violation > 0).sum()) / num
        return {"active_fraction": active, "num_triplets": num, "loss": float(loss.detach())}


def build_loss(cfg: LossConfig, seed: int = 0) -> TripletCriterion:
    """The criterion for ``cfg``; ``seed`` (use ``train.seed``) only matters for ``loss.miner=seed``."""
    if cfg.miner == "seed" and cfg.margin != 1.0:
        log.warning("loss.miner=seed with loss.margin=%s: the seed recipe used margin 1", cfg.margin)
    return TripletCriterion(cfg, seed=seed)


def make_distance(cfg: LossConfig) -> BaseDistance:
    if cfg.miner == "seed":
        return LpDistance(normalize_embeddings=False, p=2, power=1)
    if cfg.distance == "cosine":
        return CosineSimilarity()
    return LpDistance(normalize_embeddings=True, p=2, power=2)


def mine(embeddings: torch.Tensor, labels: torch.Tensor, cfg: LossConfig, *, seed: int = 0, step: int = 0) -> Triplets:
    """(anchor, positive, negative) index tensors that ``cfg.miner`` picks in this (already global) batch."""
    return _mine(embeddings, labels, cfg, make_distance(cfg), seed, step)


@torch.no_grad()
def _mine(
    emb: torch.Tensor, labels: torch.Tensor, cfg: LossConfig, distance: BaseDistance, seed: int, step: int
) -> Triplets:
    if cfg.miner == "seed":
        return seed_triplets(labels, seed, step)
    if cfg.miner == "batch_hard":
        return BatchHardMiner(distance=distance)(emb, labels)
    a, p, n = all_triplets(labels)
    if cfg.miner == "all":
        return a, p, n
    # semi_hard: pml TripletMarginMiner(type_of_triplets="semihard")'s selection, on our enumeration (below)
    mat = distance(emb)
    ap, an = mat[a, p], mat[a, n]
    gap = ap - an if distance.is_inverted else an - ap
    keep = (gap > 0) & (gap <= cfg.margin)
    return a[keep], p[keep], n[keep]


def all_triplets(labels: torch.Tensor) -> Triplets:
    """Every valid (a, p, n), in lexicographic order: the same tensors as pml's ``get_all_triplets_indices``.

    Replaces pml's enumeration, which builds a B x B x B uint8 tensor (1 GiB at B=1024) and loops over anchors in
    Python above B = 1290. Measured on 2 CPU cores, B=1024 (256 classes x 4): pml 1.0 s, this 0.03 s, identical
    output (B=512: 0.22 s vs 0.03 s). Going through the (a, p) pairs needs O(B^2 K) memory.
    """
    same = labels[:, None] == labels[None, :]
    pos = same.clone()
    pos.fill_diagonal_(False)
    a, p = torch.where(pos)
    pair, n = torch.where(~same[a])
    return a[pair], p[pair], n


def seed_triplets(labels: torch.Tensor, seed: int, step: int) -> Triplets:
    """Per anchor one uniformly random positive and negative; anchors without either are skipped.

    Drawn on the CPU with a generator seeded from (seed, step), so all ranks (which hold the same gathered labels)
    agree and a resumed run draws the same triplets.
    """
    lab = labels.detach().cpu()
    same = lab[:, None] == lab[None, :]
    pos = same.clone()
    pos.fill_diagonal_(False)
    neg = ~same
    anchors = torch.where(pos.any(1) & neg.any(1))[0]
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    if anchors.numel() == 0:
        empty = anchors.to(labels.device)
        return empty, empty.clone(), empty.clone()
    p = torch.multinomial(pos[anchors].double(), 1, generator=generator).squeeze(1)
    n = torch.multinomial(neg[anchors].double(), 1, generator=generator).squeeze(1)
    return anchors.to(labels.device), p.to(labels.device), n.to(labels.device)
