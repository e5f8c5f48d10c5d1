"""The training mixture for "new products arrived": the new products' images plus a replay sample of old products,
written as one manifest that ``retrieval shards build --manifest`` reads.

    retrieval shards mix --new new_products/ --replay /data/Stanford_Online_Products --replay-classes 0.3 \
        --new-class-offset 30000 --out mix.csv
    retrieval shards build --manifest mix.csv --test-classes 0 --val-classes 0.1 --out shards/mix
    retrieval train --config configs/sop_swinv2_base.yaml --shards shards/mix model.init_from=runs/sop ...

A source is an SOP root (its ``Ebay_train.txt`` only: test products stay unseen), a manifest (``path,label[,group]``,
also what ``retrieval feedback export`` writes) or an image folder, read by the readers of ``shards build``
(:mod:`retrieval.data.sop`). The replay is a sample of whole classes (a P x K batch needs a class's images
together), drawn by ``seed``. Old classes keep their ids, so a continued proxy_anchor run keeps their proxies; a new
source's class ids are shifted by ``new_class_offset``. A new class whose id an old class has is trained as one
product with it: right for new photos of a catalogue product (a feedback export), wrong for other products,
so the count is logged and returned; ``new_class_offset`` past the old ids keeps them apart. Paths are written
absolute, so the manifest may live anywhere.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from retrieval.data.sop import SOP_FILES, Record, read_image_folder, read_manifest, read_sop, split_by_class
from retrieval.errors import UserError
from retrieval.util import write_atomic

log = logging.getLogger(__name__)


def read_source(source: str | Path, on_missing: str = "error") -> list[Record]:
    """The records of an SOP root (train list), a manifest or an image folder, with absolute paths."""
    source = Path(source)
    if source.is_dir() and (source / SOP_FILES["train"]).is_file():
        records, root = read_sop(source, on_missing)[0], source
    elif source.is_file():
        records, root = read_manifest(source, on_missing)[0], source.parent
    elif source.is_dir():
        records, root = read_image_folder(source), source
    else:
        raise UserError(f"{source}: not found (expected an SOP root, a manifest file or an image folder)")
    return [Record(r.image_id, r.class_id, r.super_class_id, str((root / r.path).resolve())) for r in records]


def mix(
    new: list[str | Path],
    replay: str | Path | None,
    replay_classes: int | float,
    out: str | Path,
    new_class_offset: int = 0,
    seed: int = 0,
) -> dict:
    """Write ``out`` (a manifest): every image of the ``new`` sources and the replay sample; returns the counts."""
    if new_class_offset < 0:
        raise UserError(f"--new-class-offset: expected 0 or more, got {new_class_offset}")
    if not new and replay is None:
        raise UserError("shards mix: give --new (one or more) or --replay, or both")
    fresh = [
        Record(r.image_id, r.class_id + new_class_offset, r.super_class_id, r.path) for s in new for r in read_source(s)
    ]
    old = read_source(replay) if replay is not None else []
    sampled = split_by_class(old, replay_classes, seed, "--replay-classes")[1] if old and replay_classes else []
    shared = {r.class_id for r in fresh} & {r.class_id for r in old}
    if shared:
        log.warning(
            "%d new class ids are also old ones (e.g. %s): each is trained as one product with the old class; "
            "pass --new-class-offset past %d if they are other products",
            len(shared),
            sorted(shared)[:5],
            max(r.class_id for r in old),
        )
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(("path", "label", "group"))
    writer.writerows((r.path, r.class_id, r.super_class_id) for r in [*fresh, *sampled])
    write_atomic(out, buffer.getvalue())
    counts = {
        "new_images": len(fresh),
        "new_classes": len({r.class_id for r in fresh}),
        "replay_images": len(sampled),
        "replay_classes": len({r.class_id for r in sampled}),
        "shared_classes": len(shared),
        "out": str(out),
    }
    log.info("mix: %s", counts)
    return counts
