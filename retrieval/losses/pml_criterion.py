"""``PmlCriterion``: multi_similarity, contrastive and supcon, each a pytorch-metric-learning loss over every pair
of the gathered batch (``loss.name``; see :mod:`retrieval.losses`)."""

from __future__ import annotations

from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss, SupConLoss
from torch import nn

from retrieval.config.schema import LossConfig
from retrieval.losses.global_criterion import GlobalCriterion, ranking_stats


class PmlCriterion(GlobalCriterion):
    """multi_similarity, contrastive, supcon: a pml loss over every pair of the gathered batch."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        self.loss_fn = pml_loss(cfg)

    def batch_loss(self, emb, labels, step, with_stats):
        loss = self.loss_fn(emb, labels)
        return loss, (ranking_stats(emb, labels, loss) if with_stats else {})


def pml_loss(cfg: LossConfig) -> nn.Module:
    """The pml loss of ``loss.name`` (triplet aside) with the config's hyper-parameters."""
    if cfg.name == "multi_similarity":
        return MultiSimilarityLoss(alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base)
    if cfg.name == "contrastive":
        distance = CosineSimilarity() if cfg.distance == "cosine" else LpDistance(p=2, power=2)
        return ContrastiveLoss(pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin, distance=distance)
    if cfg.name == "supcon":
        return SupConLoss(temperature=cfg.temperature)
    raise ValueError(f"no pml loss for loss.name={cfg.name}")
