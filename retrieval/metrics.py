"""The SOP retrieval protocol: Recall@K, MAP@R, R-Precision from embeddings or neighbour lists.

Protocol (Song et al. 2016; Musgrave et al. 2020): every image queries all the others; its own row is
excluded **by index** (a duplicate image under another id still counts). For a query of class c,
R = number of *other* images of class c. Queries with R = 0 have no correct answer: they are left out
of every metric and counted (``num_excluded``), as pytorch-metric-learning does.

- ``recall@K``: fraction of queries with at least one same-class image in the top K.
- ``r_precision``: same-class images in the top R, divided by R.
- ``map@r``: MAP@R: mean over queries of (1/R) * sum over the top R of precision@i at each hit.
- ``map@K`` (K = max(ks)): average precision over the top-K list, normalised by min(R, K).
- ``seed_map``: the design this project grew from reported "MAP" = mean reciprocal rank of the first
  hit; it used 1/(rank index) and was off by one. Ours is the correct reciprocal rank 1/rank (rank 1 =
  first), 0 when no hit in the top K.

Only top-k lists are needed (k = max(max(ks), max R)), so search memory is O(chunk x N) (or the
``N x k`` lists for the symmetric CPU search) and metric memory O(chunk x k).

Query/gallery protocol (In-Shop, GLDv2; :func:`query_gallery_metrics`): each query searches the gallery only (a
query is not in the gallery; a duplicate of it there is a gallery image like any other). R = gallery images of
the query's class; queries with R = 0 are left out and counted. ``map@100`` is GLDv2's mAP@100: precision at each
hit in the top 100, divided by min(R, 100). On CPU the exact search streams the gallery block by block (a parted
embeddings set is never read whole), so memory is O(block + chunk x block + queries x k) whatever the gallery's
size (:func:`gallery_search`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval import knn
from retrieval.config.schema import metric_label, metric_names

log = logging.getLogger(__name__)

KS = (1, 10, 100, 1000)
QG_KS = (1, 10, 20, 30, 50, 100)  # query/gallery: In-Shop's Recall@K cut-offs; max(ks) = 100 gives GLDv2's mAP@100


# ---------------------------------------------------------------------------------------------- metrics
def class_counts(labels: np.ndarray) -> np.ndarray:
    """R per query: how many *other* images share its label."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] - 1


def gallery_counts(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """R per query: how many gallery images share its label."""
    uniq, counts = np.unique(gallery_labels, return_counts=True)
    if len(uniq) == 0:
        return np.zeros(len(query_labels), np.int64)
    pos = np.clip(np.searchsorted(uniq, query_labels), 0, len(uniq) - 1)
    return np.where(uniq[pos] == query_labels, counts[pos], 0)


def _chunk_sums(rel: np.ndarray, r: np.ndarray, ks: Sequence[int], kmap: int) -> dict[str, float]:
    """Sums (not means) of every per-query metric over one chunk of valid queries.

    ``rel[q, i]``: whether the i-th neighbour of query q shares its class; ``r[q]``: R of query q.
    """
    pos = np.arange(1, rel.shape[1] + 1)
    cum = np.cumsum(rel, axis=1, dtype=np.int32)
    prec = cum / pos  # precision at each rank
    in_r = pos[None, :] <= r[:, None]
    out = {f"recall@{k}": float(rel[:, :k].any(1).sum()) for k in ks}
    out["r_precision"] = float((cum[np.arange(len(r)), np.minimum(r, rel.shape[1]) - 1] / r).sum())
    out["map@r"] = float(((prec * rel * in_r).sum(1) / r).sum())
    top = rel[:, :kmap]
    out[f"map@{kmap}"] = float(((prec[:, :kmap] * top).sum(1) / np.minimum(r, kmap)).sum())
    first = top.argmax(1)  # first hit, 0-based; meaningless (and masked) when there is none
    out["seed_map"] = float(np.where(top.any(1), 1.0 / (first + 1), 0.0).sum())
    return out


def metrics_from_neighbours(
    ids: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = KS,
    chunk: int = 4096,
    gallery_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics from precomputed neighbour lists ``ids`` (queries x k, best first).

    Self-retrieval (``gallery_labels`` None): ``ids`` index the same set, self already excluded. Query/gallery:
    ``ids`` index the gallery whose labels are ``gallery_labels``.
    """
    labels = np.asarray(labels).reshape(-1)
    if gallery_labels is None:
        gallery, r = labels, class_counts(labels)
    else:
        gallery = np.asarray(gallery_labels).reshape(-1)
        r = gallery_counts(labels, gallery)
    valid = np.flatnonzero(r > 0)
    k = ids.shape[1]
    ks_eff = [min(kk, k) for kk in ks]
    kmap = max(ks_eff)
    sums: dict[str, float] = {}
    for c0 in range(0, len(valid), chunk):
        q = valid[c0 : c0 + chunk]
        rel = gallery[ids[q]] == labels[q, None]
        for key, v in _chunk_sums(rel, r[q], ks_eff, kmap).items():
            sums[key] = sums.get(key, 0.0) + v
    n = max(len(valid), 1)
    out: dict[str, Any] = {f"recall@{kk}": sums.get(f"recall@{ke}", 0.0) / n for kk, ke in zip(ks, ks_eff, strict=True)}
    for key in ("map@r", "r_precision", "seed_map"):
        out[key] = sums.get(key, 0.0) / n
    out[f"map@{max(ks)}"] = sums.get(f"map@{kmap}", 0.0) / n
    out["num_queries"] = int(len(valid))
    out["num_excluded"] = int(len(labels) - len(valid))
    out["k"] = int(k)
    return out


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = KS,
    backend: str = "auto",
    chunk: int = 4096,
    device: str = "auto",
    dtype: str = "fp32",
    progress: str | None = None,
) -> dict[str, Any]:
    """SOP protocol on ``embeddings`` (N x d, L2-normalised; ranked by inner product) and ``labels`` (N).

    Returns fractions in [0, 1] (module docstring), ``num_queries`` (queries with R > 0),
    ``num_excluded`` (R = 0), ``k`` (list length searched), ``search_seconds`` and ``backend``. ``progress``
    names the search for a progress bar with ETA (``retrieval eval``); None: none.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if n < 2:
        raise ValueError(f"need at least 2 embeddings, got {n}")
    r = class_counts(labels)
    k = int(min(n - 1, max(max(ks), int(r.max()))))
    if backend == "auto":
        backend, device = knn.pick_backend(True, device)
    log.info("eval: searching the %d nearest neighbours of %d queries (%s on %s, %s)", k, n, backend, device, dtype)
    t0 = time.perf_counter()
    _, ids = knn.search(
        embeddings, None, k, backend=backend, device=device, dtype=dtype, chunk=chunk, progress=progress
    )
    seconds = time.perf_counter() - t0
    log.info("eval: search done in %.1f s; scoring Recall@K, MAP@R", seconds)
    out = metrics_from_neighbours(ids, labels, ks, chunk)
    out.update(search_seconds=round(seconds, 3), backend=f"{backend}-{device}-{dtype}", num_images=n)
    return out


GALLERY_BLOCK = 65536  # gallery rows per streamed block on CPU (one embeddings part)


def gallery_blocks(gallery, rows: int = GALLERY_BLOCK):
    """``(gallery rows, float32 block)`` pairs: a parted set's own blocks (short-lived maps of its parts), else
    slices of the array."""
    if hasattr(gallery, "blocks"):
        yield from gallery.blocks(rows)
        return
    for s0 in range(0, len(gallery), rows):
        yield np.arange(s0, min(s0 + rows, len(gallery))), gallery[s0 : s0 + rows]


def gallery_search(
    queries: np.ndarray, gallery, k: int, chunk: int = 4096, device: str = "auto", progress: str | None = None
):
    """Exact top-k gallery rows of every query.

    On CPU the gallery streams block by block (:func:`gallery_blocks`; a parted set is never read whole) through
    torch (one matmul + top-k per query chunk; it measured 2-4x faster than Faiss' flat scan on these shared 2-core
    machines), the query chunk capped so that one score block stays under 256 MB: memory is O(block + queries x
    k) whatever the gallery's size. On CUDA the backend ``knn.pick_backend`` chooses, over the whole gallery."""
    backend, device = knn.pick_backend(False, device)
    if device == "cpu":
        rows = min(GALLERY_BLOCK, max(len(gallery), 1))
        qchunk = max(1, min(chunk, (256 << 20) // (4 * rows)))
        blocks = knn.bar(gallery_blocks(gallery, rows), progress, total=-(-len(gallery) // rows))
        return knn.torch_search_blocks(queries, blocks, k, qchunk)[1]
    gallery = np.asarray(gallery, dtype=np.float32)
    return knn.search(queries, gallery, k, backend=backend, device=device, chunk=chunk, progress=progress)[1]


def query_gallery_metrics(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int] = QG_KS,
    chunk: int = 4096,
    device: str = "auto",
    progress: str | None = None,
) -> dict[str, Any]:
    """Query/gallery protocol (module docstring): Recall@K, MAP@R, R-Precision, mAP@max(ks)."""
    query_labels, gallery_labels = np.asarray(query_labels).reshape(-1), np.asarray(gallery_labels).reshape(-1)
    if len(gallery_labels) < 1 or len(query_labels) < 1:
        raise ValueError(f"need queries and a gallery, got {len(query_labels)} and {len(gallery_labels)}")
    r = gallery_counts(query_labels, gallery_labels)
    k = int(min(len(gallery_labels), max(max(ks), int(r.max()))))
    t0 = time.perf_counter()
    ids = gallery_search(queries, gallery, k, chunk, device, progress)
    seconds = time.perf_counter() - t0
    out = metrics_from_neighbours(ids, query_labels, ks, chunk, gallery_labels=gallery_labels)
    out.update(search_seconds=round(seconds, 3), num_gallery=len(gallery_labels), protocol="query/gallery")
    return out


# ------------------------------------------------------------------------------------------------ table
# the seed README's columns: every metric but R-Precision and MAP@K
TABLE = [name for name in metric_names(KS) if name not in ("r_precision", f"map@{max(KS)}")]


QG_TABLE = [f"recall@{k}" for k in QG_KS] + ["map@r", f"map@{max(QG_KS)}"]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE) -> str:
    """Markdown table like the seed README's: Architecture | Training | metrics in percent.

    Each row is a metrics dict (fractions) with optional ``architecture`` and ``training`` entries
    (e.g. "SwinV2-B", "untrained" / "pretrained" / "finetuned"); a missing metric prints as "-".
    """
    head = ["Architecture", "Training"] + [metric_label(key) for key in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(columns)) + "|"]
    for row in rows:
        cells = [str(row.get("architecture", "")), str(row.get("training", ""))]
        cells += [f"{100 * row[key]:.2f}" if row.get(key) is not None else "-" for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE) -> None:
    print(format_table(rows, columns))
