"""Scale benchmark: a catalogue after training, from embedding parts to a tuned index and a query/gallery eval.

    python -m bench.scale                                   # 100k and 1M rows, d = 256 (about 10 min on 2 cores)
    python -m bench.scale --compare runs/x/emb-test         # a trained model's embeddings beside the synthetic data
    python -m bench.scale --sizes 100000 --out /tmp/scale   # one size
    make bench-scale

Synthetic embeddings (:mod:`bench.synthetic`; ``--data trained``, the default: 5 images per product, products
around 12 categories in a 24-dimensional subspace, matched to the demo's trained model on six neighbourhood
statistics that ``--compare EMB_DIR`` prints; ``--data isotropic``: N / 50 classes in all 256 dimensions, the worst
case) are written through the library's part writer as two ranks would, then every step runs in its own process,
so its peak RSS (VmHWM) is its own:

- ``write``: two writers streaming the rows into parts (what each rank of ``retrieval embed`` does after the model).
- ``read``: ``EmbeddingSet.load`` of the parts, one float32 copy (``vectors32``) and a pass over ``blocks()``.
- ``index``: ``retrieval index build --factory auto --target-recall 0.95 --k 10 --gpu none`` (the real command).
- ``search``: 1,000 new queries of the same classes: recall@10 of the auto index against an exact search run here
  (the raw baselines on the same cores, the faster counts: Faiss' blocked brute force, torch matmul + top-k), and
  queries/s of both (medians of 7 and 3 repeats).
- ``eval``: ``retrieval eval --query-embeddings Q --gallery-embeddings G`` with 10,000 new queries against the N-row gallery.

The report prints every figure, how it grows from the first size to the last (the exponent b of t ~ N^b) and the
10M projection from that growth; ``--out`` keeps ``scale.json``. Only the public API and the commands are used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.synthetic import D, centres, clustered, compare, family

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_PART = 65536
TUNE, SEARCH_QUERIES, EVAL_QUERIES = 1000, 1000, 10_000
EXACT_REPEATS, AUTO_REPEATS = 3, 7  # the search step's timings are medians of these


# --------------------------------------------------------------------------------------------- data
def write_set(folder: Path, n: int, classes_of: int, seed: int, world: int = 2, more: tuple[int, int] = (0, 0)) -> None:
    """``n`` rows of the classes of size ``classes_of``, written as parts by ``world`` writers (ranks), block by
    block; ``more`` = (rows, seed): also the rows ``write_set(..., rows, ..., seed)`` writes, by one more writer (the
    union of a catalogue and an update: what a full rebuild reads)."""
    from retrieval.embed.embeddings import EmbeddingSet

    c = centres(classes_of)
    writers = [EmbeddingSet.writer(folder, r, ROWS_PER_PART) for r in range(world + bool(more[0]))]
    _write_rows(writers[:world], c, n, seed)
    if more[0]:
        _write_rows(writers[world:], c, *more)
    for w in writers:
        w.close({"seconds": 0.0})
    count = EmbeddingSet.finish_parts(folder, len(writers), D)["count"]
    EmbeddingSet.write_meta(folder, {"model": "synthetic", "split": folder.name}, count, D)


def _write_rows(writers: list, c, n: int, seed: int, block: int = 16384) -> None:
    for b, s0 in enumerate(range(0, n, block)):
        x, labels = clustered(c, min(block, n - s0), [seed, b])
        ids = np.arange(s0, s0 + len(x), dtype=np.int64) + 1 + seed * 10**9
        writers[b % len(writers)].add(x, {"ids": ids, "labels": labels, "super_labels": labels % 12}, [])


# --------------------------------------------------------------------------------------------- steps
def step_write(a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    write_set(Path(a.folder), a.rows or a.n, a.n, a.seed)
    return {"seconds": time.perf_counter() - t0}


def step_read(a: argparse.Namespace) -> dict:
    from retrieval.embed.embeddings import EmbeddingSet

    t0 = time.perf_counter()
    es = EmbeddingSet.load(a.folder)
    loaded = time.perf_counter()
    rows = sum(len(ids) for ids, _ in es.blocks())
    streamed = time.perf_counter()
    x = es.vectors32()
    assert rows == len(x) == len(es)
    return {"load_s": loaded - t0, "stream_s": streamed - loaded, "vectors32_s": time.perf_counter() - streamed}


def step_search(a: argparse.Namespace) -> dict:
    from bench.common import Repeats, time_calls
    from retrieval.embed.embeddings import EmbeddingSet
    from retrieval.index.folder import IndexFolder

    q, _ = clustered(centres(a.n), SEARCH_QUERIES, [7, 7])
    faiss_s, torch_s, rows, same = _exact_timings(q, a.folder)
    exact_s = min(faiss_s, torch_s)  # the faster exact search is the baseline
    ids = EmbeddingSet.load(a.folder, vectors=False).ids
    index = IndexFolder.load(a.index)
    index.search(q[:100], 10)  # warm
    auto, (_, found) = time_calls(lambda: index.search(q, 10), Repeats(0, AUTO_REPEATS))
    auto_s = auto["median"]
    truth = ids[rows]
    recall = float((found[:, :, None] == truth[:, None, :]).any(2).mean())
    return {
        "recall@10": recall,
        "exact_qps": len(q) / exact_s,
        "exact_faiss_qps": len(q) / faiss_s,
        "exact_torch_qps": len(q) / torch_s,
        "exact_agree": same,
        "auto_qps": len(q) / auto_s,
        "repeats": {"exact": EXACT_REPEATS, "auto": AUTO_REPEATS},
    }


def _exact_timings(q: np.ndarray, folder: str) -> tuple[float, float, np.ndarray, float]:
    """Median seconds of the two raw exact searches over the whole set in memory (Faiss' blocked brute force;
    torch matmul + top-k in blocks of 256 queries), Faiss' top-10 rows and the two's agreement."""
    import faiss
    import torch

    from bench.common import Repeats, time_calls
    from retrieval.embed.embeddings import EmbeddingSet

    x = EmbeddingSet.load(folder).vectors32()
    qt, xt = torch.from_numpy(q), torch.from_numpy(x)
    reps = Repeats(0, EXACT_REPEATS)
    f, (_, rows) = time_calls(lambda: faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT), reps)
    t, rows_t = time_calls(
        lambda: torch.cat([torch.topk(qt[i : i + 256] @ xt.T, 10).indices for i in range(0, len(q), 256)]).numpy(),
        reps,
    )
    return f["median"], t["median"], rows, float((rows_t[:, :, None] == rows[:, None, :]).any(2).mean())


def step_run(a: argparse.Namespace) -> dict:
    from retrieval.cli import main

    t0 = time.perf_counter()
    rc = main(a.argv)
    if rc != 0:
        raise SystemExit(f"retrieval {' '.join(a.argv)}: exit {rc}")
    return {"seconds": time.perf_counter() - t0}


def step_baseline(a: argparse.Namespace) -> dict:
    """A process that only imports what the commands import (torch, timm, faiss): the RSS floor of every step."""
    from retrieval import metrics  # noqa: F401
    from retrieval.embed import embeddings  # noqa: F401
    from retrieval.index import folder  # noqa: F401

    return {}


STEPS = {"baseline": step_baseline, "write": step_write, "read": step_read, "search": step_search, "run": step_run}


def run_step(name: str, *args: str) -> dict:
    """One step in a fresh process: its result and its own peak RSS (VmHWM, GiB)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--step", choices=STEPS)
    p.add_argument("--folder")
    p.add_argument("--index")
    p.add_argument("--n", type=int)
    p.add_argument("--rows", type=int, help="write: rows (default --n; the classes are always those of --n)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("argv", nargs="*")
    a = p.parse_args(argv)
    out = STEPS[a.step](a)
    from retrieval.util import peak_rss_gb

    print(json.dumps({**out, "peak_rss_gb": peak_rss_gb()}))


# --------------------------------------------------------------------------------------------- one size
def bench_size(n: int, root: Path, evaluate: bool = True) -> dict:
    work = root / f"n{n}"
    gallery, queries, index = work / "gallery", work / "queries", work / "index"
    res: dict = {"n": n, "d": D, "data_gb": n * D * 4 / 2**30, "load_before": os.getloadavg()[0]}
    res["baseline_rss_gb"] = run_step("baseline")["peak_rss_gb"]
    res["write"] = run_step("write", "--folder", str(gallery), "--n", str(n))
    run_step("write", "--folder", str(queries), "--n", str(n), "--rows", str(EVAL_QUERIES), "--seed", "1")
    res["read"] = run_step("read", "--folder", str(gallery))
    build = ["index", "build", "--embeddings", str(gallery), "--out", str(index), "--factory", "auto"]
    build += ["--target-recall", "0.95", "--k", "10", "--gpu", "none", "--tune-queries", str(TUNE)]
    res["index"] = run_step("run", "--", *build)
    info = json.loads((index / "index.json").read_text())
    res["index"].update(factory=info["factory"], params=info["search_params"], chosen=info["auto"]["chosen"])
    res["index"]["tried"] = [(t["factory"], len(t["trials"]), t["met"]) for t in info["auto"]["tried"]]
    res["search"] = run_step("search", "--folder", str(gallery), "--index", str(index), "--n", str(n))
    if not evaluate:
        res["load_after"] = os.getloadavg()[0]
        return res
    ev = ["eval", "--query-embeddings", str(queries), "--gallery-embeddings", str(gallery), "--out", str(work / "eval")]
    res["eval"] = run_step("run", "--", *ev)
    m = json.loads((work / "eval" / "metrics.json").read_text())
    res["eval"].update({k: m[k] for k in ("recall@1", "recall@10", "map@r", "map@100", "search_seconds")})
    res["load_after"] = os.getloadavg()[0]
    return res


def _growth(first: dict, last: dict, key: tuple[str, str], target: int = 10_000_000) -> tuple[float, float]:
    """Exponent b of value ~ N^b between two sizes, and the value projected to ``target`` rows.

    Peak RSS is a floor (the libraries) plus what grows with the data: its projection is the straight line through
    the two sizes (a power law through two points would bend it down)."""
    v0, v1 = first[key[0]][key[1]], last[key[0]][key[1]]
    b = math.log(max(v1, 1e-9) / max(v0, 1e-9)) / math.log(last["n"] / first["n"])
    if key[1] == "peak_rss_gb":
        return b, v1 + (v1 - v0) * (target - last["n"]) / (last["n"] - first["n"])
    return b, v1 * (target / last["n"]) ** b


def report(results: list[dict]) -> str:
    f = family()
    lines = [
        f"scale benchmark: d = {D}, data {f.name} ({f.per_class} per class, spread {f.spread}, latent dimension "
        f"{f.latent or D}), {os.cpu_count()} cores, {len(results)} size(s)"
    ]
    for r in results:
        i, s = r["index"], r["search"]
        e = r.get("eval") or {k: float("nan") for k in ("seconds", "search_seconds", "peak_rss_gb", "recall@1")}
        e.setdefault("map@r", float("nan"))
        e.setdefault("map@100", float("nan"))
        lines += [
            f"N = {r['n']:,} ({r['data_gb']:.2f} GiB of float32 vectors; a process importing the libraries alone "
            f"peaks at {r['baseline_rss_gb']:.2f} GiB; load average {r['load_before']:.1f} before, "
            f"{r['load_after']:.1f} after: other jobs share these cores)",
            f"  write parts (2 writers)  {r['write']['seconds']:7.1f} s   peak RSS {r['write']['peak_rss_gb']:.2f} GiB",
            f"  read parts: load {r['read']['load_s']:.1f} s, stream {r['read']['stream_s']:.1f} s, "
            f"vectors32 {r['read']['vectors32_s']:.1f} s   peak RSS {r['read']['peak_rss_gb']:.2f} GiB",
            f"  index build auto -> {i['factory']} {i['params']}  {i['seconds']:7.1f} s   "
            f"peak RSS {i['peak_rss_gb']:.2f} GiB   tried {i['tried']}",
            f"    tuned on {TUNE} held-out rows: {i['chosen']}",
            f"  search {SEARCH_QUERIES} new queries (medians of {AUTO_REPEATS} / {EXACT_REPEATS}): recall@10 {s['recall@10']:.4f} vs exact; "
            f"{s['auto_qps']:,.0f} q/s vs exact {s['exact_qps']:,.0f} q/s (x{s['auto_qps'] / s['exact_qps']:.1f}; "
            f"exact: faiss {s['exact_faiss_qps']:,.0f}, torch {s['exact_torch_qps']:,.0f} q/s)",
            f"  eval {EVAL_QUERIES} queries x gallery {r['n']:,}: {e['seconds']:.1f} s (search {e['search_seconds']} s)"
            f"   peak RSS {e['peak_rss_gb']:.2f} GiB   R@1 {e['recall@1']:.4f} MAP@R {e['map@r']:.4f} "
            f"mAP@100 {e['map@100']:.4f}",
        ]
    if len(results) > 1:
        first, last = results[0], results[-1]
        lines.append(
            f"growth {first['n']:,} -> {last['n']:,} (value ~ N^b) and the 10M projection "
            "(times: the power law; peak RSS: the straight line through both sizes):"
        )
        keys = [("write", "seconds"), ("write", "peak_rss_gb"), ("read", "load_s"), ("read", "peak_rss_gb")]
        keys += [("index", "seconds"), ("index", "peak_rss_gb")]
        keys += [("eval", "seconds"), ("eval", "peak_rss_gb")] if "eval" in first and "eval" in last else []
        keys += [("search", "auto_qps"), ("search", "exact_qps")]
        for key in keys:
            b, proj = _growth(first, last, key)
            lines.append(
                f"  {key[0]:>6} {key[1]:<12} {first[key[0]][key[1]]:10.2f} -> {last[key[0]][key[1]]:10.2f}"
                f"   b = {b:5.2f}   10M: {proj:10.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--step":
        _child(argv)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--out", type=Path, default=Path("/tmp/retrieval-bench-scale"))
    p.add_argument("--data", choices=("trained", "isotropic"), default="trained", help="synthetic family")
    p.add_argument("--spread", type=float, nargs=2, metavar=("LO", "HI"), help="per-class spread range (override)")
    p.add_argument("--latent", type=int, help="dimension of the data's subspace (override; 0: all d)")
    p.add_argument("--compare", metavar="EMB_DIR", help="print an embeddings folder's statistics beside the data's")
    p.add_argument("--no-eval", action="store_true", help="skip the query/gallery eval step")
    a = p.parse_args(argv)
    os.environ["BENCH_SCALE_DATA"] = a.data
    if a.spread:
        os.environ["BENCH_SCALE_SPREAD"] = f"{a.spread[0]},{a.spread[1]}"
    if a.latent is not None:
        os.environ["BENCH_SCALE_LATENT"] = str(a.latent)
    if a.compare:
        print(compare(a.compare))
        return 0
    results = []
    for n in a.sizes:
        results.append(bench_size(n, a.out, not a.no_eval))
        print(report(results[-1:]), flush=True)
    text = report(results)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scale.json").write_text(json.dumps(results, indent=1) + "\n")
    (a.out / "scale.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
