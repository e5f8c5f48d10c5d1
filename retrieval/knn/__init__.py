"""Exact k-nearest-neighbour search: Faiss (CPU, sharded, GPU) and torch (chunked matmul, CPU/CUDA) backends.

Every function returns ``(scores, ids)``: ``float32`` and ``int64`` arrays of shape ``(num_queries, k)``,
best first. Scores are inner products for ``metric="ip"`` (descending) and squared L2 distances for
``metric="l2"`` (ascending), as Faiss reports them.

Self-search (``database is None``: the queries are the database) excludes each query's own row **by
index**: row ``i`` never lists ``i``, whatever its score or position, while a duplicate vector stored
under another index is a legitimate neighbour. More generally ``exclude[i]`` names one database
index that query ``i`` must not return (``-1``: none).

Backends:

- ``faiss``: ``IndexFlatIP``/``IndexFlatL2`` on CPU; ``shards=n`` spreads the database over an
  ``IndexShards`` of n flat sub-indexes, which is exactly the merge Faiss runs across GPUs when an
  index is cloned with ``GpuMultipleClonerOptions(shard=True)``; ``gpus=[...]`` clones the index to
  GPUs (:func:`faiss_to_gpu`) when the installed Faiss has GPU support.
- ``torch``: queries in chunks, ``chunk x N`` score block by one matmul, then top-k; memory is
  ``O(chunk x N)``, never ``N x N``. ``dtype`` ``bf16``/``tf32`` ranks in low precision and re-scores
  the candidates exactly in fp32 (on CUDA); ``bf16x3`` scores near-exactly with three bf16 products in one
  GEMM (CUDA). For CPU self-search, :func:`symmetric_self_search` uses that
  ``X @ X.T`` is symmetric: each off-diagonal block is computed once and serves both row blocks (half
  the matmul FLOPs), and a streaming top-k (Faiss' C++ heaps, seeded with a sampled per-row threshold
  so that few candidates reach them) replaces ``torch.topk``, which is slow on CPU.
- ``auto`` (:func:`pick_backend`): CUDA present -> Faiss GPU if available, else torch on CUDA; CPU
  self-search -> torch (symmetric from ``SYMMETRIC_MIN_N`` rows; faster than ``IndexFlatIP`` on these
  2-core machines, see ``retrieval bench search``); CPU query-vs-database -> Faiss flat.
"""

from __future__ import annotations

import faiss
import numpy as np

from retrieval.knn._base import (
    BACKENDS,
    DTYPES,
    METRICS,
    SYMMETRIC_MIN_N,
    _as_f32,
    _check_k,
    _self_exclude,
    bar,
    cuda_available,
    faiss_has_gpu,
    faiss_search,
    faiss_to_gpu,
    make_flat,
)
from retrieval.knn._stream import stream_topk

__all__ = [
    "BACKENDS",
    "bar",
    "DTYPES",
    "METRICS",
    "SYMMETRIC_MIN_N",
    "cuda_available",
    "faiss_has_gpu",
    "faiss_search",
    "faiss_to_gpu",
    "make_flat",
    "pick_backend",
    "search",
    "symmetric_self_search",
    "torch_search",
    "stream_topk",
    "torch_search_blocks",
]


# The torch backends import torch on first use: an index build or a query/gallery eval on CPU runs on Faiss alone.
def symmetric_self_search(*args, **kwargs):
    from retrieval.knn._symmetric import symmetric_self_search as impl

    return impl(*args, **kwargs)


def torch_search(*args, **kwargs):
    from retrieval.knn._torch import torch_search as impl

    return impl(*args, **kwargs)


def torch_search_blocks(*args, **kwargs):
    from retrieval.knn._torch import torch_search_blocks as impl

    return impl(*args, **kwargs)


# --------------------------------------------------------------------------------------------- front
def pick_backend(self_search: bool, device: str = "auto") -> tuple[str, str]:
    """``(backend, device)`` that measured fastest for the situation (see the module docstring)."""
    cuda = cuda_available() if device == "auto" else device.startswith("cuda")
    if cuda:
        return ("faiss", "cuda") if faiss_has_gpu() else ("torch", "cuda")
    return ("torch", "cpu") if self_search else ("faiss", "cpu")


def search(
    queries,
    database=None,
    k: int = 10,
    *,
    metric: str = "ip",
    exclude: np.ndarray | None = None,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "fp32",
    chunk: int = 4096,
    symmetric: bool | None = None,
    shards: int = 1,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` against ``database`` (``None``: self-search, own row excluded by index).

    ``exclude`` (self-search default: ``arange(N)``) gives per query one database index to leave out.
    ``symmetric`` (torch, CPU, fp32 self-search) selects :func:`symmetric_self_search`; default: when
    N >= ``SYMMETRIC_MIN_N``.
    ``shards`` (faiss) searches an ``IndexShards``; on CUDA Faiss uses all visible GPUs as shards.
    ``progress`` names the work for a progress bar with ETA (stderr); None: no bar.
    """
    if metric not in METRICS or backend not in BACKENDS or dtype not in DTYPES:
        raise ValueError(
            f"metric/backend/dtype: expected {METRICS}/{BACKENDS}/{DTYPES}, got {metric}/{backend}/{dtype}"
        )
    q = _as_f32(queries, "queries")
    xb = None if database is None else _as_f32(database, "database")
    if xb is not None and xb.shape[1] != q.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]}, database {xb.shape[1]}")
    plain_self = database is None and exclude is None
    if plain_self:
        exclude = _self_exclude(len(q))
    _check_k(k, len(q) if xb is None else len(xb), exclude)
    if backend == "auto":
        backend, device = pick_backend(xb is None, device)
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if backend == "faiss":
        gpus = list(range(faiss.get_num_gpus())) if device.startswith("cuda") and faiss_has_gpu() else None
        return faiss_search(q, xb, k, metric, exclude, shards=shards, gpus=gpus, progress=progress)
    if symmetric is None:
        symmetric = len(q) >= SYMMETRIC_MIN_N
    use_sym = plain_self and device == "cpu" and dtype == "fp32" and symmetric
    if use_sym:
        return symmetric_self_search(q, k, metric, chunk=chunk, progress=progress)
    return torch_search(q, xb, k, metric, exclude, device=device, dtype=dtype, chunk=chunk, progress=progress)
