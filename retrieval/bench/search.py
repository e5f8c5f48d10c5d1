"""``retrieval bench search``: exact all-vs-all top-k, every available backend against Faiss in the same run.

    retrieval bench search --out bench-out            # 60,502 x 60,502 x 1024, k = 1001 (SOP test size), minutes
    retrieval bench search --quick                    # 10,000 x 256

The task is the SOP evaluation's search: N random unit vectors each query all N, k = 1001 results
including the query itself (as the seed searched: self + 1000), i.e. the top 1000 *other* rows, self
removed by index. Faiss ``IndexFlatIP`` (CPU; GPU when the installed Faiss has it) is the reference;
ours are the torch backends (CPU: symmetric tiles + seeded heaps, and the plain chunked matmul + topk;
CUDA: fp32, tf32, bf16 ranking with fp32 re-scoring). For each: seconds, recall@1000 and the fraction
of rows whose neighbour set is identical to the fp32 reference, and where sets differ whether the
swapped neighbours are near-ties (|score - k-th score| < 1e-5, i.e. float32 summation order).
Also: peak RSS of ``retrieval_metrics`` (the eval command's work) at the same size in a fresh process,
and (full level, when memory allows) IVF / HNSW at 1M random vectors: build time, QPS, recall@10.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval import knn
from retrieval.bench import common

log = logging.getLogger(__name__)

# level -> (N, d, k including self, timed repeats on CPU)
SIZES = {"tiny": (1500, 32, 101, 1), "quick": (10_000, 256, 1001, 3), "full": (60_502, 1024, 1001, 1)}
ANN = {"n": 1_000_000, "d": 128, "queries": 1000, "k": 10, "train": 100_000}
ANN_CONFIGS = [
    ("IVF1024,Flat", "nprobe", (8, 64)),
    ("IVF1024,PQ32", "nprobe", (64,)),
    ("HNSW32", "efSearch", (64, 256)),
]


def random_unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def compare(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], tie_tol: float = 1e-5) -> dict:
    """Recall of ``got`` against ``ref``, identical-set rows, and whether every difference is a near-tie."""
    ref_s, ref_i = ref
    got_s, got_i = got
    k = ref_i.shape[1]
    same_rows = (np.sort(ref_i, 1) == np.sort(got_i, 1)).all(1)
    diff = np.flatnonzero(~same_rows)
    missed = 0
    ties_only = True
    for r in diff:
        lost = np.setdiff1d(ref_i[r], got_i[r])
        missed += len(lost)
        lost_scores = ref_s[r][np.isin(ref_i[r], lost)]
        ties_only &= bool(np.all(np.abs(lost_scores - ref_s[r, -1]) < tie_tol))
    return {
        "recall": 1.0 - missed / ref_i.size,
        "identical_rows": float(same_rows.mean()),
        "rows_differing": int(len(diff)),
        "differences_are_near_ties": ties_only,
        "max_abs_score_diff_at_rank": float(np.abs(ref_s - got_s).max()),
        "k": k,
    }


def _backends(level: str) -> list[tuple[str, str, dict]]:
    """(name, device, search kwargs) for everything measurable here; the first is the reference."""
    rows = [("faiss-cpu IndexFlatIP", "cpu", {"backend": "faiss", "device": "cpu"})]
    if torch.cuda.is_available() and knn.faiss_has_gpu():
        rows.append(("faiss-gpu IndexFlatIP", "cuda", {"backend": "faiss", "device": "cuda"}))
    rows.append(("ours torch-cpu symmetric fp32", "cpu", {"backend": "torch", "device": "cpu", "symmetric": True}))
    rows.append(
        ("torch-cpu chunked matmul+topk fp32", "cpu", {"backend": "torch", "device": "cpu", "symmetric": False})
    )
    if torch.cuda.is_available():
        for dt in ("fp32", "tf32", "bf16"):
            rows.append((f"ours torch-cuda {dt}", "cuda", {"backend": "torch", "device": "cuda", "dtype": dt}))
    return rows


def exact_backends(level: str) -> tuple[dict, dict, list[list]]:
    n, d, k_with_self, repeats = SIZES[level]
    k = k_with_self - 1
    x = random_unit(n, d)
    results: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    ref = None
    for name, device, kw in _backends(level):
        cuda = device == "cuda"
        stat, out = common.time_calls(
            lambda kw=kw: knn.search(x, None, k, **kw),
            repeats=3 if cuda else repeats,
            device=device,
            warmup=1 if cuda else 0,
        )
        stat["queries_per_s"] = n / stat["median"]
        results[name] = stat
        if ref is None:
            ref = out
        checks[name] = compare(ref, out)
        log.info("bench search: %s %.2f s, recall %.6f", name, stat["median"], checks[name]["recall"])
    base = results["faiss-cpu IndexFlatIP"]["median"]
    table = [
        [name, s["median"], base / s["median"], checks[name]["recall"], checks[name]["identical_rows"]]
        for name, s in results.items()
    ]
    return results, checks, table


def eval_peak_memory(level: str) -> dict[str, Any]:
    """``retrieval_metrics`` on N random embeddings with SOP-like classes (2-12 images) in a fresh process."""
    n, d, _, _ = SIZES[level]
    code = f"""
import json, numpy as np
from retrieval.bench.search import random_unit
from retrieval.evaluate import retrieval_metrics, peak_rss_gb
rng = np.random.default_rng(0)
sizes = rng.integers(2, 13, {n})
labels = np.repeat(np.arange({n}), sizes)[:{n}]
x = random_unit({n}, {d})
base = peak_rss_gb()
m = retrieval_metrics(x, labels)
print(json.dumps({{"peak_rss_gb": peak_rss_gb(), "rss_before_search_gb": base, "search_seconds": m["search_seconds"],
                  "backend": m["backend"], "num_queries": m["num_queries"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ann_at_scale(seed: int = 1) -> dict[str, Any]:
    """IVF / HNSW over 1M random unit vectors: build seconds, QPS, recall@10 against exact search."""
    import faiss
    import psutil

    n, d, nq, k = ANN["n"], ANN["d"], ANN["queries"], ANN["k"]
    need_gb = n * d * 4 * 3 / 2**30  # vectors + the index's copy + slack
    if psutil.virtual_memory().available / 2**30 < need_gb + 2:
        return {"skipped": f"needs ~{need_gb + 2:.1f} GB free"}
    xb, xq = random_unit(n, d, seed), random_unit(nq, d, seed + 1)
    _, exact = knn.search(xq, xb, k, backend="faiss")
    out: dict[str, Any] = {"config": dict(ANN)}
    for factory, param, values in ANN_CONFIGS:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(xb[np.random.default_rng(seed).choice(n, ANN["train"], replace=False)])
        index.add(xb)
        build = time.perf_counter() - t0
        for v in values:
            faiss.ParameterSpace().set_index_parameter(index, param, v)
            stat, (_, got) = common.time_calls(lambda index=index: index.search(xq, k), repeats=3, warmup=1)
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact, strict=True)]))
            out[f"{factory} {param}={v}"] = {
                "build_seconds": round(build, 1),
                "queries_per_s": nq / stat["median"],
                "recall@10": recall,
                "search": stat,
            }
        del index
    return out


def run_bench(quick: bool, out_dir: Path, tiny: bool = False) -> dict[str, Any]:
    level = common.level_of(quick, tiny)
    n, d, k_with_self, repeats = SIZES[level]
    results, checks, table = exact_backends(level)
    peak = eval_peak_memory(level)
    ann = ann_at_scale() if level == "full" else {"skipped": f"{level} level: only at full level"}
    base = results["faiss-cpu IndexFlatIP"]
    ours = results["ours torch-cpu symmetric fp32"]
    ratios = {"ours_cpu_speedup_vs_faiss_cpu": common.ratio(base, ours)}
    if "ours torch-cuda bf16" in results:
        ratios["cuda_bf16_speedup_vs_cuda_fp32"] = common.ratio(
            results["ours torch-cuda fp32"], results["ours torch-cuda bf16"]
        )
    notes = [
        f"{n} x {n} x {d} random unit vectors, k={k_with_self} incl. self (top {k_with_self - 1} others), "
        f"{repeats} timed repeat(s) on CPU, 1 warm-up + 3 on CUDA; reference = faiss-cpu IndexFlatIP",
        "speedup = faiss-cpu seconds / ours seconds (>= 1: ours is at least as fast)",
    ]
    payload = common.envelope(
        "search",
        level,
        common.default_device(),
        {"n": n, "d": d, "k_including_self": k_with_self, "cpu_repeats": repeats},
        {"exact": results},
        ratios,
        notes,
        goals={"ours_cpu_speedup_vs_faiss_cpu": 1.0},
        checks=checks,
        eval_peak=peak,
        ann=ann,
    )
    print(common.format_table(("backend", "seconds", "speedup vs faiss-cpu", "recall", "identical rows"), table))
    if "error" not in peak:
        print(f"eval at {n} x {d}: peak RSS {peak['peak_rss_gb']:.2f} GB, search {peak['search_seconds']:.1f} s")
    for name, row in ann.items():
        if isinstance(row, dict) and "recall@10" in row:
            print(
                f"{name}: build {row['build_seconds']} s, {row['queries_per_s']:.0f} QPS, recall@10 {row['recall@10']:.3f}"
            )
    return common.publish(out_dir, payload)
