"""Shared pieces of the kNN backends: argument checks and the Faiss flat backend (see :mod:`retrieval.knn`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

METRICS = ("ip", "l2")
BACKENDS = ("auto", "faiss", "torch")
DTYPES = ("fp32", "tf32", "bf16", "bf16x3")
# CPU self-search switches from the plain chunked path to the symmetric one at this size. Measured on
# 2 cores (CPU seconds, d=1024, k=1000): N=10,000 plain 2.5 / symmetric 3.3 / faiss 3.6;
# N=30,000 plain 20.5 / symmetric 14.9 / faiss 22.2 (selection dominates small N, the matmul large N).
SYMMETRIC_MIN_N = 20_000


# --------------------------------------------------------------------------------------------- helpers
def cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing torch where no NVIDIA driver is present.

    torch's import costs about 0.9 GB of resident memory and a second of start-up, which an index build or a
    query/gallery eval on CPU (Faiss only) would carry for nothing: no driver device node (Linux ``nvidiactl``,
    WSL2 ``dxg``) means no CUDA."""
    if not (Path("/dev/nvidiactl").exists() or Path("/dev/dxg").exists()):
        return False
    import torch

    return torch.cuda.is_available()


def _as_f32(x, name: str) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor exists only where torch was imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n, d), got shape {x.shape}")
    return x


def _check_k(k: int, n_db: int, exclude: np.ndarray | None) -> None:
    avail = n_db - (1 if exclude is not None else 0)
    if not 1 <= k <= avail:
        raise ValueError(
            f"k={k}: expected 1 <= k <= {avail} (database size {n_db}, self excluded: {exclude is not None})"
        )


def _self_exclude(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def faiss_has_gpu() -> bool:
    """True when the installed Faiss was built with GPU support and sees at least one GPU."""
    return hasattr(faiss, "GpuMultipleClonerOptions") and faiss.get_num_gpus() > 0


# ----------------------------------------------------------------------------------------------- faiss
def make_flat(x: np.ndarray, metric: str = "ip", shards: int = 1) -> faiss.Index:
    """An exact Faiss index over ``x``; ``shards > 1`` gives an ``IndexShards`` of contiguous slices.

    IndexShards queries every sub-index and merges the per-shard top-k lists, shifting ids by the
    sizes of the preceding shards (``successive_ids``): the same code path a GPU-sharded index runs.
    """
    d = x.shape[1]
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if shards <= 1:
        index = faiss.IndexFlat(d, faiss_metric)
        index.add(x)
        return index
    sharded = faiss.IndexShards(d, True, True)  # threaded, successive_ids
    for part in np.array_split(x, shards):
        sub = faiss.IndexFlat(d, faiss_metric)
        sub.add(np.ascontiguousarray(part))
        sharded.add_shard(sub)  # the Python wrapper keeps a reference to `sub`
    sharded.syncWithSubIndexes()
    return sharded


def faiss_to_gpu(index: faiss.Index, gpus: Sequence[int], shard: bool = True) -> faiss.Index:
    """Clone a CPU index to GPUs: one GPU, or several as shards (capacity) or replicas (throughput).

    Mirrors :func:`make_flat`'s ``IndexShards``: with ``shard=True`` Faiss builds an ``IndexShards`` of
    per-GPU sub-indexes and merges their results the same way; ``shard=False`` builds an
    ``IndexReplicas`` that splits the queries instead. Needs a Faiss built with GPU support.
    """
    if not hasattr(faiss, "GpuMultipleClonerOptions"):
        raise RuntimeError("this Faiss has no GPU support (faiss-cpu); install faiss-gpu for GPU placement")
    co = faiss.GpuMultipleClonerOptions()
    co.shard = shard
    co.useFloat16 = False  # exact search: keep fp32 vectors on the GPU
    return faiss.index_cpu_to_gpus_list(index, co=co, gpus=list(gpus))


def _drop_excluded(scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per row, remove the excluded index wherever it sits (or the last if absent)."""
    hit = ids == exclude[:, None]
    # stable sort on the bool mask moves the excluded entry to the end and keeps the others in order
    order = np.argsort(hit, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def bar(steps, desc: str | None, total: int | None = None):
    """``steps`` under a tqdm progress bar with rate and ETA (stderr) when ``desc`` names the work, else as they are
    (also when there is one step: nothing to estimate)."""
    total = len(steps) if total is None and hasattr(steps, "__len__") else total
    if desc is None or (total is not None and total <= 1):
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, total=total, unit="block", mininterval=1.0, dynamic_ncols=True)


def faiss_search(
    queries: np.ndarray,
    database: np.ndarray | None,
    k: int,
    metric: str = "ip",
    exclude: np.ndarray | None = None,
    shards: int = 1,
    gpus: Sequence[int] | None = None,
    chunk: int = 16384,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search with a flat Faiss index (CPU, ``IndexShards`` or GPUs); asks k+1 when excluding."""
    xb = queries if database is None else database
    index = make_flat(xb, metric, shards)
    if gpus:
        index = faiss_to_gpu(index, gpus, shard=True)
    kk = k + (1 if exclude is not None else 0)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for q0 in bar(range(0, len(queries), chunk), progress):
        q1 = min(len(queries), q0 + chunk)
        d_, i_ = index.search(queries[q0:q1], kk)
        if exclude is not None:
            d_, i_ = _drop_excluded(d_, i_, exclude[q0:q1], k)
        scores[q0:q1], ids[q0:q1] = d_, i_
    return scores, ids
