"""``bench search``: exact all-vs-all top-k with ``retrieval.knn.search`` against Faiss ``IndexFlatIP``.

N random unit vectors each query all N, the top k others (self excluded by index), as SOP evaluation searches.
The baseline is a plain ``faiss.IndexFlatIP`` (top k + 1, self dropped); ours is ``retrieval.knn.search`` with
its automatic backend and with each torch path forced. Rates are queries/s (ratio > 1: ours is faster); recall
is the share of Faiss' neighbour ids that ours finds (below 1 only through near-ties at rank k).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from bench import common
from retrieval import knn

SIZES = {
    "tiny": (1500, 32, 100, 2),
    "quick": (10_000, 256, 1000, 3),
    "full": (60_502, 1024, 1000, 1),
}  # N, d, k, repeats


def run(opts: common.Options) -> dict:
    n, d, k, repeats = SIZES[opts.level]
    x = random_unit(n, d)
    reps = common.Repeats(1 if opts.level != "full" else 0, repeats)
    ours = {
        "knn.search auto": {},
        "knn.search torch chunked": {"backend": "torch", "device": "cpu", "symmetric": False},
    }
    ours["knn.search torch symmetric"] = {"backend": "torch", "device": "cpu", "symmetric": True}
    for dtype in ("fp32", "bf16") if common.cuda() else ():
        ours[f"knn.search torch cuda {dtype}"] = {"backend": "torch", "device": "cuda", "dtype": dtype}
    results: dict[str, Any] = {}
    found: dict[str, np.ndarray] = {}
    results["faiss IndexFlatIP"], found["faiss IndexFlatIP"] = timed(lambda: faiss_flat(x, k), n, reps)
    for name, kw in ours.items():
        results[name], found[name] = timed(lambda kw=kw: knn.search(x, None, k, **kw)[1], n, reps)
    base = found["faiss IndexFlatIP"]
    for name in ours:
        results[name]["recall_vs_faiss"] = recall(base, found[name])
    ratios = {f"{name} / faiss IndexFlatIP": common.ratio(results[name], results["faiss IndexFlatIP"]) for name in ours}
    config = {
        "n": n,
        "d": d,
        "k": k,
        "auto_backend": knn.pick_backend(True),
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    notes = [f"{n} x {n} x {d} random unit vectors, top {k} others; ratio = queries/s ours / queries/s Faiss"]
    notes += ["recall vs Faiss: " + ", ".join(f"{name} {results[name]['recall_vs_faiss']:.6f}" for name in ours)]
    return common.publish("search", opts, config, results, ratios, notes)


def random_unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_flat(x: np.ndarray, k: int) -> np.ndarray:
    """The plain Faiss way: a flat inner-product index, top k + 1, each row's own id dropped."""
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, ids = index.search(x, k + 1)
    own = ids == np.arange(len(x))[:, None]
    own[~own.any(1), -1] = True  # self not in the top k + 1 (ties): drop the last instead
    return ids[~own].reshape(len(x), k)


def timed(fn, n: int, reps: common.Repeats) -> tuple[dict[str, Any], np.ndarray]:
    out: list[np.ndarray] = []
    stats = common.time_rate(lambda: out.append(fn()), n, reps, unit="queries/s")
    return stats, out[-1]


def recall(ref: np.ndarray, got: np.ndarray) -> float:
    """Share of ``ref``'s ids per row also in ``got``'s row (one searchsorted over row-offset ids)."""
    offset = (len(ref) + 1) * np.arange(len(ref), dtype=np.int64)[:, None]
    flat = np.sort(ref + offset, axis=1).ravel()
    want = (got + offset).ravel()
    pos = np.searchsorted(flat, want).clip(max=len(flat) - 1)
    return float((flat[pos] == want).mean())
