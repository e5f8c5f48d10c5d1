"""The global-batch criterion every loss shares, and the losses other than triplet (see :mod:`retrieval.losses`).

:class:`GlobalCriterion` gathers the ranks' embeddings and labels, asks the subclass for the single-process loss of
the gathered batch (:meth:`GlobalCriterion.batch_loss`), adds the cross-batch memory's term when there is one, and
returns ``loss * world_size``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss, SupConLoss
from torch import nn

from retrieval import dist
from retrieval.config import LossConfig
from retrieval.errors import UserError
from retrieval.losses.xbm import GlobalMemory


class GlobalCriterion(nn.Module):
    """``forward(embeddings_local, labels_local, step=None, with_stats=True) -> (loss * world_size, stats)``.

    ``stats``: ``loss`` (the unscaled global loss), ``active_fraction`` and, with a memory, ``xbm_filled``."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.memory: GlobalMemory | None = None  # set by build_loss when loss.xbm_size > 0
        self._calls = 0

    def batch_loss(
        self, emb: torch.Tensor, labels: torch.Tensor, step: int, with_stats: bool
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The single-process loss of the (gathered) batch and its statistics."""
        raise NotImplementedError

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, step: int | None = None, with_stats: bool = True
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``with_stats=False`` skips the statistics: they cost a distance matrix and host syncs (the trainer
        asks for them on logging steps only). ``step``: optimizer steps done (the seed miner's draw, the memory's
        warm-up ``loss.xbm_start_step``); None counts calls."""
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
            loss, stats = self.batch_loss(emb_all, labels_all, step, with_stats)
            if self.memory is not None and step >= self.cfg.xbm_start_step:
                # every rank enqueues the same gathered batch: the queues stay equal without any communication
                loss = loss + self.cfg.xbm_weight * self.memory(emb_all, labels_all)
                if with_stats:
                    stats.update(loss=float(loss.detach()), xbm_filled=self.memory.filled)
        world = dist.world_size() if dist.is_dist() else 1
        return loss * world, stats


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


@torch.no_grad()
def ranking_stats(emb: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> dict[str, Any]:
    """``active_fraction`` of the losses without triplets: the anchors (with a positive and a negative in the
    batch) whose most similar negative is more similar than their least similar positive, by cosine."""
    unit = F.normalize(emb.detach(), dim=1)
    sim = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    valid = pos.any(1) & (~same).any(1)
    worst_pos = sim.masked_fill(~pos, float("inf")).min(1).values
    best_neg = sim.masked_fill(same, float("-inf")).max(1).values
    errors = int(((best_neg > worst_pos) & valid).sum())
    return {"active_fraction": errors / max(int(valid.sum()), 1), "loss": float(loss.detach())}


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class Proxies(nn.Module):
    """ProxyAnchor's proxies: the loss's only parameters (see :func:`retrieval.losses.trainable`)."""

    def __init__(self, num_classes: int, dim: int, seed: int) -> None:
        super().__init__()
        # kaiming_normal_(mode="fan_out") as the paper's code; a private generator leaves the global RNG (and so
        # every other run's draws) as it was
        g = torch.Generator().manual_seed(seed)
        self.proxies = nn.Parameter(torch.randn(num_classes, dim, generator=g) * (2.0 / num_classes) ** 0.5)


class ProxyAnchorCriterion(GlobalCriterion):
    """Proxy Anchor (Kim et al. 2020), the computation of pml's ``ProxyAnchorLoss`` (``tests/test_losses.py``
    checks equality). Not pml's class itself: it casts ``proxies.data`` to the embeddings' dtype in place, which
    under DeepSpeed would cut the bf16 parameter from its flat buffer; here the proxies are cast differentiably.

    Every rank computes the loss of the whole gathered batch, so each rank's proxy gradient is already the full
    one; with the ``* world_size`` factor and DDP's average it would be ``world_size`` times too large, so the
    proxies' gradient is scaled by ``1 / world_size`` on the way back."""

    def __init__(self, cfg: LossConfig, dim: int, seed: int) -> None:
        super().__init__(cfg)
        self.params = Proxies(int(cfg.num_classes or 0), dim, seed)

    def batch_loss(self, emb, labels, step, with_stats):
        num = self.params.proxies.shape[0]
        low, high = int(labels.min()), int(labels.max())  # a host sync; a bad label must fail clearly, not index
        if low < 0 or high >= num:
            raise UserError(f"loss.num_classes: labels must lie in [0, {num}) for proxy_anchor, found {low}..{high}")
        world = dist.world_size() if dist.is_dist() else 1
        proxies = _ScaleGrad.apply(self.params.proxies, 1.0 / world).to(emb.dtype)
        loss = proxy_anchor_loss(emb, labels, proxies, self.cfg.pa_margin, self.cfg.pa_alpha)
        return loss, (ranking_stats(emb, labels, loss) if with_stats else {})


def proxy_anchor_loss(
    emb: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, margin: float, alpha: float
) -> torch.Tensor:
    """Mean over proxies with a positive of ``log(1 + sum_pos exp(-alpha (s - margin)))`` plus the mean over all
    proxies of ``log(1 + sum_neg exp(alpha (s + margin)))``; ``s`` the cosine of embedding and proxy."""
    cos = F.normalize(emb, dim=1) @ F.normalize(proxies, dim=1).T
    pos = F.one_hot(labels, proxies.shape[0]).bool()
    pos_term = _log1p_sum_exp(alpha * (margin - cos), pos)
    neg_term = _log1p_sum_exp(alpha * (cos + margin), ~pos)
    with_pos = int(pos.any(0).sum())
    return pos_term.sum() / max(with_pos, 1) + neg_term.sum() / proxies.shape[0]


def _log1p_sum_exp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per column, ``log(1 + sum exp(x))`` over the kept rows (0 for a column with none); stable."""
    x = x.masked_fill(~keep, float("-inf"))
    x = torch.cat([x, x.new_zeros(1, x.shape[1])], dim=0)
    return torch.logsumexp(x, dim=0).masked_fill(~keep.any(0), 0.0)
