"""Skipped samples never pass silently: the loader's undecodable images counted against their budget.

The loader fills a skipped sample's slot with another image of its class, so the run goes on; :class:`SkipTally`
sums the skips over ranks at log steps into ``metrics.jsonl``, the console and the summary, and
:func:`check_skipped` stops every rank with the same error past ``data.max_skipped_fraction``.
"""

from __future__ import annotations

import torch

from retrieval import dist
from retrieval.errors import UserError


class SkipTally:
    """Training samples the loader skipped (undecodable image, missing member), summed over ranks at log steps.

    The loader fills a skipped sample's slot with another image of its class, so the run goes on; the count goes to
    ``metrics.jsonl`` (``skipped`` in each train record), the console and the summary, and past
    ``data.max_skipped_fraction`` of the samples read every rank stops with the same error.
    """

    def __init__(self, max_fraction: float, shards: str) -> None:
        self.max_fraction, self.shards = max_fraction, shards
        self.skipped = self.read = 0  # this rank, since the last flush

    def add(self, skipped: int, used: int) -> None:
        self.skipped += skipped
        self.read += skipped + used

    def flush(self, state, device: torch.device) -> int:
        """Add every rank's counts since the last flush to ``state`` (collective); returns the skips among them."""
        both = dist.all_reduce_sum(torch.tensor([self.skipped, self.read], dtype=torch.float64, device=device))
        skipped, read = (int(x) for x in both.tolist())
        self.skipped = self.read = 0
        state.skipped += skipped
        state.samples_read += read
        check_skipped(state.skipped, state.samples_read, self.max_fraction, f"training samples in {self.shards}")
        return skipped


def check_skipped(skipped: int, read: int, max_fraction: float, what: str) -> None:
    if read and skipped / read > max_fraction:
        raise UserError(
            f"{skipped} of {read} {what} were skipped (undecodable or incomplete), more than "
            f"data.max_skipped_fraction={max_fraction}: rebuild the shards, or raise the fraction to accept it"
        )
