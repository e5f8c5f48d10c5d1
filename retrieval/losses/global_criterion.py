"""``GlobalCriterion``: what every loss shares, the global batch (see :mod:`retrieval.losses`).

:class:`GlobalCriterion` gathers the ranks' embeddings and labels, asks the subclass for the single-process loss of
the gathered batch (:meth:`GlobalCriterion.batch_loss`), adds the cross-batch memory's term when there is one, and
returns ``loss * world_size``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrieval import dist
from retrieval.config.schema import LossConfig
from retrieval.losses.cross_batch_memory import GlobalMemory


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
