"""``retrieval index build``: one Faiss index (with image ids) over an embeddings folder.

    retrieval index build --embeddings runs/sop/emb-test --out runs/sop/index                 # exact, CPU
    retrieval index build --embeddings DIR --out DIR --factory IVF1024,PQ32 --train-sample 100000
    retrieval index build --embeddings DIR --out DIR --factory HNSW32
    retrieval index build --embeddings DIR --out DIR --gpu all --shard                          # every GPU, sharded

The index is ``IndexIDMap2`` over ``faiss.index_factory(d, FACTORY, inner product)``: searches return
image ids, not row numbers. Factories that need training (IVF, PQ) are trained on a random sample
(``--train-sample``). ``--gpu`` places the index with Faiss' GPU cloner: one GPU, or several as
shards (``--shard``: each GPU holds a slice, results merged like ``IndexShards``; for catalogues beyond
one GPU's memory) or replicas (the default: each GPU holds everything, queries are split; throughput).
On a Faiss without GPU support (faiss-cpu) everything runs on CPU and the log says so. Training runs
on the GPUs when placed there; the saved ``index.faiss`` is always the CPU form (``write_index``).

The output folder holds ``index.faiss``, ``index.json`` (dim, metric, count, factory, created, source
embeddings, model from the embeddings' ``meta.json``, search parameters) and copies of ``ids.npy``,
``labels.npy`` (+ ``super_labels.npy``, ``paths.json`` when present) so searches can name what they find.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval import knn
from retrieval.errors import UserError
from retrieval.evaluate import load_embeddings

log = logging.getLogger(__name__)

COPIED = ("ids.npy", "labels.npy", "super_labels.npy", "paths.json", "meta.json")


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
    index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def _read_ids(folder: Path, n: int) -> np.ndarray:
    path = folder / "ids.npy"
    if not path.is_file():
        log.warning("index: %s missing: using row numbers 0..%d as ids", path, n - 1)
        return np.arange(n, dtype=np.int64)
    ids = np.load(path)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"{path}: expected {n} integer ids (one per embedding), got shape {ids.shape} {ids.dtype}")
    if len(np.unique(ids)) != n:
        raise UserError(f"{path}: ids must be unique")
    return ids.astype(np.int64)


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
    """Build, save ``index.faiss`` + ``index.json`` and copy the catalogue files; returns index.json's content."""
    emb, _ = load_embeddings(embeddings_dir)
    ids = _read_ids(embeddings_dir, len(emb))
    gpus = parse_gpus(gpu)
    t0 = time.perf_counter()
    index = build_index(emb, ids, factory, train_sample, gpus, shard)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / "index.faiss"))
    for name in COPIED:
        if (embeddings_dir / name).is_file():
            shutil.copy2(embeddings_dir / name, out / name)
    meta_path = embeddings_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    info = {
        "dim": int(emb.shape[1]),
        "metric": "inner_product",
        "count": int(index.ntotal),
        "factory": factory,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "embeddings": str(embeddings_dir),
        "model": meta.get("model"),
        "gpus": gpus,
        "shard": shard,
        "train_sample": min(train_sample, len(emb)),
        "build_seconds": round(seconds, 3),
        "faiss_version": faiss.__version__,
        "search_params": _default_params(factory),
    }
    (out / "index.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info("index: %s over %d x %d written to %s in %.1f s", factory, len(emb), emb.shape[1], out, seconds)
    return info


# ----------------------------------------------------------------------------------------- load/search
def _load(index_dir: str, stamp: float, gpu: str, shard: bool) -> dict[str, Any]:
    folder = Path(index_dir)
    info = json.loads((folder / "index.json").read_text())
    index = faiss.read_index(str(folder / "index.faiss"))
    params = info.get("search_params", {})
    _set_search_params(index, params.get("nprobe"), params.get("ef_search"))
    index = place(index, parse_gpus(gpu), shard)
    ids = np.load(folder / "ids.npy") if (folder / "ids.npy").is_file() else np.arange(info["count"])
    labels = np.load(folder / "labels.npy") if (folder / "labels.npy").is_file() else None
    paths = json.loads((folder / "paths.json").read_text()) if (folder / "paths.json").is_file() else None
    lookup = {
        int(image_id): {
            "row": row,
            "label": None if labels is None else int(labels[row]),
            "path": None if paths is None else paths[row],
        }
        for row, image_id in enumerate(ids)
    }
    return {"index": index, "info": info, "ids": ids, "labels": labels, "paths": paths, "lookup": lookup}


_load_cached = functools.lru_cache(maxsize=4)(_load)


def load_index(index_dir: str | Path, gpu: str = "none", shard: bool = False) -> dict[str, Any]:
    """An index folder: ``index`` (Faiss, placed per ``gpu``), ``info`` (index.json), ``ids``, ``labels``,
    ``paths`` and ``lookup`` {image id: {row, label, path}}. Cached per folder until index.faiss changes."""
    folder = Path(index_dir)
    for name in ("index.json", "index.faiss"):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} not found: is {folder} a folder written by `retrieval index build`?")
    return _load_cached(str(folder.resolve()), (folder / "index.faiss").stat().st_mtime, gpu, shard)


def search_index(
    index_dir: str | Path, queries: np.ndarray, k: int = 10, gpu: str = "none"
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ``(scores, image ids)`` of each query row; id -1 (score -inf/-3.4e38) pads when fewer than k."""
    cat = load_index(index_dir, gpu)
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.shape[1] != cat["info"]["dim"]:
        raise UserError(f"queries have dimension {q.shape[1]}, the index in {index_dir} has {cat['info']['dim']}")
    return cat["index"].search(q, k)


# -------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build and save an index over an embeddings folder")
    b.add_argument("--embeddings", required=True, type=Path, help="folder with embeddings.npy, labels.npy, ids.npy")
    b.add_argument("--out", required=True, type=Path, help="index folder to write")
    b.add_argument("--factory", default="Flat", help="Faiss factory string: Flat, IVF1024,PQ32, HNSW32, IVF256,Flat")
    b.add_argument("--gpu", default="auto", help="auto | none | all | 0,1,... (CPU when Faiss has no GPU support)")
    b.add_argument("--shard", action="store_true", help="several GPUs: shard the index (default: replicate it)")
    b.add_argument("--train-sample", type=int, default=100_000, help="vectors used to train IVF/PQ")


def run(args: argparse.Namespace) -> int:
    if args.train_sample < 1:
        raise UserError(f"--train-sample: expected a positive integer, got {args.train_sample}")
    info = build_folder(args.embeddings, args.out, args.factory, args.gpu, args.shard, args.train_sample)
    print(json.dumps(info, indent=1))
    return 0
