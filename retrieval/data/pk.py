"""P×K batch planning from class-grouped shards, decided on metadata alone.

A :class:`PKPlanner` turns one loader worker's shards into an endless sequence of :class:`Plan`
objects (which P classes, which K images of each). It reads the tar members but never decodes an
image, so a resumed epoch can replay the plans of the batches it skips cheaply and then decode only
the batches it yields; the plans after the resume point are identical to an uninterrupted epoch
because they depend only on the shard bytes and the seeds.

Stream: the worker's shards are read in a new seeded order on every pass and cycled forever, so
the number of batches never depends on shard sizes (the caller stops after its quota). The shard
contract keeps each class contiguous inside one shard; a contiguous run of one label is a group.

Foreign corpora (``grouped: false`` in the split's stats.json, from ``retrieval shards index``) may
scatter a class over many shards. The planner then buffers each label's samples (undecoded bytes)
across the worker's shards and releases the class as soon as K are buffered; at a pass end the
remainders (2..K-1 images) follow under the small-class rule. Memory: at most K-1 undecoded images per
class the worker sees, e.g. 11k classes x 3 x 30 kB = 1 GB per worker in the worst case (far less when a
class's images sit close together). Only images in the same worker's shards meet: a class spread over
shards of different workers is seen as fragments (fragments of one image are unusable), so for heavily
scattered corpora rebuild with ``retrieval shards build --manifest`` or use few shards per split (the
in-shard split then gives every reader all shards and whole classes, by label hash).

Pool: up to ``class_pool`` complete classes are buffered; a batch takes P of them at random
(without replacement) and removes them; the pool is refilled from the stream. A refill reads about
P * n / (n - class_pool) groups when the worker's shards hold n classes, so a pool close to n re-reads
most of a pass for every batch (at 250 of 255 classes: 82 ms a plan against 7 ms at 32).
Resident: when the worker's shards hold no more usable classes than ``class_pool`` (a small catalogue,
or SOP's 11k classes over 64 loader workers), the first pass reads them all and they stay: the shards
are read once, and batches take the classes in a seeded order, each class once per cycle through them
(what a sampler over an in-memory dataset does). A class's images are then all of its images in the
worker's shards, wherever they lie. Fewer than P usable classes is a UserError.
Re-reads: a worker keeps what it read of a shard (its groups or samples, undecoded) while they fit in
``data.shard_cache_mb`` (:class:`ShardCache`), so the passes after the first cost no tar parsing or download; the
plans are the same either way.

Classes with fewer than K images: a 1-image class is always dropped (it has no positive). With
``small_class="repeat"`` a class with 2..K-1 images is used with all its images once plus
K - n draws with replacement; with ``small_class="drop"`` it is skipped.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.data.samples import (
    Sample,
    ShardCache,
    SkipCounter,
    class_groups,
    group_bytes,
    read_samples,
    sample_bytes,
)
from retrieval.errors import UserError

# Distinct first words of the SeedSequence entropy so that no two random streams coincide.
TAG_SHARDS, TAG_PASS, TAG_PICK, TAG_AUG = 11, 12, 13, 14


def seed_seq(*words: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(w) for w in words])


def rng_for(*words: int) -> np.random.Generator:
    return np.random.default_rng(seed_seq(*words))


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


@dataclass(frozen=True)
class Share:
    """Which class groups of the shards a reader keeps: ``index`` of ``count`` readers (in-shard split).

    Builder shards (grouped): group i of the shard at position j of the epoch's shard list goes to reader
    ``(i + j) % count``, so readers get nearly equal numbers of classes. Ungrouped corpora: a class goes to
    the reader its label hashes to (``salt`` varies the assignment per epoch). ``count=1`` keeps everything.
    """

    index: int = 0
    count: int = 1
    salt: int = 0

    def keeps_group(self, i: int, j: int) -> bool:
        return self.count == 1 or (i + j) % self.count == self.index

    def keeps_label(self, label: int) -> bool:
        mixed = ((label ^ self.salt) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        return self.count == 1 or (mixed >> 32) % self.count == self.index


@dataclass(frozen=True)
class Stream:
    """How a planner reads its shards: label key, whether classes are contiguous, its share of the groups."""

    label_key: str = "cls"
    grouped: bool = True
    share: Share = Share()


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
        stream: Stream = Stream(),
        negatives: dict[int, tuple[int, ...]] | None = None,
        cache_bytes: int = 0,
    ) -> None:
        if not urls:
            raise ValueError("PKPlanner needs at least one shard")
        self.urls, self.P, self.K, self.pool_size = list(urls), P, K, max(pool_size, P)
        self.small_class, self.seed_words, self.counter, self.where = small_class, tuple(seed_words), counter, where
        self.stream = stream
        self.negatives = negatives or {}  # class -> classes it must meet in a batch (retrieval.data.negatives)
        self.cache = ShardCache(cache_bytes)  # a pass after the first reads the kept shards from memory

    def usable(self, group: list[Sample]) -> bool:
        n = len(group)
        return n >= 2 and (n >= self.K or self.small_class == "repeat")

    def _groups(self) -> Iterator[list[Sample] | object]:
        gather = self._grouped_pass if self.stream.grouped else self._gathered_pass
        for p in itertools.count():
            order = rng_for(TAG_PASS, *self.seed_words, p).permutation(len(self.urls))
            yield from gather(order)
            yield _PASS_END

    def _grouped_pass(self, order) -> Iterator[list[Sample]]:
        for j in order:
            yield from self.cache.read(("groups", int(j)), self._kept_groups(int(j)), group_bytes)

    def _kept_groups(self, j: int) -> Iterator[list[Sample]]:
        """Shard ``j``'s class groups that this reader keeps."""
        groups = class_groups(read_samples([self.urls[j]], self.counter, self.stream.label_key))
        return (g for i, g in enumerate(groups) if self.stream.share.keeps_group(i, j))

    def _gathered_pass(self, order) -> Iterator[list[Sample]]:
        """Classes scattered over shards: buffer each label's samples, release it once K are buffered; at the
        pass end the remainders (fewer than K) follow. Holds at most K-1 undecoded images per class (beside what
        the shard cache keeps)."""
        share, key = self.stream.share, self.stream.label_key
        partial: dict[int, list[Sample]] = {}
        for j in order:
            kept = (s for s in read_samples([self.urls[j]], self.counter, key) if share.keeps_label(s.label))
            yield from self._gather(partial, self.cache.read(("samples", int(j)), kept, sample_bytes))
        yield from partial.values()

    def _gather(self, partial: dict[int, list[Sample]], samples: Iterator[Sample]) -> Iterator[list[Sample]]:
        """Each label's samples into ``partial``; a label is released as soon as K are buffered."""
        for s in samples:
            group = partial.setdefault(s.label, [])
            group.append(s)
            if len(group) >= self.K:
                yield partial.pop(s.label)

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

    def with_negatives(self, picked: list[int], pool: dict, rng: np.random.Generator) -> list[int]:
        """``picked`` with the hard-negative partners (in the pool) of its classes forced in; when none of them has
        one, a pool class that has one, with its partners. At most P // 2 forced classes; the rest of ``picked``
        fills the batch. Draws from ``rng`` only in that second case (no negatives: the plans are unchanged)."""
        anchors = [c for c in pool if any(b in pool for b in self.negatives.get(c, ()))]
        if not anchors:
            return picked
        seeds = [c for c in picked if c in anchors] or [anchors[int(rng.integers(len(anchors)))]]
        forced: list[int] = []
        for c in seeds:
            for label in (c, *(b for b in self.negatives[c] if b in pool)):
                if label not in forced:
                    forced.append(label)
        forced = forced[: min(max(self.P // 2, 2), self.P)]
        rest = [c for c in picked if c not in forced]
        return forced + rest[: self.P - len(forced)]

    def choose(self, rng: np.random.Generator, n: int) -> list[int]:
        """K image indices of an n-image class: without replacement, or all n then K - n repeats."""
        if n >= self.K:
            return rng.choice(n, self.K, replace=False).tolist()
        return list(range(n)) + rng.choice(n, self.K - n, replace=True).tolist()

    def resident(self) -> dict[int, list[Sample]] | None:
        """Every usable class of the worker's shards (one pass, a class's groups joined), or None as soon as they
        are more than the pool holds (the planner then streams; it reads those groups again from the start)."""
        classes: dict[int, list[Sample]] = {}
        for g in self._groups():
            if g is _PASS_END:
                break
            if g[0].label not in classes and len(classes) == self.pool_size:
                return None
            classes.setdefault(g[0].label, []).extend(g)
        usable = {label: g for label, g in classes.items() if self.usable(g)}
        if len(usable) < self.P:
            raise UserError(self._too_few_classes())
        return usable

    def _resident_plans(self, classes: dict[int, list[Sample]], rng: np.random.Generator) -> Iterator[Plan]:
        """Batches over resident classes: each class once per cycle in a seeded order; a batch never repeats a
        class (a cycle's last few classes open the next batch, the next cycle's order fills it without them)."""
        labels, queue = list(classes), deque()
        while True:
            if len(queue) < self.P:
                rest = [c for c in labels if c not in queue]
                queue.extend(rest[i] for i in rng.permutation(len(rest)))
            picked = [queue.popleft() for _ in range(self.P)]
            if self.negatives:
                picked = self.with_negatives(picked, classes, rng)
            chosen = [(classes[c], self.choose(rng, len(classes[c]))) for c in picked]
            yield Plan(chosen, tuple(g for c, g in classes.items() if c not in picked))

    def __iter__(self) -> Iterator[Plan]:
        rng = rng_for(TAG_PICK, *self.seed_words)
        classes = self.resident()
        if classes is not None:
            yield from self._resident_plans(classes, rng)
            return
        pool: dict[int, list[Sample]] = {}
        groups, added = self._groups(), [0]
        recent: deque[list[Sample]] = deque(maxlen=2 * self.P)
        while True:
            self._fill(pool, groups, added)
            labels = list(pool)
            picked = [labels[i] for i in rng.choice(len(labels), self.P, replace=False)]
            if self.negatives:
                picked = self.with_negatives(picked, pool, rng)
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
