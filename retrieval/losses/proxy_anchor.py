"""``ProxyAnchorCriterion``: Proxy Anchor (Kim et al. 2020), one learned proxy per label (``loss.name=proxy_anchor``).

The proxies are the only loss parameters in the project: :func:`retrieval.losses.trainable` hands them to the
trainer, which puts them inside the model it prepares (see :mod:`retrieval.losses`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval import dist
from retrieval.config.schema import LossConfig
from retrieval.errors import UserError
from retrieval.losses.global_criterion import GlobalCriterion, ranking_stats


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
