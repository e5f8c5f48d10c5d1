"""``retrieval eval``: the SOP retrieval protocol on saved embeddings.

    retrieval eval --embeddings runs/tiny/emb-test                 # writes runs/tiny/emb-test/metrics.json
    retrieval eval --embeddings DIR --out DIR --backend faiss --chunk 2048

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
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval import knn
from retrieval.errors import UserError

log = logging.getLogger(__name__)

KS = (1, 10, 100, 1000)


# ---------------------------------------------------------------------------------------------- metrics
def class_counts(labels: np.ndarray) -> np.ndarray:
    """R per query: how many *other* images share its label."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] - 1


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
    ids: np.ndarray, labels: np.ndarray, ks: Sequence[int] = KS, chunk: int = 4096
) -> dict[str, Any]:
    """Metrics from precomputed neighbour lists ``ids`` (N x k, self already excluded, best first)."""
    labels = np.asarray(labels).reshape(-1)
    r = class_counts(labels)
    valid = np.flatnonzero(r > 0)
    k = ids.shape[1]
    ks_eff = [min(kk, k) for kk in ks]
    kmap = max(ks_eff)
    sums: dict[str, float] = {}
    for c0 in range(0, len(valid), chunk):
        q = valid[c0 : c0 + chunk]
        rel = labels[ids[q]] == labels[q, None]
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
) -> dict[str, Any]:
    """SOP protocol on ``embeddings`` (N x d, L2-normalised; ranked by inner product) and ``labels`` (N).

    Returns fractions in [0, 1] (module docstring), ``num_queries`` (queries with R > 0),
    ``num_excluded`` (R = 0), ``k`` (list length searched), ``search_seconds`` and ``backend``.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if n < 2:
        raise ValueError(f"need at least 2 embeddings, got {n}")
    r = class_counts(labels)
    k = int(min(n - 1, max(max(ks), int(r.max()))))
    if backend == "auto":
        backend, device = knn.pick_backend(True, device)
    t0 = time.perf_counter()
    _, ids = knn.search(embeddings, None, k, backend=backend, device=device, dtype=dtype, chunk=chunk)
    seconds = time.perf_counter() - t0
    out = metrics_from_neighbours(ids, labels, ks, chunk)
    out.update(search_seconds=round(seconds, 3), backend=f"{backend}-{device}-{dtype}", num_images=n)
    return out


# ------------------------------------------------------------------------------------------------ table
COLUMNS = [
    ("recall@1", "Recall@1"),
    ("recall@10", "Recall@10"),
    ("recall@100", "Recall@100"),
    ("recall@1000", "Recall@1000"),
    ("map@r", "MAP@R"),
    ("seed_map", "seed-MAP"),
]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table like the seed README's: Architecture | Training | metrics in percent.

    Each row is a metrics dict (fractions) with optional ``architecture`` and ``training`` entries
    (e.g. "SwinV2-B", "untrained" / "pretrained" / "finetuned"); a missing metric prints as "-".
    """
    head = ["Architecture", "Training"] + [name for _, name in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(COLUMNS)) + "|"]
    for row in rows:
        cells = [str(row.get("architecture", "")), str(row.get("training", ""))]
        cells += [f"{100 * row[key]:.2f}" if row.get(key) is not None else "-" for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    print(format_table(rows))


# ------------------------------------------------------------------------------------------------ input
def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: file not found (an embeddings folder holds embeddings.npy and labels.npy)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npy array ({e})") from e


def load_embeddings(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``embeddings.npy`` (N x d float) and ``labels.npy`` (N ints), validated with messages naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (expected an embeddings folder from `retrieval embed`)")
    emb_path, lab_path = folder / "embeddings.npy", folder / "labels.npy"
    emb, labels = _load_array(emb_path), _load_array(lab_path)
    if emb.ndim != 2 or emb.shape[0] < 2 or emb.shape[1] < 1:
        raise UserError(f"{emb_path}: expected shape (N >= 2, d), got {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise UserError(f"{emb_path}: expected float32/float16 values, got {emb.dtype}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{lab_path}: expected a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if len(labels) != len(emb):
        raise UserError(f"{lab_path}: {len(labels)} labels but {emb_path.name} has {len(emb)} rows")
    bad = ~np.isfinite(emb).all(1)
    if bad.any():
        raise UserError(
            f"{emb_path}: {int(bad.sum())} rows contain NaN or inf (first: row {int(np.flatnonzero(bad)[0])})"
        )
    return np.ascontiguousarray(emb, dtype=np.float32), labels.astype(np.int64)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB.

    Linux: ``VmHWM`` of /proc/self/status, which starts afresh at exec; ``ru_maxrss`` would also count
    the RSS of the parent at fork time (a benchmark that spawns the eval would measure itself).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# -------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, type=Path, help="folder with embeddings.npy + labels.npy")
    parser.add_argument("--out", type=Path, default=None, help="where metrics.json goes (default: --embeddings)")
    parser.add_argument("--backend", choices=knn.BACKENDS, default="auto")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", choices=knn.DTYPES, default="fp32", help="torch backend ranking precision")
    parser.add_argument("--chunk", type=int, default=4096, help="queries per block (memory O(chunk x N))")


def run(args: argparse.Namespace) -> int:
    if args.chunk < 1:
        raise UserError(f"--chunk: expected a positive integer, got {args.chunk}")
    emb, labels = load_embeddings(args.embeddings)
    log.info("eval: %d embeddings of dimension %d from %s", len(emb), emb.shape[1], args.embeddings)
    metrics = retrieval_metrics(
        emb, labels, backend=args.backend, chunk=args.chunk, device=args.device, dtype=args.dtype
    )
    metrics["peak_rss_gb"] = round(peak_rss_gb(), 3)
    metrics["embeddings"] = str(args.embeddings)
    out = args.out or args.embeddings
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_table([{"architecture": metrics["embeddings"], "training": "", **metrics}])
    print(
        f"R-Precision {100 * metrics['r_precision']:.2f}  queries {metrics['num_queries']} "
        f"(excluded, no other image of their class: {metrics['num_excluded']})  "
        f"search {metrics['search_seconds']:.1f} s ({metrics['backend']})  peak RSS {metrics['peak_rss_gb']:.2f} GB"
    )
    log.info("wrote %s", out / "metrics.json")
    return 0
