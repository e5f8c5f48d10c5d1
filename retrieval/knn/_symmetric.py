"""CPU self-search over the symmetric X @ X.T with Faiss' C++ heaps (see :mod:`retrieval.knn`)."""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch

from retrieval.knn._base import _as_f32, _check_k, _self_exclude, bar
from retrieval.knn._torch import _block_scores, torch_search

log = logging.getLogger(__name__)


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
    progress: str | None = None,
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
    for i0 in bar(range(0, n, tile), progress):  # the rows' tiles: later ones hold fewer blocks (ETA pessimistic)
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
