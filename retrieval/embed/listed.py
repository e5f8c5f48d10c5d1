"""New product photos to an embeddings set without shards: images listed in a manifest or found in an image folder.

    retrieval embed --model runs/sop --manifest new.csv --out runs/sop/emb-new --id-offset 200000
    retrieval embed --model runs/sop --image-folder new_products/ --out E --id-offset 200000 --class-offset 30000

For the few hundred photos of the day's new products: the manifest (``path,label[,group]``) and the image folder
(one subfolder per product) are read by the readers of ``retrieval shards build`` (:mod:`retrieval.data.sop`), every
image is decoded by the catalogue's decoder (:mod:`retrieval.data.decode`) and prepared by the model's own input
spec (an :class:`~retrieval.embed.embedder.Embedder`, the one ``retrieval search`` uses), through the one model
loader with its checks. One process; the set is written as ``retrieval embed`` writes one (merged layout, the
folder replaced as one unit, ``meta.json`` with the model's sha256), so ``index add`` takes it.

Image ids are the readers' (the manifest's data row, the folder's sorted order, from 1) plus ``id_offset``, class ids
plus ``class_offset``: give offsets past the catalogue's largest so that the new rows never take an id the index
holds (``index add`` refuses held ids and names the offset to use). Paths are stored absolute. An image that does
not decode is left out, named in the log and counted in ``meta.json`` (``skipped``), as the shard loader counts
them; a listed file that is missing is an error unless ``on_missing="skip"``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval import util
from retrieval.data.decode import read_image
from retrieval.data.input_spec import InputSpec
from retrieval.data.sop import Record, read_image_folder, read_manifest
from retrieval.embed.embedder import Embedder
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.model.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class ListedJob:
    """What to embed (a manifest or an image folder), into which folder, with which id and class offsets."""

    out: Path
    manifest: Path | None = None
    image_folder: Path | None = None
    id_offset: int = 0
    class_offset: int = 0
    batch_size: int = 64
    dtype: str = "float32"
    on_missing: str = "error"


def listed_records(job: ListedJob) -> tuple[Path, list[Record], dict[str, str]]:
    """(root the paths are relative to, records, source) of the job's manifest or image folder."""
    if (job.manifest is None) == (job.image_folder is None):
        raise UserError("embed: give exactly one of --shards, --manifest, --image-folder")
    if job.manifest is not None:
        records, missing = read_manifest(job.manifest, job.on_missing)
        root, source = Path(job.manifest).parent, {"kind": "manifest", "path": str(job.manifest)}
    else:
        records, missing = read_image_folder(job.image_folder), []
        root, source = Path(job.image_folder), {"kind": "image_folder", "path": str(job.image_folder)}
    if not records:
        raise UserError(f"{source['path']}: no image left to embed ({len(missing)} listed files are missing)")
    return root, records, source


def embed_listed(loaded: LoadedModel, spec: InputSpec, job: ListedJob) -> EmbeddingSet:
    """Embed the job's images with ``loaded`` (prepared by ``spec``) and write the set to ``job.out`` as one unit."""
    root, records, source = listed_records(job)  # bad input fails here, before the folder is locked
    EmbeddingSet.check_replaceable(job.out)
    embedder = Embedder(dataclasses.replace(loaded, spec=spec), job.batch_size)
    try:
        with util.new_version(job.out) as stage:
            t0 = time.perf_counter()
            vectors, kept, skipped = _embed(embedder, root, records, job.batch_size)
            seconds = time.perf_counter() - t0
            es = _as_set(vectors, kept, root, job)
            es.meta = {**loaded.provenance, "source": source, "split": "listed", "input": spec.to_dict()}
            es.meta.update(img_size=spec.size, set_id=uuid.uuid4().hex, skipped=len(skipped), layout="merged")
            es.meta.update(seconds=round(seconds, 3), images_per_s=round(len(kept) / max(seconds, 1e-9), 1))
            es.meta["skipped_paths"] = skipped[:100]
            es.save(stage, dtype=job.dtype)
            EmbeddingSet.load(stage)  # refuses NaN or all-zero vectors before they replace a good set
    except util.Busy as e:
        raise UserError(f"{job.out} is being written or read by another process (pid {e.holder}): wait") from None
    log.info("wrote %d embeddings of %s (%d undecodable) to %s", len(es), source["path"], len(skipped), job.out)
    return es


def _embed(embedder: Embedder, root: Path, records: list[Record], batch: int) -> tuple[np.ndarray, list, list]:
    """The vectors of the records that decode (a batch decoded at a time), those records, the paths that did not."""
    parts, kept, skipped = [], [], []
    with util.progress_bar(len(records), "embed listed images", "img") as bar:
        for start in range(0, len(records), batch):
            images = []
            for rec in records[start : start + batch]:
                try:
                    images.append(read_image(root / rec.path))
                    kept.append(rec)
                except Exception as e:  # PIL raises many types for bad data: all mean "not an image"
                    log.warning("%s: not a readable image (%s: %s), left out", root / rec.path, type(e).__name__, e)
                    skipped.append(str(root / rec.path))
            if images:
                parts.append(embedder.embed(images))
            bar.update(len(records[start : start + batch]))
    if not kept:
        raise UserError(f"{root}: none of the {len(records)} listed images could be read")
    return np.concatenate(parts), kept, skipped


def _as_set(vectors: np.ndarray, kept: list[Record], root: Path, job: ListedJob) -> EmbeddingSet:
    """The rows ordered by image id, as every embeddings set is."""
    ids = np.array([r.image_id + job.id_offset for r in kept], np.int64)
    labels = np.array([r.class_id + job.class_offset for r in kept], np.int64)
    supers = np.array([r.super_class_id for r in kept], np.int64)
    paths = [str((root / r.path).resolve()) for r in kept]
    order = np.argsort(ids, kind="stable")
    return EmbeddingSet(vectors[order], ids[order], labels[order], supers[order], [paths[i] for i in order], {})
