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
embeddings, model from the embeddings' ``meta.json``, search parameters) and the embeddings set's catalogue
columns without the vectors (ids, labels, super labels, paths, meta), so searches can name what they find.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval import knn
from retrieval.embedding import EmbeddingSet
from retrieval.errors import UserError
from retrieval.util import atomic_path, write_atomic

log = logging.getLogger(__name__)

INDEX_FILE, INFO_FILE = "index.faiss", "index.json"


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
def _set_search_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and nprobe:
        ivf.nprobe = min(nprobe, ivf.nlist)
    if isinstance(inner, faiss.IndexHNSW) and ef_search:
        inner.hnsw.efSearch = ef_search


def build_index(
    embeddings: np.ndarray,
    ids: np.ndarray,
    factory: str = "Flat",
    train_sample: int = 100_000,
    gpus: list[int] | None = None,
    shard: bool = False,
    seed: int = 0,
) -> faiss.Index:
    """Train (on a sample) and fill ``IndexIDMap2(index_factory(d, factory, IP))``; returns the CPU form."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    try:
        base = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"--factory {factory!r}: not a Faiss factory string ({str(e).splitlines()[0]})") from None
    if not base.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(x), size=min(train_sample, len(x)), replace=False))
        t0 = time.perf_counter()
        log.info("index: training %s on %d of %d vectors", factory, len(rows), len(x))
        placed = place(base, gpus or [], shard=False)  # training wants the whole sample on one device
        try:
            placed.train(x[rows])
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            raise UserError(f"--factory {factory!r}: training on {len(rows)} vectors failed ({msg})") from None
        if placed is not base:
            base = faiss.index_gpu_to_cpu(placed)
        log.info("index: trained %s on %d vectors in %.1f s", factory, len(rows), time.perf_counter() - t0)
    index = faiss.IndexIDMap2(base)
    log.info("index: adding %d vectors of dimension %d to %s", len(x), x.shape[1], factory)
    index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def _default_params(factory: str) -> dict[str, int]:
    """Search parameters stored in index.json; searches may override them."""
    params = {}
    if "IVF" in factory.upper():
        params["nprobe"] = 32
    if "HNSW" in factory.upper():
        params["ef_search"] = 128
    return params


def build_folder(
    embeddings_dir: Path,
    out: Path,
    factory: str = "Flat",
    gpu: str = "auto",
    shard: bool = False,
    train_sample: int = 100_000,
) -> dict[str, Any]:
    """Build and save ``index.faiss`` + ``index.json`` with the catalogue columns; returns index.json's content."""
    es = EmbeddingSet.load(embeddings_dir)
    if len(np.unique(es.ids)) != len(es):
        raise UserError(f"{embeddings_dir}/ids.npy: ids must be unique")
    gpus = parse_gpus(gpu)
    t0 = time.perf_counter()
    index = build_index(es.vectors32(), es.ids, factory, train_sample, gpus, shard)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    es.save(out, vectors=False)
    info = {
        "dim": es.dim,
        "metric": "inner_product",
        "count": int(index.ntotal),
        "factory": factory,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "embeddings": str(embeddings_dir),
        "model": es.meta.get("model"),
        "untrained": bool(es.meta.get("untrained")),
        "gpus": gpus,
        "shard": shard,
        "train_sample": min(train_sample, len(es)),
        "build_seconds": round(seconds, 3),
        "faiss_version": faiss.__version__,
        "search_params": _default_params(factory),
    }
    write_atomic(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
    log.info("index: %s over %d x %d written to %s in %.1f s", factory, len(es), es.dim, out, seconds)
    return info


# ----------------------------------------------------------------------------------------- load/search
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
        folder = Path(folder)
        for name in (INFO_FILE, INDEX_FILE):
            if not (folder / name).is_file():
                raise UserError(f"{folder / name} not found: is {folder} a folder written by `retrieval index build`?")
        info = json.loads((folder / INFO_FILE).read_text())
        index = faiss.read_index(str(folder / INDEX_FILE))
        params = info.get("search_params", {})
        _set_search_params(index, params.get("nprobe"), params.get("ef_search"))
        return cls(folder, place(index, parse_gpus(gpu), shard), info, EmbeddingSet.load(folder, vectors=False))

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ``(scores, image ids)`` of each query row; id -1 pads when the index holds fewer than k."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.info["dim"]:
            raise UserError(f"queries have dimension {q.shape[1]}, the index in {self.path} has {self.info['dim']}")
        if not np.isfinite(q).all():
            raise UserError("queries contain NaN or inf: the model that embedded them is broken")
        return self.index.search(q, k)

    def rows(self, image_ids: np.ndarray) -> np.ndarray:
        """Catalogue rows of ``image_ids`` (-1 where an id is not in the catalogue, e.g. the -1 padding)."""
        ids = self.catalogue.ids
        order = np.argsort(ids, kind="stable")
        pos = np.clip(np.searchsorted(ids, image_ids, sorter=order), 0, max(len(ids) - 1, 0))
        rows = order[pos] if len(ids) else np.full(np.shape(image_ids), -1)
        return np.where(len(ids) and ids[rows] == image_ids, rows, -1)
