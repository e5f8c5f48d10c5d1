"""Divergence never passes silently: the first optimizer step whose loss or gradient norm is not finite.

The trainer records every step on the device (``observe``: a few tiny kernels, no host sync) and checks the record
at logging steps and before every validation, checkpoint and export (``check``: one all-reduce and one host sync).
Every rank checks at the same step and the record is reduced over ranks, so all of them raise together: a run that
diverged stops with an error naming the step, and no checkpoint or export of non-finite weights is ever written
(``latest`` and ``best`` stay at the last finite state). Also here: the weights' fingerprint that tells whether
data-parallel ranks still agree (a run whose ranks drifted apart is diverged too).
"""

from __future__ import annotations

import hashlib
import math

import torch

from retrieval import dist
from retrieval.errors import UserError


class DivergedError(UserError):
    """Training produced a non-finite loss, gradient norm or weight."""


class FiniteGuard:
    """The first step (on any rank) whose loss or gradient norm was NaN/inf, kept on the device until checked."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), math.inf, device=device)

    def observe(self, step: int, *values: torch.Tensor | None) -> None:
        """Record ``step`` if any of ``values`` (loss, gradient norm) is not finite; no host sync."""
        for v in values:
            if v is None:
                continue
            bad = ~torch.isfinite(v.detach().float()).all()
            self.first_bad = torch.minimum(self.first_bad, torch.where(bad, float(step), math.inf))

    def check(self, step: int, before: str, models: list[torch.nn.Module] | None = None, last_good: str | None = None):
        """Raise :class:`DivergedError` on every rank if any rank saw a non-finite step (or, given ``models``, holds a
        non-finite weight in any of them: the model, its EMA). Collective: every rank must call it at the same point."""
        flags = [self.first_bad]
        local = [torch.isfinite(p.detach()).all() for m in models or () for p in m.parameters() if p.numel()]
        if local:  # (ZeRO-3 leaves a rank's unwrapped parameters empty: its shard is checked by the loss)
            finite = torch.stack(local).all().to(self.first_bad.device)
            flags.append(torch.where(finite, math.inf, float(step)).to(self.first_bad.dtype))
        first = dist.all_reduce_min(torch.stack(flags).min()).item()  # host sync: log steps, checkpoints, exports
        if math.isfinite(first):
            where = f"latest stays at {last_good}" if last_good else "no checkpoint was written"
            raise DivergedError(
                f"training diverged: non-finite loss, gradient norm or weights at step {int(first)} (found before "
                f"{before} at step {step}); nothing non-finite was saved ({where}). Lower optim.lr/optim.backbone_lr "
                "or set optim.grad_clip, then --resume auto from the last finite checkpoint (or start a new --run-dir)"
            )


def param_checksum(model: torch.nn.Module) -> str:
    """A bitwise fingerprint of the weights: ranks must agree after every step in data parallel training."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
