"""P×K batch planning from class-grouped shards, decided on metadata alone.

A :class:`PKPlanner` turns one loader worker's shards into an endless sequence of :class:`Plan`
objects (which P classes, which K images of each). It reads the tar members but never decodes an
image, so a resumed epoch can replay the plans of the batches it skips cheaply and then decode only
the batches it yields; the plans after the resume point are identical to an uninterrupted epoch
because they depend only on the shard bytes and the seeds.

Stream: the worker's shards are read in a new seeded order on every pass and cycled forever, so
the number of batches never depends on shard sizes (the caller stops after its quota). The shard
contract keeps each class contiguous inside one shard; a contiguous run of one label is a group.

Pool: up to ``class_pool`` complete classes are buffered; a batch takes P of them at random
(without replacement) and removes them; the pool is refilled from the stream. When the worker's
shards hold fewer usable classes than the pool size, a batch is formed at each pass end as soon as P
classes are buffered, so small data sets still work; fewer than P usable classes is a UserError.

Classes with fewer than K images: a 1-image class is always dropped (it has no positive). With
``small_class="repeat"`` a class with 2..K-1 images is used with all its images once plus
K - n draws with replacement; with ``small_class="drop"`` it is skipped.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from retrieval.errors import UserError

log = logging.getLogger(__name__)

# Distinct first words of the SeedSequence entropy so that no two random streams coincide.
TAG_SHARDS, TAG_PASS, TAG_PICK, TAG_AUG = 11, 12, 13, 14


def seed_seq(*words: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(w) for w in words])


def rng_for(*words: int) -> np.random.Generator:
    return np.random.default_rng(seed_seq(*words))


@dataclass(frozen=True, slots=True)
class Sample:
    """One shard sample with its undecoded image bytes."""

    key: str
    url: str
    label: int
    image_id: int
    super_label: int
    path: str
    jpg: bytes


def parse_sample(raw: dict) -> Sample:
    """Contract fields from a webdataset sample dict; ``ValueError`` when a member is missing or malformed."""
    key = raw.get("__key__", "?")
    if "jpg" not in raw or "cls" not in raw:
        raise ValueError(f"sample {key} lacks a .jpg or .cls member")
    label = int(raw["cls"].decode("ascii").strip())
    meta = json.loads(raw["json"]) if "json" in raw else {}
    image_id = int(meta.get("image_id", key))
    return Sample(
        key,
        raw.get("__url__", ""),
        label,
        image_id,
        int(meta.get("super_class_id", 0)),
        str(meta.get("path", key)),
        raw["jpg"],
    )


class SkipCounter:
    """Counts samples skipped for bad data in this process; warns once, reports new skips via :meth:`take`."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.keys: set[tuple[str, str]] = set()
        self.pending = 0

    def add(self, key: str, url: str, reason: object) -> None:
        if (url, key) in self.keys:
            return
        self.keys.add((url, key))
        self.pending += 1
        if len(self.keys) == 1:
            log.warning(
                "%s: skipping sample %s of %s (%s); further skips are counted in batch['skipped']",
                self.where,
                key,
                url,
                reason,
            )

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


def read_samples(urls: Sequence[str], counter: SkipCounter) -> Iterator[Sample]:
    """Samples of ``urls`` in order; malformed samples are counted and skipped, unreadable tars warned."""
    for raw in wds.tarfile_samples([{"url": u} for u in urls], handler=wds.warn_and_continue):
        try:
            yield parse_sample(raw)
        except (ValueError, UnicodeDecodeError) as e:
            counter.add(raw.get("__key__", "?"), raw.get("__url__", "?"), e)


def class_groups(samples: Iterator[Sample]) -> Iterator[list[Sample]]:
    """Contiguous runs of one label within one shard."""
    group: list[Sample] = []
    for s in samples:
        if group and (s.label != group[0].label or s.url != group[0].url):
            yield group
            group = []
        group.append(s)
    if group:
        yield group


@dataclass(frozen=True)
class Plan:
    """One batch: P (class group, K chosen indices) pairs, and the pool's other classes as spares.

    Spares are only used to stand in for a chosen class none of whose images decode; reading them
    never changes the pool, so later plans stay the same. Recently used classes are included so that
    a spare exists even when the pool holds exactly P classes (small data sets at a pass end).
    """

    classes: list[tuple[list[Sample], list[int]]]
    spares: tuple[list[Sample], ...]  # pool classes, then recently used ones; none shares a label with `classes`


_PASS_END = object()


class PKPlanner:
    """Endless P×K plans over one worker's shards; a pure function of the shard bytes and ``seed_words``."""

    def __init__(
        self,
        urls: Sequence[str],
        P: int,
        K: int,
        pool_size: int,
        small_class: str,
        seed_words: Sequence[int],
        counter: SkipCounter,
        where: str = "worker",
    ) -> None:
        if not urls:
            raise ValueError("PKPlanner needs at least one shard")
        self.urls, self.P, self.K, self.pool_size = list(urls), P, K, max(pool_size, P)
        self.small_class, self.seed_words, self.counter, self.where = small_class, tuple(seed_words), counter, where

    def usable(self, group: list[Sample]) -> bool:
        n = len(group)
        return n >= 2 and (n >= self.K or self.small_class == "repeat")

    def _groups(self) -> Iterator[list[Sample] | object]:
        for p in itertools.count():
            order = rng_for(TAG_PASS, *self.seed_words, p).permutation(len(self.urls))
            yield from class_groups(read_samples([self.urls[i] for i in order], self.counter))
            yield _PASS_END

    def _too_few_classes(self) -> str:
        need = f"{self.K} images (data.small_class=drop)" if self.small_class == "drop" else "2 images"
        return (
            f"{self.where}: its {len(self.urls)} shard(s) hold fewer than data.classes_per_batch={self.P} "
            f"usable classes (classes with >= {need}); use fewer data.num_workers or processes, a smaller "
            "data.classes_per_batch, or more data"
        )

    def _fill(self, pool: dict[int, list[Sample]], groups: Iterator, added: list[int]) -> None:
        """Read classes into the pool until it is full, or until a pass ends with at least P buffered."""
        while len(pool) < self.pool_size:
            g = next(groups)
            if g is _PASS_END:
                if added[0] == 0 and len(pool) < self.P:
                    raise UserError(self._too_few_classes())
                added[0] = 0
                if len(pool) >= self.P:
                    return
                continue
            label = g[0].label
            if label in pool or not self.usable(g):  # in pool: the next pass's copy of an unused class
                continue
            pool[label] = g
            added[0] += 1

    def choose(self, rng: np.random.Generator, n: int) -> list[int]:
        """K image indices of an n-image class: without replacement, or all n then K - n repeats."""
        if n >= self.K:
            return rng.choice(n, self.K, replace=False).tolist()
        return list(range(n)) + rng.choice(n, self.K - n, replace=True).tolist()

    def __iter__(self) -> Iterator[Plan]:
        rng = rng_for(TAG_PICK, *self.seed_words)
        pool: dict[int, list[Sample]] = {}
        groups, added = self._groups(), [0]
        recent: deque[list[Sample]] = deque(maxlen=2 * self.P)
        while True:
            self._fill(pool, groups, added)
            labels = list(pool)
            picked = [labels[i] for i in rng.choice(len(labels), self.P, replace=False)]
            classes = []
            for c in picked:
                group = pool.pop(c)
                classes.append((group, self.choose(rng, len(group))))
            spares: dict[int, list[Sample]] = {}
            for g in (*pool.values(), *reversed(recent)):
                if g[0].label not in picked:
                    spares.setdefault(g[0].label, g)
            yield Plan(classes, tuple(spares.values()))
            recent.extend(g for g, _ in classes)
