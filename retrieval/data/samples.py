"""Shard samples as the planner and the corpus reader see them: the contract's fields (:class:`Sample`,
:func:`parse_sample`), skips counted once per sample (:class:`SkipCounter`), tars read in order
(:func:`read_samples`), contiguous class groups, and what a loader worker keeps of its shards (:class:`ShardCache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import webdataset as wds
from webdataset import tariterators

from retrieval.data.source import open_shard

log = logging.getLogger(__name__)


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


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def stable_int(text: str) -> int:
    """A non-negative int64 for a non-numeric label or key (sha1: the same in every process and run)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") >> 1


def _as_int(value: object) -> int:
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else stable_int(text)


def _label(raw: dict, meta: dict, label_key: str) -> int:
    """The label by ``data.label_key``: ``cls`` (an integer, as webdataset defines it), ``txt`` or ``json:FIELD``
    (a non-numeric value is hashed). A ``.cls`` that is no integer is malformed: the sample is skipped and counted
    (a text class hashed silently would be a label nobody chose)."""
    if label_key.startswith("json:"):
        field = label_key[5:]
        if field not in meta:
            raise ValueError(f"no field {field!r} in its .json (data.label_key={label_key})")
        return _as_int(meta[field])
    if label_key not in raw:
        raise ValueError(f"no .{label_key} member (data.label_key={label_key})")
    text = raw[label_key].decode("utf-8")
    if label_key == "cls" and not text.strip().lstrip("-").isdigit():
        raise ValueError(
            f"its .cls holds {text[:20]!r}, expected an integer class id (text labels: data.label_key=txt)"
        )
    return _as_int(text)


def parse_sample(raw: dict, label_key: str = "cls") -> Sample:
    """Contract fields from a webdataset sample dict; ``ValueError`` when a member is missing or malformed.

    The image is the first of ``.jpg/.jpeg/.png/.webp``; the image id is ``image_id`` of the ``.json`` or the
    key (hashed when not numeric).
    """
    key = raw.get("__key__", "?")
    image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    if image is None:
        raise ValueError(f"sample {key} has no image member ({'/'.join(IMAGE_EXTS)})")
    meta = json.loads(raw["json"]) if "json" in raw else {}
    if not isinstance(meta, dict):
        meta = {}
    return Sample(
        key,
        raw.get("__url__", ""),
        _label(raw, meta, label_key),
        _as_int(meta.get("image_id", key)),
        int(meta.get("super_class_id", 0)),
        str(meta.get("path", key)),
        image,
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


def _tar_members(url: str):
    with open_shard(url) as stream:
        yield from tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=wds.warn_and_continue)


def read_samples(urls: Sequence[str], counter: SkipCounter, label_key: str = "cls") -> Iterator[Sample]:
    """Samples of ``urls`` in order; malformed samples are counted and skipped, corrupt tars warned.

    An unreachable remote shard raises a UserError (after retries): a rank must not silently see less data.
    """
    for url in urls:
        for raw in tariterators.group_by_keys(_tar_members(url), handler=wds.warn_and_continue):
            try:
                yield parse_sample(raw, label_key)
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


T = TypeVar("T")


class ShardCache:
    """What one worker read of each shard, kept after its first complete read while the bytes fit in ``budget``.

    Why our own: a pool smaller than the worker's classes passes over its shards several times an epoch (the
    demo: 255 classes, a pool of 32, 5 passes), and each pass re-parsed every tar member: 8 s of a 1-core loader
    worker's 54 s over the demo's 800 steps, CPU taken beside the training step on a small machine, and a
    download per pass for a remote shard. webdataset's caches keep remote shards on disk, not parsed samples. A
    pass's content is a pure function of the shard bytes, so replaying it changes no plan. A shard read only in
    part (the epoch ended, or it did not fit) is read again next time; skips are counted once per sample anyway.
    """

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.kept: dict[Hashable, list] = {}

    def read(self, key: Hashable, items: Iterable[T], size: Callable[[T], int]) -> Iterator[T]:
        """``items`` (the shard's read, only started if not kept), keeping them if the whole read fits."""
        if key in self.kept:
            yield from self.kept[key]
            return
        kept: list[T] | None = [] if self.budget > 0 else None
        total = 0
        for item in items:
            if kept is not None:
                total += size(item)
                if self.used + total > self.budget:
                    kept = None
                else:
                    kept.append(item)
            yield item
        if kept is not None:
            self.kept[key] = kept
            self.used += total


def sample_bytes(sample: Sample) -> int:
    return len(sample.jpg) + 256  # 256: the Sample's other fields, roughly


def group_bytes(group: list[Sample]) -> int:
    return sum(map(sample_bytes, group))
