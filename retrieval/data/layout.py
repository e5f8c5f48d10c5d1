"""Who reads what: shards per rank when there are plenty, class groups inside shards when there are few.

Train, for R ranks with W workers each (N = R·W readers):

* **Shard per rank** (at least N shards): the shards are permuted per (seed, epoch), rank r takes
  ``shards[r::R]`` and its logical worker w takes ``rank_shards[w::W]``. Every reader reads only its own
  shards.
* **In-shard split** (fewer than N shards, down to one): every reader reads every shard of the epoch's
  permuted list and keeps the class groups of reader ``r·W + w`` (:class:`retrieval.data.pk.Share`:
  group i of the shard at position j goes to reader ``(i + j) % N``; classes scattered over shards go by
  a hash of their label). Readers are disjoint by class, none is dropped, and every rank still yields
  exactly the epoch's number of steps (the planner cycles). The price: each reader reads (not decodes)
  all the bytes of the split, N times the I/O of the shard-per-rank path, so build more shards for
  large data (the builder's default ``--shard-size`` does) and keep this path for small splits.

Between the two (at least R shards, fewer than N): ranks still take whole shards ``[r::R]`` and only the
rank's W workers split its shards by class group.

Eval uses the same three cases with samples instead of class groups (sample k of shard j goes to reader
``(k + j) % readers``): each sample is embedded exactly once across ranks, even from a single shard.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from retrieval.config.schema import DataConfig
from retrieval.data.pk import TAG_SHARDS, Share, Stream, rng_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """What one rank reads, and how its W workers share it.

    ``readers == 0``: shard per worker (``urls[w::W]``). Else every worker of the rank reads all of ``urls``
    and keeps the class groups (train) or samples (eval) of reader ``first + w`` out of ``readers``.
    """

    urls: list[str]
    first: int = 0
    readers: int = 0
    stream: Stream = Stream()

    @property
    def in_shard(self) -> bool:
        return self.readers > 0

    def worker(self, logical: int, workers: int) -> tuple[list[str], Stream]:
        """Shards and stream (label key, share) of logical worker ``logical`` of ``workers``."""
        if not self.in_shard:
            return self.urls[logical::workers], self.stream
        return self.urls, replace(self.stream, share=Share(self.first + logical, self.readers, self.stream.share.salt))


def epoch_order(urls: Sequence[str], seed: int, epoch: int) -> list[str]:
    """A (seed, epoch) permutation of the shards, the same on every rank."""
    perm = rng_for(TAG_SHARDS, seed, epoch).permutation(len(urls))
    return [urls[i] for i in perm]


def split_readers(urls: Sequence[str], rank: int, world: int, workers: int, stream: Stream | None = None) -> Layout:
    """Shard per worker when there are world x workers shards; shards per rank and groups per worker when there
    are at least ``world``; groups per reader over all shards below that."""
    workers, stream = max(workers, 1), stream or Stream()
    if len(urls) >= world * workers:
        return Layout(list(urls)[rank::world], stream=stream)
    if len(urls) >= world:
        return Layout(list(urls)[rank::world], 0, workers, stream)
    return Layout(list(urls), rank * workers, world * workers, stream)


def train_layout(urls: Sequence[str], data: DataConfig, entry: dict, epoch: int, rank: int, world: int) -> Layout:
    """This rank's train layout for an epoch; ``entry`` is the split's stats.json entry (label key, grouped)."""
    label_key = data.label_key or entry.get("label_key", "cls")
    salt = int(rng_for(TAG_SHARDS, data.seed, epoch, 1).integers(2**31))
    stream = Stream(label_key, bool(entry.get("grouped", True)), Share(0, 1, salt))
    layout = split_readers(epoch_order(urls, data.seed, epoch), rank, world, data.num_workers, stream)
    if layout.in_shard and rank == 0 and epoch == 0:
        log.info(
            "%d train shard(s) for %d process(es) x %d worker(s): splitting by class group inside the shards",
            *(len(urls), world, max(data.num_workers, 1)),
        )
    return layout
