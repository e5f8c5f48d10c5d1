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

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch

log = logging.getLogger(__name__)

METRICS = ("ip", "l2")
BACKENDS = ("auto", "faiss", "torch")
DTYPES = ("fp32", "tf32", "bf16", "bf16x3")
# CPU self-search switches from the plain chunked path to the symmetric one at this size. Measured on
# 2 cores (CPU seconds, d=1024, k=1000): N=10,000 plain 2.5 / symmetric 3.3 / faiss 3.6;
# N=30,000 plain 20.5 / symmetric 14.9 / faiss 22.2 (selection dominates small N, the matmul large N).
SYMMETRIC_MIN_N = 20_000


# --------------------------------------------------------------------------------------------- helpers
def _as_f32(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
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


def faiss_search(
    queries: np.ndarray,
    database: np.ndarray | None,
    k: int,
    metric: str = "ip",
    exclude: np.ndarray | None = None,
    shards: int = 1,
    gpus: Sequence[int] | None = None,
    chunk: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search with a flat Faiss index (CPU, ``IndexShards`` or GPUs); asks k+1 when excluding."""
    xb = queries if database is None else database
    index = make_flat(xb, metric, shards)
    if gpus:
        index = faiss_to_gpu(index, gpus, shard=True)
    kk = k + (1 if exclude is not None else 0)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for q0 in range(0, len(queries), chunk):
        q1 = min(len(queries), q0 + chunk)
        d_, i_ = index.search(queries[q0:q1], kk)
        if exclude is not None:
            d_, i_ = _drop_excluded(d_, i_, exclude[q0:q1], k)
        scores[q0:q1], ids[q0:q1] = d_, i_
    return scores, ids


# ----------------------------------------------------------------------------------------------- torch
@contextlib.contextmanager
def _matmul_precision(dtype: str) -> Iterator[None]:
    """TF32 only for ``tf32`` (CUDA; no effect on CPU), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _block_scores(q: torch.Tensor, xt: torch.Tensor, xb_sq: torch.Tensor | None, out: torch.Tensor | None = None):
    """Similarity block, larger = better: ``q @ x.T`` for ip, ``2 q.x - |x|^2`` for l2 (|q|^2 is per-row)."""
    s = torch.mm(q, xt, out=out) if out is not None else q @ xt
    if xb_sq is not None:
        s.mul_(2).sub_(xb_sq)
    return s


def _finish_l2(sim: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Turn ``2 q.x - |x|^2`` back into the squared distance ``|q|^2 + |x|^2 - 2 q.x`` (>= 0)."""
    return (q.float().pow(2).sum(1, keepdim=True) - sim).clamp_min_(0)


def _rescore(q32: torch.Tensor, xb32: torch.Tensor, cand: torch.Tensor, xb_sq: torch.Tensor | None):
    """Exact fp32 similarity of each query with its candidate rows, in slices of about 256 MB of gathered rows.

    The gather moves ``len(cand) x c x d`` floats: cheap for small k, but at k = 1000 it costs more than the
    bf16 ranking saves (on an H100 more than the whole fp32 search): ``bf16x3`` is the fast near-exact mode."""
    out = torch.empty(cand.shape, dtype=torch.float32, device=cand.device)
    rows = max(1, (1 << 28) // max(1, cand.shape[1] * xb32.shape[1] * 4))
    for r0 in range(0, len(cand), rows):
        vecs = xb32[cand[r0 : r0 + rows]]  # rows x c x d
        s = torch.bmm(vecs, q32[r0 : r0 + rows, :, None]).squeeze(2)
        if xb_sq is not None:
            s = 2 * s - xb_sq[cand[r0 : r0 + rows]]
        out[r0 : r0 + rows] = s
    return out


def _split_bf16(x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo with both in bfloat16: 16 significant bits between them (fp32 has 24)."""
    hi = x32.to(torch.bfloat16)
    return hi, (x32 - hi.float()).to(torch.bfloat16)


class _Scorer:
    """Similarity blocks of a query chunk against the whole database in the requested precision.

    ``bf16x3`` (CUDA): q.x = qh.xh + qh.xl + ql.xh (the ql.xl term, ~2^-16 relative, is dropped) as ONE bf16
    GEMM over a 3d-long inner dimension with fp32 accumulation and fp32 output, so the tensor cores do ~3x
    the bf16 work and the scores come out within ~1e-5 of fp32: no candidate re-scoring is needed.
    On CPU it is plain fp32 (there is no bf16 tensor-core speed to win)."""

    def __init__(self, xb32: torch.Tensor, metric: str, dtype: str) -> None:
        cuda = xb32.device.type == "cuda"
        self.mode = dtype if (dtype != "bf16x3" or cuda) else "fp32"
        self.xb_sq = xb32.pow(2).sum(1) if metric == "l2" else None
        if self.mode == "bf16x3":
            hi, lo = _split_bf16(xb32)
            self.xbt = torch.cat([hi, lo, hi], 1).T  # (3d, N) view
        else:
            self.xbt = xb32.to(torch.bfloat16 if self.mode == "bf16" else torch.float32).T

    @property
    def rescore(self) -> bool:
        """bf16 ranks approximately and re-scores; tf32 only does on CUDA (elsewhere it is fp32)."""
        return self.mode == "bf16" or (self.mode == "tf32" and self.xbt.device.type == "cuda")

    def __call__(self, q32: torch.Tensor) -> torch.Tensor:
        if self.mode == "bf16x3":
            hi, lo = _split_bf16(q32)
            s = torch.mm(torch.cat([hi, hi, lo], 1), self.xbt, out_dtype=torch.float32)
            return s if self.xb_sq is None else s.mul_(2).sub_(self.xb_sq)
        q = q32.to(self.xbt.dtype)
        return _block_scores(q, self.xbt, None if self.xb_sq is None else self.xb_sq.to(q.dtype))


def torch_search(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor | None,
    k: int,
    metric: str = "ip",
    exclude: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    chunk: int = 4096,
    to_host: bool = True,
) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
    """Chunked matmul + ``torch.topk``: memory ``O(chunk x N)``.

    ``bf16`` ranks in bfloat16 and keeps ``k + max(16, k // 8)`` candidates, which are re-scored in
    fp32 and re-ranked: the scores returned are exact; a true neighbour can only be missed when
    bf16 rounding (~3 significant digits) pushes it below that candidate margin (``retrieval bench
    search`` reports the recall against fp32). ``tf32`` ranks with TF32 tensor cores the same way.
    ``bf16x3`` (CUDA) scores with three bf16 products in one GEMM, within ~1e-5 of fp32, no re-scoring.
    ``to_host=False`` returns the results as tensors on ``device`` (a GPU evaluation needs no host copy).
    """
    device = torch.device(device)
    q32 = torch.as_tensor(queries).to(device=device, dtype=torch.float32)
    xb32 = q32 if database is None else torch.as_tensor(database).to(device=device, dtype=torch.float32)
    scorer = _Scorer(xb32, metric, dtype)
    n_db = xb32.shape[0]
    kc = min(n_db, k + max(16, k // 8) + (1 if exclude is not None else 0)) if scorer.rescore else k
    excl = None if exclude is None else torch.as_tensor(exclude, device=device)
    out_device = torch.device("cpu") if to_host else device  # to host chunk by chunk: device memory stays O(chunk)
    scores = torch.empty((len(q32), k), dtype=torch.float32, device=out_device)
    ids = torch.empty((len(q32), k), dtype=torch.int64, device=out_device)
    with _matmul_precision(dtype):
        for q0 in range(0, len(q32), chunk):
            q = q32[q0 : q0 + chunk]
            s = scorer(q)
            if excl is not None:
                e = excl[q0 : q0 + chunk]
                rows = torch.nonzero(e >= 0).squeeze(1)
                s[rows, e[rows]] = -math.inf  # self excluded by index
            val, idx = torch.topk(s, kc, dim=1)
            del s  # frees the chunk x N block before the re-scoring allocates
            if scorer.rescore:
                val = _rescore(q, xb32, idx, scorer.xb_sq)
                if excl is not None:
                    val = val.masked_fill(idx == excl[q0 : q0 + chunk, None], -math.inf)
                val, pos = torch.topk(val, k, dim=1)
                idx = torch.gather(idx, 1, pos)
            if metric == "l2":
                val = _finish_l2(val, q)
            scores[q0 : q0 + len(q)] = val
            ids[q0 : q0 + len(q)] = idx
    return (scores.numpy(), ids.numpy()) if to_host else (scores, ids)


# ----------------------------------------------------------------------------- symmetric self-search
class _Heaps:
    """Faiss' C++ min-heaps (keep the k largest) over numpy buffers: one heap per database row."""

    def __init__(self, n: int, k: int, floor: np.ndarray | None) -> None:
        self.val = np.empty((n, k), np.float32)
        self.ids = np.full((n, k), -1, np.int64)
        self.val[:] = -np.inf if floor is None else floor[:, None]  # all-equal rows are valid heaps
        self.h = faiss.float_minheap_array_t()
        self.h.k, self.h.nh = k, n
        self.h.val, self.h.ids = faiss.swig_ptr(self.val), faiss.swig_ptr(self.ids)

    def add(self, block: np.ndarray, i0: int, col_ids: np.ndarray) -> None:
        """Offer ``block[r, c]`` (id ``col_ids[c]``) to heap ``i0 + r``; OpenMP-parallel over rows."""
        ni, nj = block.shape
        self.h.addn_with_ids(nj, faiss.swig_ptr(block), faiss.swig_ptr(col_ids), 0, i0, ni)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows sorted best first, in place by row blocks (no second N x k copy).

        numpy's SIMD argsort in a few threads (it releases the GIL) measured 2-4x cheaper than Faiss'
        single-threaded heap ``reorder`` and than ``torch.sort`` here.
        """

        def sort_rows(r0: int) -> None:
            order = np.argsort(-self.val[r0 : r0 + 4096], axis=1)
            self.val[r0 : r0 + 4096] = np.take_along_axis(self.val[r0 : r0 + 4096], order, 1)
            self.ids[r0 : r0 + 4096] = np.take_along_axis(self.ids[r0 : r0 + 4096], order, 1)

        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            list(pool.map(sort_rows, range(0, len(self.val), 4096)))
        return self.val, self.ids


def _sampled_floor(
    x: torch.Tensor, k: int, sample: int, target: float, xb_sq, chunk: int, seed: int
) -> np.ndarray | None:
    """Per-row value that about ``target * k`` other rows exceed, from a random column sample.

    Seeding the heaps with it means only those few candidates pay a heap insertion. It is a guess,
    not a bound: a row with fewer than k values above it keeps placeholder ids (-1) and is
    recomputed exactly afterwards, so results never depend on it.
    """
    n = len(x)
    sample = min(sample, n)
    rank = int(target * k * sample / n)
    if rank < 1 or rank >= sample:
        return None
    g = torch.Generator().manual_seed(seed)
    cols = torch.randperm(n, generator=g)[:sample].sort().values
    xs_t = x[cols].T.contiguous()
    xs_sq = None if xb_sq is None else xb_sq[cols]
    floor = torch.empty(n)
    pos_of = torch.full((n,), -1, dtype=torch.long)
    pos_of[cols] = torch.arange(sample)
    for r0 in range(0, n, chunk):
        s = _block_scores(x[r0 : r0 + chunk], xs_t, xs_sq)
        if xb_sq is not None:  # same convention as the heaps: -|xi - xj|^2
            s.sub_(xb_sq[r0 : r0 + chunk, None])
        p = pos_of[r0 : r0 + chunk]
        rows = torch.nonzero(p >= 0).squeeze(1)
        s[rows, p[rows]] = -math.inf  # self excluded by index
        floor[r0 : r0 + chunk] = torch.topk(s, rank, dim=1, sorted=False).values.min(1).values
    return floor.numpy()


def symmetric_self_search(
    x: np.ndarray | torch.Tensor,
    k: int,
    metric: str = "ip",
    tile: int = 4096,
    sample: int = 2048,
    target: float = 2.0,
    chunk: int = 4096,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact all-vs-all top-k on CPU (self excluded by index), computing each score block once.

    Tiles ``(i, j)`` with ``j >= i``: ``S = X_i @ X_j.T`` feeds rows of tile i and, transposed, rows of
    tile j, so the matmul costs half of a query-by-query search. Memory: the ``N x k`` result plus two
    ``tile x tile`` buffers. ``sample``/``target`` tune the heap seeding (:func:`_sampled_floor`);
    rows the seed starved (rare) are recomputed with :func:`torch_search`.
    """
    xt = torch.as_tensor(_as_f32(x, "x"))
    n = len(xt)
    _check_k(k, n, _self_exclude(n))
    xb_sq = xt.pow(2).sum(1) if metric == "l2" else None
    floor = _sampled_floor(xt, k, sample, target, xb_sq, chunk, seed)
    heaps = _Heaps(n, k, floor)
    col_ids = np.arange(n, dtype=np.int64)
    buf, buf_t = torch.empty(tile * tile), torch.empty(tile * tile)
    for i0 in range(0, n, tile):
        xi = xt[i0 : i0 + tile]
        for j0 in range(i0, n, tile):
            xj = xt[j0 : j0 + tile]
            s = buf[: len(xi) * len(xj)].view(len(xi), len(xj))
            torch.mm(xi, xj.T, out=s)
            if xb_sq is not None:  # symmetric similarity -|xi - xj|^2, negated back at the end
                s.mul_(2).sub_(xb_sq[i0 : i0 + tile, None]).sub_(xb_sq[None, j0 : j0 + tile])
            if i0 == j0:
                s.fill_diagonal_(-math.inf)  # self excluded by index
            heaps.add(s.numpy(), i0, col_ids[j0:])
            if j0 != i0:
                st = buf_t[: s.numel()].view(len(xj), len(xi))
                st.copy_(s.T)
                heaps.add(st.numpy(), j0, col_ids[i0:])
    scores, ids = heaps.finish()
    redo = np.flatnonzero((ids < 0).any(1))
    if len(redo):
        log.info("symmetric search: %d of %d rows recomputed (sampled floor too high)", len(redo), n)
        scores[redo], ids[redo] = torch_search(xt[redo], xt, k, metric, exclude=redo, chunk=chunk)
        if metric == "l2":
            scores[redo] = -scores[redo]  # negated back below with the rest
    if metric == "l2":
        scores = np.maximum(-scores, 0)
    return scores, ids


# --------------------------------------------------------------------------------------------- front
def pick_backend(self_search: bool, device: str = "auto") -> tuple[str, str]:
    """``(backend, device)`` that measured fastest for the situation (see the module docstring)."""
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda:
        return ("faiss", "cuda") if faiss_has_gpu() else ("torch", "cuda")
    return ("torch", "cpu") if self_search else ("faiss", "cpu")


def search(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor | None = None,
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
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` against ``database`` (``None``: self-search, own row excluded by index).

    ``exclude`` (self-search default: ``arange(N)``) gives per query one database index to leave out.
    ``symmetric`` (torch, CPU, fp32 self-search) selects :func:`symmetric_self_search`; default: when
    N >= ``SYMMETRIC_MIN_N``.
    ``shards`` (faiss) searches an ``IndexShards``; on CUDA Faiss uses all visible GPUs as shards.
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
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "faiss":
        gpus = list(range(faiss.get_num_gpus())) if device.startswith("cuda") and faiss_has_gpu() else None
        return faiss_search(q, xb, k, metric, exclude, shards=shards, gpus=gpus)
    if symmetric is None:
        symmetric = len(q) >= SYMMETRIC_MIN_N
    use_sym = plain_self and device == "cpu" and dtype == "fp32" and symmetric
    if use_sym:
        return symmetric_self_search(q, k, metric, chunk=chunk)
    return torch_search(q, xb, k, metric, exclude, device=device, dtype=dtype, chunk=chunk)
