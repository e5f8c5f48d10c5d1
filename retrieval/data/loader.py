"""Streaming WebDataset loader: P×K train batches and exactly-once eval batches.

Shards follow the contract of ``retrieval shards build`` (``DIR/{split}-NNNNNN.tar``, members
``jpg``/``cls``/``json``, ``stats.json``) or come from any source :mod:`retrieval.data.source` accepts
(URL prefixes, brace patterns, ``http(s)://``, ``pipe:``; labels by ``data.label_key``). Both modes are ``torch.utils.data.DataLoader`` objects with
``batch_size=None``: batches are formed inside the workers, which decode with :func:`retrieval.data.decode.decode_image` (full size: the
same decode as a query's). A train worker hands its images over through the shared slots of
:mod:`retrieval.data.handoff`; the consumer gets a batch it owns.

Train (:func:`train_loader`): every rank yields exactly ``steps - start_step`` batches
``{"image": B×3×H×W float32, "label": int64 B, "image_id": int64 B, "skipped": int}``, B = P*K.

* Shards are permuted per (seed, epoch), then rank r takes ``shards[r::world]`` (ranks see disjoint
  shards each epoch) and logical worker w of W takes ``rank_shards[w::W]``; with fewer shards than
  world × W, readers split by class group inside the shards instead (:mod:`retrieval.data.layout`).
* Each worker cycles over its shards (new seeded order per pass) and plans batches on metadata with
  :class:`retrieval.data.pk.PKPlanner` (pool of ``data.class_pool`` classes, P classes × K images, the
  small-class rule is documented there). Cycling means uneven shard sizes never change the number of
  batches, which is what keeps DDP ranks in lock-step.
* Per-rank batch g comes from logical worker ``g % W`` (its ``g // W``-th plan). The DataLoader
  collects from its workers round-robin starting at worker 0, so physical worker i serves logical
  worker ``(i + start_step) % W``; the sequence is a pure function of (seed, epoch, rank, W).
* Augmentations are seeded per batch from (seed, epoch, rank, g), so a batch is the same whichever
  process makes it. Resuming at ``start_step`` replays the skipped plans without decoding and yields
  the very batches an uninterrupted epoch would have yielded from there on.
* W = ``data.num_workers`` (0 means in-process, W = 1); never reduced, whatever the number of shards.

Eval (:func:`eval_loader`): shards ``[r::world]`` per rank, then ``[w::W]`` per worker, or a split by
sample inside the shards when they are fewer than world × W; each sample exactly once over all ranks; ranks may yield different numbers of batches (possibly none).
Batches: ``{"image", "label", "image_id", "super_label", "path": list[str], "skipped": int}``.

Small classes (train): a 1-image class is never used (no positive); ``data.small_class=repeat`` uses
a class of 2..K-1 images with all its images plus draws with replacement, ``drop`` skips it.

Bad data (undecodable JPEG, missing member): the sample is skipped and counted; each batch's
``"skipped"`` holds the skips found since the worker's previous batch, so the consumer sums them
(eval: skips after a worker's last batch come in one more batch with zero images, which consumers
skip). The first skip of a worker logs a warning. In train mode a corrupt image's slot is filled by
the next image of the same class that decodes (in shard order), so its class simply has one image
fewer; a class with no decodable image is replaced by the first spare pool class. Neither uses
random numbers, so later batches stay put.

The loaders neither draw from nor reseed the global torch RNG (own DataLoader generator, per-batch
seeding inside ``fork_rng``), so a resumed trainer's RNG stream matches an uninterrupted one. Python's ``random``
and NumPy's global generator (timm's crop, RandAugment and random erasing draw from them) are seeded per batch
and restored the same way.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from retrieval import dist
from retrieval.config.schema import DataConfig
from retrieval.data import transforms as tfm
from retrieval.data.decode import decode_image
from retrieval.data.handoff import Failure, SlotRing, dataloader
from retrieval.data.layout import Layout, split_readers, train_layout
from retrieval.data.negatives import read_pairs
from retrieval.data.pk import TAG_AUG, PKPlanner, Plan, Stream, seed_seq
from retrieval.data.samples import Sample, SkipCounter, read_samples
from retrieval.data.source import read_stats, shard_urls, split_entry
from retrieval.errors import UserError

__all__ = ["EpochSpan", "Reader", "eval_loader", "read_stats", "shard_urls", "train_loader"]

if TYPE_CHECKING:
    from retrieval.data.input_spec import InputSpec

log = logging.getLogger(__name__)

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what PIL raises on corrupt bytes


@contextlib.contextmanager
def _one_thread():
    """Per-image tensor ops on one intra-op thread, also when loading in the main process (num_workers=0).

    ToTensor/Normalize of one image are too small to split, and a batch's stack is a plain copy; on a busy
    machine the threads' barriers made decode + transform 7-10x and stacking a 32-image batch ~50x slower
    with 2 threads than with 1 (measured on the 2-core dev host under load). Never held
    across a ``yield``, so the consumer's model code keeps its threads.
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _seed_int(*words: int) -> int:
    return int(seed_seq(*words).generate_state(1, dtype="uint64")[0] >> 1)


@contextlib.contextmanager
def _seeded_rngs(seed: int):
    """Every global generator an augmentation may draw from (torch CPU, Python ``random``, NumPy), seeded with
    ``seed`` and restored after: the batch is a function of the seed, and in-process loading leaves the trainer's
    generators (saved in its checkpoints) as they were. Not torch.manual_seed: it would reseed CUDA too (~1 ms)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _decode(sample: Sample, counter: SkipCounter):
    if (sample.url, sample.key) in counter.keys:
        return None
    try:
        return decode_image(sample.jpg)
    except _DECODE_ERRORS as e:
        counter.add(sample.key, sample.url, e)
        return None


class _TrainStream(IterableDataset):
    """One rank's P×K batches; see the module docstring for the worker/step mapping."""

    def __init__(
        self,
        urls: list[str],
        data: DataConfig,
        transform,
        epoch: int,
        rank: int,
        workers: int,
        steps: int,
        start_step: int,
        layout: Layout,
        ring: SlotRing | None = None,
    ) -> None:
        self.urls, self.data, self.transform = urls, data, transform
        self.ring = ring  # the images' way to the consumer from a worker process (None: in-process loading)
        self.epoch, self.rank, self.workers, self.steps, self.start_step = epoch, rank, workers, steps, start_step
        self.layout = layout
        self.negatives = read_pairs(data.hard_negatives) if data.hard_negatives else None

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self):
        try:
            yield from self._batches()
        except UserError as e:  # travels as data: the DataLoader would wrap it in a worker traceback
            yield Failure(str(e))

    def _batches(self):
        info = get_worker_info()
        i, W = (info.id if info else 0), self.workers
        logical = (i + self.start_step) % W
        if i >= len(self):  # no batch for this worker (resume near the end of the epoch)
            return
        where = f"rank {self.rank} data worker {logical}"
        counter = SkipCounter(where)
        d = self.data
        urls, stream = self.layout.worker(logical, W)
        planner = PKPlanner(
            urls,
            d.classes_per_batch,
            d.images_per_class,
            d.class_pool,
            d.small_class,
            (d.seed, self.epoch, self.rank, logical),
            counter,
            where,
            stream,
            self.negatives,
            d.shard_cache_mb * 2**20,
        )
        for j, plan in enumerate(planner):
            g = j * W + logical
            if g >= self.steps:
                return
            if g >= self.start_step:  # earlier plans are replayed for their pool/RNG state, not decoded
                yield self._materialise(plan, g, counter)

    def _images(self, group: list[Sample], chosen: list[int], counter: SkipCounter) -> list[tuple] | None:
        """(image tensor, sample) for ``chosen``; a bad image is replaced by the class's next decodable one."""
        out = []
        for i in chosen:
            for j in range(len(group)):
                sample = group[(i + j) % len(group)]
                img = _decode(sample, counter)
                if img is not None:
                    out.append((self.transform(img), sample))
                    break
            else:
                return None
        return out

    def _materialise(self, plan: Plan, step: int, counter: SkipCounter) -> dict:
        K = self.data.images_per_class
        spares = iter(plan.spares)
        out: list[tuple] = []
        seed = _seed_int(TAG_AUG, self.data.seed, self.epoch, self.rank, step)
        with _seeded_rngs(seed), _one_thread():
            for group, chosen in plan.classes:
                imgs = self._images(group, chosen, counter)
                while imgs is None:  # no image of this class decodes: a spare class stands in
                    group = next(spares, None)
                    if group is None:
                        raise UserError(
                            f"rank {self.rank}: too many undecodable images to form a P×K batch; "
                            "run `retrieval shards verify` and rebuild the shards"
                        )
                    imgs = self._images(group, [k % len(group) for k in range(K)], counter)
                out += imgs
            labels, ids = [s.label for _, s in out], [s.image_id for _, s in out]
            if self.ring is not None and get_worker_info() is not None:  # ints travel, the images wait in a slot
                slot = self.ring.put(step - self.start_step, [x for x, _ in out])
                return {"slot": slot, "label": labels, "image_id": ids, "skipped": counter.take()}
            images = torch.stack([x for x, _ in out])
        # the integer columns as lists, like the slot's batch: the loader makes them tensors (handoff.INT_COLUMNS)
        return {"image": images, "label": labels, "image_id": ids, "skipped": counter.take()}


@dataclass(frozen=True)
class Reader:
    """Where this loader reads from in the world: rank/world (None = the process group's), host pinning."""

    rank: int | None = None
    world: int | None = None
    pin_memory: bool = False

    def place(self) -> tuple[int, int]:
        return _rank_world(self.rank, self.world)


@dataclass(frozen=True)
class EpochSpan:
    """Which P×K batches of the train stream to yield: ``steps - start_step`` batches of ``epoch``."""

    epoch: int
    steps: int
    start_step: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.start_step <= self.steps:
            raise ValueError(f"start_step {self.start_step} outside [0, steps={self.steps}]")


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    return rank, world


def train_loader(
    shards_dir: str | Path, data_cfg: DataConfig, spec: InputSpec, span: EpochSpan, reader: Reader = Reader()
) -> DataLoader:
    """Exactly ``span.steps - span.start_step`` P×K batches of ``data_cfg.train_split`` for this rank and epoch."""
    rank, world = reader.place()
    entry = split_entry(shards_dir, data_cfg.train_split)
    urls = shard_urls(shards_dir, data_cfg.train_split, entry, data_cfg.allow_listed_commands)
    layout = train_layout(urls, data_cfg, entry, span.epoch, rank, world)
    shape = (data_cfg.classes_per_batch * data_cfg.images_per_class, 3, spec.size, spec.size)
    ring = SlotRing(data_cfg.num_workers, shape) if data_cfg.num_workers else None
    dataset = _TrainStream(
        layout.urls,
        data_cfg,
        tfm.train_transform(spec, data_cfg),
        span.epoch,
        rank,
        max(data_cfg.num_workers, 1),
        span.steps,
        span.start_step,
        layout,
        ring,
    )
    return dataloader(dataset, data_cfg.num_workers, reader.pin_memory)


class _EvalStream(IterableDataset):
    """One rank's eval shards, split across workers at shard granularity, batched in the worker."""

    def __init__(self, layout: Layout, workers: int, batch_size: int, transform, img_size: int, rank: int) -> None:
        self.layout, self.workers, self.batch_size = layout, workers, batch_size
        self.transform, self.img_size, self.rank = transform, img_size, rank

    def _samples(self, w: int, counter: SkipCounter):
        urls, stream = self.layout.worker(w, self.workers)
        for j, url in enumerate(urls):
            for k, s in enumerate(read_samples([url], counter, stream.label_key)):
                if stream.share.keeps_group(k, j):
                    yield s

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info else 0
        counter = SkipCounter(f"rank {self.rank} eval worker {w}")
        batch: list[tuple] = []
        for s in self._samples(w, counter):
            img = _decode(s, counter)
            if img is None:
                continue
            batch.append((img, s))
            if len(batch) == self.batch_size:
                yield self._collate(batch, counter)
                batch = []
        if batch:
            yield self._collate(batch, counter)
        if counter.pending:  # carry the count even though no image is left
            yield self._collate([], counter)

    def _collate(self, batch: list[tuple], counter: SkipCounter) -> dict:
        """Transform the decoded images of a batch (in one go: see :func:`_one_thread`) and collate; the integer
        columns stay lists (the loader makes them tensors: :mod:`retrieval.data.handoff`)."""
        samples = [s for _, s in batch]
        with _one_thread():
            images = torch.stack([self.transform(img) for img, _ in batch]) if batch else None
        return {
            "image": images if batch else torch.empty(0, 3, self.img_size, self.img_size),
            "label": [s.label for s in samples],
            "image_id": [s.image_id for s in samples],
            "super_label": [s.super_label for s in samples],
            "path": [s.path for s in samples],
            "skipped": counter.take(),
        }


def eval_loader(
    shards_dir: str | Path,
    split: str,
    spec: InputSpec,
    batch_size: int,
    num_workers: int,
    reader: Reader = Reader(),
    label_key: str | None = None,
    allow_commands: bool = False,
) -> DataLoader:
    """Every sample of ``split`` exactly once across ranks (this rank's part; empty when it has nothing).

    ``label_key``: ``cls``, ``txt`` or ``json:FIELD``; None = the one the split's stats.json names, else ``cls``.
    ``allow_commands``: see :func:`retrieval.data.source.shard_urls`.
    """
    rank, world = reader.place()
    entry = split_entry(shards_dir, split)
    stream = Stream(label_key or entry.get("label_key", "cls"))
    layout = split_readers(shard_urls(shards_dir, split, entry, allow_commands), rank, world, num_workers, stream)
    workers = num_workers if layout.in_shard else min(num_workers, len(layout.urls))
    dataset = _EvalStream(layout, max(workers, 1), batch_size, tfm.eval_transform(spec), spec.size, rank)
    return dataloader(dataset, workers, reader.pin_memory)
