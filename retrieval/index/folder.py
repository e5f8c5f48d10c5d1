"""One Faiss index (with image ids) over an embeddings set: build, save, load, search.

Built by ``retrieval index build`` (:mod:`retrieval.cli.index`); loaded by search and the service.

The index is ``IndexIDMap2`` over ``faiss.index_factory(d, FACTORY, inner product)``: searches return
image ids, not row numbers. Factories that need training (IVF, PQ) are trained on a random sample
(``--train-sample``). ``--gpu`` places the index with Faiss' GPU cloner: one GPU, or several as
shards (``--shard``: each GPU holds a slice, results merged like ``IndexShards``; for catalogues beyond
one GPU's memory) or replicas (the default: each GPU holds everything, queries are split; throughput).
On a Faiss without GPU support (faiss-cpu) everything runs on CPU and the log says so. Training runs
on the GPUs when placed there; the saved ``index.faiss`` is always the CPU form (``write_index``).

The output folder holds ``index.faiss``, ``index.json`` (dim, metric, count, factory, created, source
embeddings, model from the embeddings' ``meta.json``, search parameters, a build id) and the embeddings set's
catalogue columns without the vectors (ids, labels, super labels, paths, meta), so searches can name what they find.

The folder is written as one unit (:func:`building`): under its lock (``.NAME.lock`` beside it: a second build
into the same ``--out`` is refused before any work), into a new folder beside it that replaces the old one with
one rename once complete (:func:`retrieval.util.new_version`); a kill leaves the old folder or the new one, and
what it left beside them is removed by the next build. :meth:`IndexFolder.load` checks that the index,
``index.json`` and the catalogue columns agree (count, dimension, build id, model sha256) and names the file at
fault, so a folder mixed by hand is refused rather than answered from.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval import knn, util
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.index import versions
from retrieval.index.params import default_params, live_params, set_search_params
from retrieval.util import atomic_path, write_atomic

log = logging.getLogger(__name__)

INDEX_FILE, INFO_FILE = "index.faiss", versions.INFO_FILE
SEARCH_FILE = "search-queries.json"  # the summary of the last `retrieval search --queries` against the index


# ------------------------------------------------------------------------------------------- placement
def parse_gpus(spec: str) -> list[int]:
    """``auto`` (all GPUs Faiss sees) | ``none`` | ``all`` | ``0,1,...`` -> GPU ids; [] when CPU."""
    spec = spec.strip().lower()
    if spec == "none":
        return []
    have = knn.faiss_has_gpu()
    if spec in ("auto", "all"):
        if not have:
            log.info("index: Faiss has no GPU support or sees no GPU (faiss-cpu): building and searching on CPU")
            return []
        return list(range(faiss.get_num_gpus()))
    try:
        gpus = [int(g) for g in spec.split(",") if g != ""]
    except ValueError:
        raise UserError(f"--gpu: expected auto, none, all or a list like 0,1 — got {spec!r}") from None
    if not have:
        log.warning("index: --gpu %s asked, but this Faiss has no GPU support (faiss-cpu): using CPU", spec)
        return []
    return gpus


def place(index: faiss.Index, gpus: list[int], shard: bool) -> faiss.Index:
    """CPU index -> GPU(s) via the cloner (shards or replicas); unsupported types stay on CPU (logged)."""
    if not gpus:
        return index
    try:
        return knn.faiss_to_gpu(index, gpus, shard=shard)
    except RuntimeError as e:  # e.g. HNSW has no GPU implementation
        log.warning("index: cannot place this index on GPU (%s); staying on CPU", str(e).splitlines()[0])
        return index


# ------------------------------------------------------------------------------------------------ build
def make_base(d: int, factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"--factory {factory!r}: not a Faiss factory string ({str(e).splitlines()[0]})") from None


def train_base(base: faiss.Index, sample: np.ndarray, factory: str, gpus: list[int] | None = None) -> faiss.Index:
    """Train ``base`` on ``sample`` when it needs training (IVF, PQ); on GPU when placed there. Returns the CPU form."""
    if base.is_trained:
        return base
    t0 = time.perf_counter()
    log.info("index: training %s on %d vectors", factory, len(sample))
    placed = place(base, gpus or [], shard=False)  # training wants the whole sample on one device
    try:
        placed.train(np.ascontiguousarray(sample, dtype=np.float32))
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"--factory {factory!r}: training on {len(sample)} vectors failed ({msg})") from None
    if placed is not base:
        base = faiss.index_gpu_to_cpu(placed)
    log.info("index: trained %s on %d vectors in %.1f s", factory, len(sample), time.perf_counter() - t0)
    return base


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` distinct rows of ``n``, sorted (a sorted gather reads memory-mapped parts in order)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


def blocks_without(es: EmbeddingSet, skip: np.ndarray | None = None):
    """``es.blocks()`` without the rows whose image id is in ``skip`` (sorted, unique)."""
    for ids, block in es.blocks():
        if skip is None:
            yield ids, block
            continue
        keep = ~np.isin(ids, skip, assume_unique=True)
        yield ids[keep], np.ascontiguousarray(block[keep])


def fill(
    base: faiss.Index, es: EmbeddingSet, skip: np.ndarray | None = None, progress: str | None = "index: add"
) -> faiss.Index:
    """``IndexIDMap2(base)`` with the rows of ``es`` added block by block (never all vectors twice), but those whose
    image id is in ``skip`` (:func:`blocks_without`); ``progress`` names the progress bar (ETA), None: none."""
    index = faiss.IndexIDMap2(base)
    log.info("index: adding %d vectors of dimension %d", len(es) - (0 if skip is None else len(skip)), es.dim)
    for ids, block in knn.bar(blocks_without(es, skip), progress, total=es.block_count()):
        index.add_with_ids(block, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def build_index(es: EmbeddingSet, factory: str = "Flat", train_sample: int = 100_000, gpus=None, seed: int = 0):
    """Train (on a sample) and fill ``IndexIDMap2(index_factory(d, FACTORY, IP))``; returns the CPU form."""
    base = make_base(es.dim, factory)
    if not base.is_trained:
        base = train_base(base, es.embeddings[sample_rows(len(es), train_sample, seed)], factory, gpus)
    return fill(base, es)


def load_embeddings(embeddings_dir: Path, columns=None) -> EmbeddingSet:
    """Our embeddings folder or another tool's (``columns``: :class:`~retrieval.embed.interop.Columns`)."""
    es = EmbeddingSet.open(embeddings_dir, columns)
    if len(np.unique(es.ids)) != len(es):
        raise UserError(f"{embeddings_dir}: image ids must be unique (ids.npy, --ids or the image_id column)")
    return es


@contextlib.contextmanager
def building(out: Path, embeddings_dir: Path, columns=None) -> Iterator[tuple[Path, EmbeddingSet]]:
    """The whole build of the index folder ``out`` from ``embeddings_dir``: ``out``'s lock (checked before any work),
    the embeddings held against a re-embed while they are read (our sets; another tool's are read as they are), and
    a stage folder to write into, which replaces ``out`` in one rename when the block completes (removed if it
    fails). Yields (stage, embeddings)."""
    _check_out(out, embeddings_dir)
    held = EmbeddingSet.reading(embeddings_dir) if EmbeddingSet.is_folder(embeddings_dir) else contextlib.nullcontext()
    try:
        with util.new_version(out) as stage, held:
            yield stage, load_embeddings(embeddings_dir, columns)
    except util.Busy as e:
        raise UserError(
            f"{out} is being written by another `retrieval index build` (pid {e.holder}): one build per folder; "
            "wait for it to end, or choose another --out"
        ) from None


def _check_out(out: Path, embeddings_dir: Path) -> None:
    """``out`` is replaced as a whole: never the embeddings it is built from, nor a folder that is no index."""
    a, b = out.resolve(), embeddings_dir.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UserError(
            f"--out {out}: must lie outside --embeddings {embeddings_dir} (the index folder is replaced whole)"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / INFO_FILE).is_file():
        raise UserError(
            f"--out {out}: a folder that holds no {INFO_FILE} (not an index folder); an index build replaces its "
            "--out whole: choose a new or an index folder"
        )


def save_folder(
    stage: Path, index: faiss.Index, es: EmbeddingSet, info: dict[str, Any], out: Path, change: dict | None = None
) -> dict[str, Any]:
    """``index.faiss``, the catalogue columns and ``index.json`` (with provenance added to ``info``) into the stage
    folder of ``out`` (:func:`building`); the three carry one build id that :meth:`IndexFolder.load` checks.
    ``index.json`` is the next version of ``out`` (:mod:`retrieval.index.versions`): ``change`` says what this
    version did (default: a build from ``info["embeddings"]``)."""
    build_id = uuid.uuid4().hex
    with atomic_path(stage / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    catalogue = EmbeddingSet(es.embeddings[:0], es.ids, es.labels, es.super_labels, es.paths, {**es.meta})
    catalogue.meta.update(dim=es.dim, build_id=build_id)
    catalogue.save(stage, vectors=False)
    info = {
        "dim": es.dim,
        "metric": "inner_product",
        "count": int(index.ntotal) - int(info.get("tombstones", 0)),  # live rows (HNSW keeps removed ones filtered)
        **{k: v for k, v in info.items() if k not in ("count", "version", "versions")},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": es.meta.get("model"),
        "untrained": bool(es.meta.get("untrained")),
        "model_sha256": es.meta.get("model_sha256"),  # search refuses a model with other weights
        "faiss_version": faiss.__version__,
        "build_id": build_id,
    }
    change = change or {"change": "build", "factory": info.get("factory"), "embeddings": info.get("embeddings")}
    info = versions.append_version(info, versions.previous_versions(out), change)
    write_atomic(stage / INFO_FILE, json.dumps(info, indent=1) + "\n")
    log.info(
        "index: %s over %d x %d written to %s (version %d)", info["factory"], len(es), es.dim, out, info["version"]
    )
    return info


def build_folder(
    embeddings_dir: Path,
    out: Path,
    factory: str = "Flat",
    gpu: str = "auto",
    shard: bool = False,
    train_sample: int = 100_000,
    columns=None,
) -> dict[str, Any]:
    """Build and save ``index.faiss`` + ``index.json`` with the catalogue columns; returns index.json's content."""
    with building(out, embeddings_dir, columns) as (stage, es):
        gpus = parse_gpus(gpu)
        t0 = time.perf_counter()
        index = build_index(es, factory, train_sample, gpus)
        info = {
            "factory": factory,
            "embeddings": str(embeddings_dir),
            "gpus": gpus,
            "shard": shard,
            "train_sample": min(train_sample, len(es)),
            "build_seconds": round(time.perf_counter() - t0, 3),
            "search_params": default_params(factory),
        }
        return save_folder(stage, index, es, info, out)


# ----------------------------------------------------------------------------------------- load/search
def read_info(folder: Path) -> dict[str, Any]:
    for name in (INFO_FILE, INDEX_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} not found: is {folder} a folder written by `retrieval index build`?")
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / INFO_FILE}: not valid JSON ({e}); rebuild the index") from None
    if not isinstance(info, dict) or not isinstance(info.get("dim"), int) or not isinstance(info.get("count"), int):
        raise UserError(f"{folder / INFO_FILE}: expected an object with integer 'dim' and 'count'; rebuild the index")
    return info


def read_checked(folder: Path) -> tuple[faiss.Index, dict[str, Any], EmbeddingSet]:
    """The index, ``index.json`` and the catalogue columns of ``folder``, refused (one line naming the file) unless
    they agree: a folder whose parts come from different builds would answer with wrong or missing images."""
    info = read_info(folder)
    try:
        index = faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError as e:
        raise UserError(
            f"{folder / INDEX_FILE}: not a readable Faiss index (truncated or corrupt: {str(e).splitlines()[0][:120]}); "
            "rebuild it with `retrieval index build`"
        ) from None
    catalogue = EmbeddingSet.load(folder, vectors=False)
    where = folder / INFO_FILE
    if index.d != info["dim"]:
        raise UserError(f"{where}: dim {info['dim']}, but {INDEX_FILE} holds vectors of dimension {index.d}")
    dead = int(info.get("tombstones", 0))  # removed rows an HNSW graph keeps, filtered at search time
    if index.ntotal != info["count"] + dead:
        extra = f" + {dead} removed" if dead else ""
        raise UserError(f"{where}: count {info['count']}{extra}, but {INDEX_FILE} holds {index.ntotal} vectors")
    if len(catalogue) != info["count"]:
        raise UserError(
            f"{folder}: the catalogue columns (ids.npy ...) hold {len(catalogue)} rows, {INDEX_FILE} {info['count']}: "
            "parts of different builds; rebuild the index"
        )
    for key in ("build_id", "model_sha256"):  # absent in folders of older builds: nothing to compare
        a, b = info.get(key), catalogue.meta.get(key)
        if a and b and a != b:
            raise UserError(
                f"{where}: {key} {str(a)[:12]}, but the catalogue's meta.json has {str(b)[:12]}: parts "
                "of different builds; rebuild the index"
            )
    return index, info, catalogue


@dataclass
class IndexFolder:
    """A loaded index folder: the Faiss index (placed per ``gpu``), ``index.json`` and the catalogue columns.

    Load it once and keep it (a service, a batch of searches); nothing is cached behind the caller's back.
    Image ids map to catalogue rows through one sorted array (no per-image Python objects).
    """

    path: Path
    index: faiss.Index
    info: dict[str, Any]
    catalogue: EmbeddingSet

    @classmethod
    def load(cls, folder: str | Path, gpu: str = "none", shard: bool = False) -> IndexFolder:
        """Read and check the folder (:func:`read_checked`), then place the index (``gpu``)."""
        folder = Path(folder)
        for _ in range(3):  # a build that replaced the folder while it was read: read the new one whole
            before = util.folder_identity(folder)
            index, info, catalogue = read_checked(folder)
            if util.folder_identity(folder) == before:
                break
        params = info.get("search_params", {})
        set_search_params(index, params.get("nprobe"), params.get("ef_search"))
        gpus = parse_gpus(gpu)
        if gpus and info.get("tombstones"):  # the removed-row filter is a CPU search parameter
            log.warning("index: %s holds removed rows (index remove): searching on CPU; rebuild it for GPUs", folder)
            gpus = []
        return cls(folder, place(index, gpus, shard), info, catalogue)

    @staticmethod
    def find(root: str | Path) -> list[Path]:
        """Index folders at most two levels under ``root`` (``RUN/index``, ``RUN/indexes/ivf``)."""
        root = Path(root)
        return sorted(p.parent for pattern in ("*/" + INFO_FILE, "*/*/" + INFO_FILE) for p in root.glob(pattern))

    def save_search_summary(self, summary: dict, queries: str, k: int) -> Path:
        """What ``retrieval search --queries`` found, beside the index it searched (the report reads it); a rebuilt
        index replaces its folder, and this summary of the old index goes with it."""
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        record = {"summary": {**summary, "k": k, "queries_file": queries, "created": created}}
        return write_atomic(self.path / SEARCH_FILE, json.dumps(record, indent=1) + "\n")

    @staticmethod
    def read_search_summary(folder: str | Path) -> dict | None:
        path = Path(folder) / SEARCH_FILE
        try:
            summary = json.loads(path.read_text())["summary"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        return {**summary, "source": str(path)} if isinstance(summary, dict) else None

    def set_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Override the search parameters index.json holds (IVF ``nprobe``, HNSW ``efSearch``) for later searches."""
        for name, value in (("--nprobe", nprobe), ("--ef", ef_search)):
            if value is not None and value < 1:
                raise UserError(f"{name}: expected a positive integer, got {value}")
        set_search_params(self.index, nprobe, ef_search)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ``(scores, image ids)`` of each query row; id -1 pads when the index holds fewer than k."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.info["dim"]:
            raise UserError(f"queries have dimension {q.shape[1]}, the index in {self.path} has {self.info['dim']}")
        if not np.isfinite(q).all():
            raise UserError("queries contain NaN or inf: the model that embedded them is broken")
        if self.info.get("tombstones"):  # removed rows an IVF or HNSW still holds carry negative ids: never returned
            # faiss.contrib.torch_utils (imported by pytorch-metric-learning) replaces Index.search with a version
            # without `params`; it keeps the numpy one as search_numpy
            search = getattr(self.index, "search_numpy", self.index.search)
            return search(q, k, params=live_params(self.index))
        return self.index.search(q, k)

    def rows(self, image_ids: np.ndarray) -> np.ndarray:
        """Catalogue rows of ``image_ids`` (-1 where an id is not in the catalogue, e.g. the -1 padding)."""
        ids = self.catalogue.ids
        # an embeddings set keeps its rows ordered by id (both layouts): a binary search, no O(N log N) sort per call
        ordered = bool(len(ids) < 2 or ids[0] < ids[-1]) and bool((ids[1:] > ids[:-1]).all())
        order = None if ordered else np.argsort(ids, kind="stable")
        pos = np.clip(np.searchsorted(ids, image_ids, sorter=order), 0, max(len(ids) - 1, 0))
        rows = (pos if order is None else order[pos]) if len(ids) else np.full(np.shape(image_ids), -1)
        return np.where(len(ids) and ids[rows] == image_ids, rows, -1)
