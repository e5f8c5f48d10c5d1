"""Rows added to and removed from an index folder without a rebuild: ``retrieval index add`` / ``index remove``.

    add_rows(Path("runs/sop/index"), Path("runs/sop/emb-new"))                 # new products' rows
    add_rows(Path("runs/sop/index"), Path("runs/sop/emb-fix"), replace=True)  # new vectors for ids it holds
    remove_rows(Path("runs/sop/index"), ids_file=Path("gone.txt"))            # one image id a line
    remove_rows(Path("runs/sop/index"), classes_file=Path("discontinued.txt"))  # one class id a line

Each update is a new version of the folder, written as a build is (:func:`retrieval.util.new_version`: under the
folder's lock, into a stage folder that replaces the folder with one rename), so a reader (``search``, ``serve``)
sees the old version or the new one, never half an update, and a kill at any instant leaves one of the two.
``index.json`` appends the version's record (:mod:`retrieval.index.versions`).

How each index family takes the change, and what a fresh ``index build`` over the same rows would answer:

- ``Flat``: rows are appended and removed in place; searches equal a fresh build's exactly (ids and scores).
- IVF (``IVF*,Flat``, ``IVF*,PQ*``): new rows are assigned by the quantizer trained at the build
  (``added_after_training`` counts them); recall stays the tuned one while the new rows look like the ones it was
  trained on. A removed (or replaced) row stays in its list under a negative id (``tombstones``) and every search
  skips ids < 0 (a Faiss ``IDSelector``): the answers are those of a list without it.
- HNSW: new rows join the graph; Faiss cannot delete from an HNSW graph, so a removed row is a tombstone too: never
  returned, but the graph still routes through it. Tombstones hold memory until a rebuild.

Past :data:`retrieval.index.versions.REBUILD_SHARE` of the rows, ``index.json`` (``rebuild_advised``) and the log
say that ``retrieval index build`` restores the tuned recall. Only vectors of the index's own model are added (its
weights' sha256, the check ``retrieval search`` makes), with ids the index does not hold (``--replace`` updates
those it does).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval import util
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.index import versions
from retrieval.index.folder import blocks_without, load_embeddings, read_checked, save_folder

log = logging.getLogger(__name__)


@contextlib.contextmanager
def updating(folder: Path) -> Iterator[tuple[Path, faiss.Index, dict, EmbeddingSet]]:
    """The folder's lock (refused at once if another writer holds it), its current version read and checked, and a
    stage folder for the next version, switched in with one rename when the block completes."""
    if not (folder / versions.INFO_FILE).is_file():
        raise UserError(f"--index {folder}: no {versions.INFO_FILE} (not an index folder written by `index build`)")
    try:
        with util.new_version(folder) as stage:
            index, info, catalogue = read_checked(folder)
            yield stage, index, info, catalogue
    except util.Busy as e:
        raise UserError(
            f"{folder} is being written by another `retrieval index` command (pid {e.holder}): one writer per "
            "folder; wait for it to end"
        ) from None


def add_rows(folder: Path, embeddings_dir: Path, replace: bool = False) -> dict[str, Any]:
    """Append the rows of ``embeddings_dir`` (same model, new ids; ``replace``: ids already held get the new row)."""
    t0 = time.perf_counter()
    held = EmbeddingSet.reading(embeddings_dir) if EmbeddingSet.is_folder(embeddings_dir) else contextlib.nullcontext()
    with updating(folder) as (stage, index, info, catalogue), held:
        es = load_embeddings(embeddings_dir)
        check_same_model(info, es, folder, embeddings_dir)
        held = es.ids[np.isin(es.ids, catalogue.ids)]
        if len(held) and not replace:
            raise UserError(
                f"{embeddings_dir}: {len(held)} of its {len(es)} image ids are already in the index {folder} (e.g. "
                f"{held[:5].tolist()}): pass --replace to give them these vectors, or embed new images with ids "
                f"after the index's largest, {int(catalogue.ids.max())} (`retrieval embed --id-offset "
                f"{int(catalogue.ids.max())}`)"
            )
        dead = drop_ids(index, held)
        for ids, block in blocks_without(es):
            index.add_with_ids(block, np.ascontiguousarray(ids, dtype=np.int64))
        catalogue = merge_catalogue(catalogue, es, held)
        info = _after(info, added=len(es) - len(held), removed=0, dead=dead, trained=_trained(index))
        change = {"change": "add", "embeddings": str(embeddings_dir), "added": len(es) - len(held)}
        change.update(replaced=len(held), seconds=round(time.perf_counter() - t0, 3))
        return _save(stage, index, catalogue, info, folder, change)


def remove_rows(folder: Path, ids_file: Path | None = None, classes_file: Path | None = None) -> dict[str, Any]:
    """Take out the rows whose image id is listed in ``ids_file``, or whose class is listed in ``classes_file``."""
    if (ids_file is None) == (classes_file is None):
        raise UserError("index remove: give exactly one of --ids FILE or --classes FILE")
    listed_file = ids_file or classes_file
    listed = read_id_list(listed_file)
    t0 = time.perf_counter()
    with updating(folder) as (stage, index, info, catalogue):
        column = catalogue.ids if ids_file is not None else catalogue.labels
        hit = np.isin(column, listed)
        found = np.isin(listed, column)
        what = "image ids" if ids_file is not None else "classes"
        if not hit.any():
            raise UserError(f"{listed_file}: none of its {len(listed)} {what} is in the index {folder}: nothing to do")
        if not found.all():
            log.warning("%s: %d of its %d %s are not in the index", listed_file, (~found).sum(), len(listed), what)
        gone = catalogue.ids[hit]
        dead = drop_ids(index, gone)
        catalogue = merge_catalogue(catalogue, None, gone)
        info = _after(info, added=0, removed=len(gone), dead=dead, trained=_trained(index))
        change = {"change": "remove", what.replace("image ", ""): str(listed_file), "removed": len(gone)}
        change.update(not_found=int((~found).sum()), seconds=round(time.perf_counter() - t0, 3))
        return _save(stage, index, catalogue, info, folder, change)


# ------------------------------------------------------------------------------------------------ parts
def read_id_list(path: Path) -> np.ndarray:
    """The integers of a file of one id a line (blank lines and ``#`` comments skipped), sorted and unique."""
    if not Path(path).is_file():
        raise UserError(f"{path}: not found (expected a file of one id a line)")
    values = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            values.append(int(text))
        except ValueError:
            raise UserError(f"{path}:{lineno}: expected one integer id, got {line.strip()!r}") from None
    if not values:
        raise UserError(f"{path}: lists no id")
    return np.unique(np.asarray(values, dtype=np.int64))


def check_same_model(info: dict, es: EmbeddingSet, folder: Path, embeddings_dir: Path) -> None:
    """Vectors of another model live in another space, even at the same dimension: refused, as search refuses a
    query model whose weights' sha256 is not the index's."""
    if es.dim != info["dim"]:
        raise UserError(f"{embeddings_dir}: vectors of dimension {es.dim}, the index {folder} holds {info['dim']}")
    mine = (info.get("model_sha256"), bool(info.get("untrained")))
    theirs = (es.meta.get("model_sha256"), bool(es.meta.get("untrained")))
    same_start = mine[0] is None and info.get("model") == es.meta.get("model")  # untrained weights carry no sha256
    if mine != theirs or (mine[0] is None and not same_start):
        raise UserError(
            f"{embeddings_dir}/meta.json: embedded by {es.meta.get('model')!r} (weights sha256 "
            f"{str(theirs[0])[:12]}), but the index {folder} holds embeddings of {info.get('model')!r} (sha256 "
            f"{str(mine[0])[:12]}): two models' vectors are not comparable; embed with the index's model or rebuild"
        )


def drop_ids(index: faiss.IndexIDMap2, ids: np.ndarray) -> int:
    """Take the rows of ``ids`` out of ``index``; returns how many became tombstones instead.

    Only an index that stores its rows in order (Flat, PQ, SQ: ``IndexFlatCodes``) renumbers them as
    ``IndexIDMap2.remove_ids`` assumes; an IVF keeps its rows' numbers in its lists (the id map's compaction would
    then name other images: a silent wrong answer) and an HNSW graph cannot delete at all. Their removed rows keep
    their place under a unique negative id, which searches filter out (:data:`retrieval.index.params.LIVE_IDS`)."""
    if not len(ids):
        return 0
    if isinstance(faiss.downcast_index(index.index), faiss.IndexFlatCodes):
        index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
        return 0
    id_map = faiss.vector_to_array(index.id_map)
    rows = np.flatnonzero(np.isin(id_map, ids))
    id_map[rows] = min(int(id_map.min()), -1) - 1 - np.arange(len(rows))  # below -1: -1 pads a short result
    faiss.copy_array_to_vector(id_map, index.id_map)
    index.construct_rev_map()
    return len(rows)


def merge_catalogue(catalogue: EmbeddingSet, added: EmbeddingSet | None, gone: np.ndarray) -> EmbeddingSet:
    """The catalogue columns without the rows of ``gone``, with ``added``'s rows, ordered by image id (searches map
    ids to rows by a binary search)."""
    keep = ~np.isin(catalogue.ids, gone)
    parts = [(catalogue, keep)] + ([(added, np.ones(len(added), bool))] if added is not None else [])
    columns = {k: np.concatenate([getattr(s, k)[m] for s, m in parts]) for k in ("ids", "labels", "super_labels")}
    has_paths = any(s.paths for s, _ in parts)
    paths = [p for s, m in parts for p in (np.asarray(s.paths, dtype=object)[m] if s.paths else [""] * int(m.sum()))]
    order = np.argsort(columns["ids"], kind="stable")
    empty = np.zeros((0, catalogue.dim), np.float32)
    sorted_paths = [paths[i] for i in order] if has_paths else []
    cols = {k: v[order] for k, v in columns.items()}
    return EmbeddingSet(empty, cols["ids"], cols["labels"], cols["super_labels"], sorted_paths, catalogue.meta)


def _trained(index: faiss.IndexIDMap2) -> bool:
    """Whether the index assigns rows with something trained at the build (IVF's quantizer, PQ's codebooks)."""
    inner = faiss.downcast_index(index.index)
    return faiss.try_extract_index_ivf(inner) is not None or "PQ" in type(inner).__name__


def _after(info: dict, added: int, removed: int, dead: int, trained: bool) -> dict:
    """``info`` carried to the next version: the counts since the build, tombstones, rows added after training."""
    info = {**info}
    since = dict(info.get("since_build", {}))
    since["added"] = int(since.get("added", 0)) + added
    since["removed"] = int(since.get("removed", 0)) + removed
    info["since_build"] = since
    info["tombstones"] = int(info.get("tombstones", 0)) + dead
    if trained:
        info["added_after_training"] = int(info.get("added_after_training", 0)) + added
    return info


def _save(stage: Path, index, catalogue: EmbeddingSet, info: dict, folder: Path, change: dict) -> dict:
    info["count"] = len(catalogue)
    info["rebuild_advised"] = versions.drift(info)
    if info["rebuild_advised"]:
        log.warning("index %s: %s", folder, info["rebuild_advised"])
    return save_folder(stage, index, catalogue, info, folder, change)
