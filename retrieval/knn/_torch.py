"""The torch backend: chunked matmul + top-k on CPU or CUDA, low-precision ranking (see :mod:`retrieval.knn`)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch

from retrieval.knn._base import bar

log = logging.getLogger(__name__)


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
    progress: str | None = None,
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
        for q0 in bar(range(0, len(q32), chunk), progress):
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


def torch_search_blocks(queries: np.ndarray, blocks, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` over a database seen only as ``(rows, block)`` pairs (CPU).

    ``blocks`` yields each database block once with the database row of each of its rows (e.g. the parts of an
    embeddings set): memory is one block, a ``chunk x block`` score matrix and the ``queries x k`` running best,
    never the database. Each block's top-k is merged into the running best with a stable sort, so equal scores
    keep the order in which rows were seen."""
    q32 = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32))
    best_s = torch.full((len(q32), 0), -math.inf)
    best_i = torch.zeros((len(q32), 0), dtype=torch.int64)
    for rows, block in blocks:
        xt = torch.as_tensor(np.ascontiguousarray(block, dtype=np.float32)).T
        rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        kb = min(k, xt.shape[1])
        parts_s, parts_i = [], []
        for q0 in range(0, len(q32), chunk):
            val, idx = torch.topk(q32[q0 : q0 + chunk] @ xt, kb, dim=1)
            parts_s.append(val)
            parts_i.append(rows_t[idx])
        s = torch.cat([best_s, torch.cat(parts_s)], 1)  # parts: query chunks of this block, in row order
        i = torch.cat([best_i, torch.cat(parts_i)], 1)
        s, order = torch.sort(s, dim=1, descending=True, stable=True)
        best_s, best_i = s[:, :k].contiguous(), torch.gather(i, 1, order[:, :k]).contiguous()
    if best_i.shape[1] < k:
        raise ValueError(f"k={k}: the database has only {best_i.shape[1]} rows")
    return best_s.numpy(), best_i.numpy()
