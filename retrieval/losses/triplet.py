"""Triplet margin loss with mining over the global batch (``loss.name=triplet``), built on pytorch-metric-learning.

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
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer

from retrieval.config.schema import LossConfig
from retrieval.losses.global_criterion import GlobalCriterion

log = logging.getLogger(__name__)

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TripletCriterion(GlobalCriterion):
    """Triplets mined by ``loss.miner`` in the gathered batch; see :class:`GlobalCriterion` for the call."""

    def __init__(self, cfg: LossConfig, seed: int = 0) -> None:
        super().__init__(cfg)
        self.seed = seed
        self.distance = make_distance(cfg)
        reducer = MeanReducer() if cfg.miner == "seed" else AvgNonZeroReducer()
        self.loss_fn = TripletMarginLoss(margin=cfg.margin, distance=self.distance, reducer=reducer)
        self.last_triplets: Triplets | None = None  # global indices of the last mined triplets (tests, debugging)

    def batch_loss(self, emb_all, labels_all, step, with_stats):
        triplets = _mine(emb_all, labels_all, self.cfg, self.distance, self.seed, step)
        loss = self.loss_fn(emb_all, labels_all, triplets)
        self.last_triplets = triplets
        return loss, (self._stats(emb_all, triplets, loss) if with_stats else {})

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
