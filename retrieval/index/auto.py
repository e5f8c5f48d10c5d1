"""Index to a target: ``retrieval index build --factory auto --target-recall 0.95 --k 10 [--max-memory 8G]``.

The candidates (:func:`candidates`) follow from the catalogue's size N, its dimension d and the memory budget:

- N <= 20,000: ``Flat`` (exact; scanning this few vectors is already fast).
- the vectors fit the budget (N x (4d + 16) bytes with ids): ``IVF{nlist},Flat`` (nlist ~ 4 sqrt(N), a power of
  two, at most N / 39), then ``HNSW32`` (CPU only: no GPU form; N x (4d + 272) bytes, slow to build on few cores),
  then ``Flat`` (always meets the target). On GPU(s) (``--gpu``, a Faiss with GPU support) IVF and Flat are
  tuned in their GPU form.
- they do not: ``IVF{nlist},PQ{m}``, the largest m (bytes per vector, dividing d) that fits.

Each candidate is trained on a sample (``--train-sample`` rows), filled block by block from the embeddings' parts
(never all vectors twice in memory), then tuned on held-out queries against their exact top-k among the other rows:
rows set aside before the training sample is drawn and kept out of the index until it is tuned, so they query it
as new images would (none trained the centroids, none is a node of the HNSW graph); they join the chosen index at the end.
``nprobe`` (IVF) or ``efSearch`` (HNSW) climbs :func:`ladder` (steps of at most 1.5x) until recall@k reaches the
target plus ``MARGIN`` (the queries are a sample: the margin keeps new queries above the target). The first
candidate that meets it at ``MIN_SPEEDUP`` (10) x the exact scan's queries/s or more is saved with that setting;
else the next ones are tried too (the best so far waits on disk, so one index is in memory at a time) and the
fastest that meets it wins: data without cluster structure can need nprobe near nlist. Every tried setting's
recall@k, ms/query and queries/s goes into ``index.json`` under ``auto``, beside the exact search's.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval import knn
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.index.folder import (
    blocks_without,
    building,
    fill,
    make_base,
    parse_gpus,
    place,
    save_folder,
    set_search_params,
    train_base,
)
from retrieval.util import release_freed_memory

log = logging.getLogger(__name__)

SMALL_N = 20_000
MARGIN = 0.01
# a candidate that meets the target at under 10x the exact scan's queries/s: the next is tried too, the fastest that
# meets it wins. At 1M x 256 (bench/scale.py) IVF4096 needs nprobe 96-128 (5-7x) where HNSW32 reaches the same
# recall at efSearch 64 (20x+): stopping at 2x kept the slower index.
MIN_SPEEDUP = 10.0


def ladder(top: int, start: int = 1) -> tuple[int, ...]:
    """start, then 1, 1.5, 2, 3, 4, 6, 8, ... x start up to ``top`` (and ``top``): steps of at most 1.5x, so the
    first setting that meets a target overshoots it by little (doubling 64 -> 128 halved the speed for 0.945 ->
    0.99)."""
    out, v = {top}, start
    while v < top:
        out.update({v, min(top, v * 3 // 2)})
        v *= 2
    return tuple(sorted(out))


HNSW_EF = ladder(1024, 16)
SPILL = ".auto-best.faiss"  # in the output folder, while a later candidate fills


@dataclass(frozen=True)
class Candidate:
    factory: str
    param: str | None  # "nprobe" | "ef_search" | None (exact: nothing to tune)
    values: tuple[int, ...]
    bytes: int  # estimated memory of the filled index


def parse_bytes(text: str | None) -> int | None:
    """``8G``, ``512M``, ``1.5T``, ``1000000`` -> bytes (binary units); None -> no budget."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise UserError(f"--max-memory: expected a size like 8G, 512M or 1.5T, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def nlist_for(n: int) -> int:
    return int(max(16, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39, 65536)))


def candidates(n: int, d: int, budget: int | None, gpu: bool = False) -> list[Candidate]:
    """The indexes worth trying for ``n`` x ``d`` within ``budget`` bytes, most preferred first."""
    flat = n * (4 * d + 16)
    exact = Candidate("Flat", None, (), flat)
    if n <= SMALL_N and (budget is None or flat <= budget):
        return [exact]
    nlist = nlist_for(n)
    probes = ladder(nlist)
    if budget is None or flat <= budget:
        out = [Candidate(f"IVF{nlist},Flat", "nprobe", probes, flat + nlist * d * 4)]
        if not gpu:
            out.append(Candidate("HNSW32", "ef_search", HNSW_EF, n * (4 * d + 32 * 2 * 4 + 16)))
        return out + [exact]
    for m in sorted({x for x in (d // 2, d // 4, d // 8, d // 16, 8, 4) if x >= 1 and d % x == 0}, reverse=True):
        size = n * (m + 16) + nlist * d * 4
        if size <= budget:
            return [Candidate(f"IVF{nlist},PQ{m}", "nprobe", probes, size)]
    raise UserError(f"--max-memory {budget} bytes: too small for {n} x {d} even as IVF-PQ with 4 bytes per vector")


# ------------------------------------------------------------------------------------------ exact answers
@dataclass
class Probe:
    """Held-out queries: rows of the set kept out of every candidate until it is tuned, as new images are (a query
    inside an HNSW graph reaches its neighbours through its own links: at 100k, efSearch 16 read 0.976 on such
    queries and 0.911 on new ones), and their exact top-k ids among the other rows. ``ids`` is sorted."""

    ids: np.ndarray
    x: np.ndarray
    truth: np.ndarray
    exact_seconds: float


def exact_topk(es: EmbeddingSet, q: np.ndarray, skip: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k image ids among the rows whose id is not in ``skip`` (sorted), streaming the set's blocks
    through :func:`knn.stream_topk` (numpy matmul + thresholded selection: 2x Faiss' flat scan here, and the
    index build stays free of torch): memory O(block + queries x k)."""
    return knn.stream_topk(q, blocks_without(es, skip), k, score_bytes=64 << 20)[1]


def split_rows(n: int, queries: int, train_sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out query rows first (at most a tenth of the set), then training rows from the others only: a query
    that trained the centroids sits closer to one than a new image would, and its recall reads too high."""
    perm = np.random.default_rng(seed).permutation(n)
    nq = max(1, min(queries, n // 10))
    return np.sort(perm[:nq]), np.sort(perm[nq : nq + train_sample])


def held_out(es: EmbeddingSet, k: int, rows: np.ndarray) -> Probe:
    order = np.argsort(es.ids[rows], kind="stable")
    ids, x = es.ids[rows][order], np.ascontiguousarray(es.embeddings[rows][order], dtype=np.float32)
    t0 = time.perf_counter()
    truth = exact_topk(es, x, ids, k)
    return Probe(ids, x, truth, time.perf_counter() - t0)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k."""
    return float((found[:, :, None] == truth[:, None, :]).any(2).mean())


# ------------------------------------------------------------------------------------------------- tuning
def tune(
    index: faiss.Index, cand: Candidate, probe: Probe, k: int, target: float, floor_qps: float = 0.0
) -> tuple[dict, list[dict], bool]:
    """Try the candidate's settings cheapest first; stop at the first whose recall@k reaches target + MARGIN, or
    once a setting is slower than ``floor_qps`` (the exact scan's: exact ``Flat`` always meets the target, and a
    larger nprobe/efSearch only gets slower; at 1M rows nprobe 2048 of 4096 took minutes per trial to lose).

    Returns the chosen trial (else the best one), every trial, and whether the target was met."""
    trials: list[dict] = []
    values = cand.values or (None,)  # the bar's ETA is for the whole ladder; the first setting that meets ends it
    for value in knn.bar(values, f"index auto: tune {cand.factory}" if len(values) > 1 else None):
        set_search_params(
            index, value if cand.param == "nprobe" else None, value if cand.param == "ef_search" else None
        )
        t0 = time.perf_counter()
        _, found = index.search(probe.x, k)
        seconds = max(time.perf_counter() - t0, 1e-9)
        recall = recall_at_k(found, probe.truth)
        trial = {f"recall@{k}": round(recall, 4), "ms_per_query": round(1e3 * seconds / len(probe.x), 4)}
        trial = {**({cand.param: value} if cand.param else {}), **trial, "qps": round(len(probe.x) / seconds, 1)}
        trials.append(trial)
        log.info("index auto: %s %s", cand.factory, trial)
        if recall >= min(1.0, target + MARGIN):
            return trial, trials, True
        if trial["qps"] < floor_qps:
            log.info(
                "index auto: %s slower than the streamed exact scan at %s; not tuning it further", cand.factory, trial
            )
            break
    return max(trials, key=lambda t: t[f"recall@{k}"]), trials, False


def _better(chosen: dict, met: bool, best: tuple | None, k: int) -> bool:
    """Among candidates that meet the target the fastest wins; before any meets it, the highest recall."""
    if best is None:
        return True
    _, b_chosen, _, b_met = best
    if met != b_met:
        return met
    return chosen["qps"] > b_chosen["qps"] if met else chosen[f"recall@{k}"] > b_chosen[f"recall@{k}"]


def _beaten_by_flat(rest: list[Candidate], chosen: dict, met: bool, exact: dict) -> bool:
    """Exact ``Flat`` still to come meets any target at least at the streamed exact scan's speed: a candidate that
    misses the target, or meets it slower than that scan, would lose to it, so it is not kept as the best."""
    return any(c.param is None for c in rest) and (not met or chosen["qps"] <= exact["qps"])


def _shortfall(cand: Candidate, chosen: dict, met: bool, target: Target, exact: dict) -> str:
    """Why a candidate was not kept at once, with what it measured beside the target and the streamed exact scan."""
    measured = f"recall@{target.k} {chosen[f'recall@{target.k}']:.4f}"
    setting = f" at {cand.param} {chosen[cand.param]}" if cand.param else ""
    if not met:
        return f"{cand.factory} does not reach recall@{target.k} {target.recall:.3f} (best {measured}{setting})"
    return (
        f"{cand.factory} meets recall@{target.k} {target.recall:.3f} ({measured}{setting}) at {chosen['qps']:.0f} "
        f"queries/s, {chosen['qps'] / max(exact['qps'], 1e-9):.1f}x the streamed exact scan ({exact['qps']:.0f}; "
        f"under {MIN_SPEEDUP:.0f}x)"
    )


def _build_candidate(es: EmbeddingSet, cand: Candidate, train_rows: np.ndarray, gpus: list[int], skip) -> tuple:
    """The candidate trained on ``train_rows`` and filled with every row but the held-out ones (``skip`` ids)."""
    t0 = time.perf_counter()
    base = make_base(es.dim, cand.factory)
    if not base.is_trained:
        base = train_base(base, es.embeddings[train_rows], cand.factory, gpus)
    trained = time.perf_counter()
    index = fill(base, es, skip, progress=f"index auto: add to {cand.factory}")
    timing = {"train_seconds": round(trained - t0, 3), "add_seconds": round(time.perf_counter() - trained, 3)}
    return index, timing


@dataclass
class Target:
    recall: float = 0.95
    k: int = 10
    max_memory: int | None = None
    queries: int = 1000


def _spill(index: faiss.Index | Path, folder: Path | None) -> faiss.Index | Path:
    """The best candidate so far, to a file while the next one fills: one index in memory at a time (1M x 256:
    IVF 1.0 GB held beside HNSW's 1.3 GB took the build past twice the data). Without a folder it stays."""
    if folder is None or isinstance(index, Path):
        return index
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SPILL
    faiss.write_index(index, str(path))
    return path


def _unspill(held: faiss.Index | Path) -> faiss.Index:
    if not isinstance(held, Path):
        return held
    index = faiss.read_index(str(held))
    held.unlink()
    return index


def auto_index(
    es: EmbeddingSet,
    target: Target,
    gpus: list[int],
    shard: bool,
    train_sample: int,
    seed: int = 0,
    spill: Path | None = None,
):
    """Build, tune and choose (module docstring); returns the CPU index, its search params and the ``auto`` record.
    ``spill``: a folder where the best candidate waits on disk while the next one is built."""
    cands = candidates(len(es), es.dim, target.max_memory, bool(gpus))
    query_rows, train_rows = split_rows(len(es), target.queries, train_sample, seed)
    probe = held_out(es, target.k, query_rows)
    exact = {"seconds": round(probe.exact_seconds, 3), "qps": round(len(probe.x) / max(probe.exact_seconds, 1e-9), 1)}
    tried, best = [], None
    for i, cand in enumerate(cands):
        index, timing = _build_candidate(es, cand, train_rows, gpus, probe.ids)
        floor = 0.0 if cand.param is None else exact["qps"]
        chosen, trials, met = tune(place(index, gpus, shard), cand, probe, target.k, target.recall, floor)
        tried.append({**asdict(cand), **timing, "met": met, "trials": trials})
        if _better(chosen, met, best, target.k) and not _beaten_by_flat(cands[i + 1 :], chosen, met, exact):
            best = (index, chosen, cand, met)
        del index  # only `best` holds a candidate's memory, and on disk while the next one fills
        if (met and chosen["qps"] >= MIN_SPEEDUP * exact["qps"]) or i + 1 == len(cands):
            break
        log.warning("index auto: %s; trying the next", _shortfall(cand, chosen, met, target, exact))
        if best is not None:
            best = (_spill(best[0], spill), *best[1:])
        release_freed_memory()  # what `del index` and the spill freed, before the next candidate fills
    best = (_unspill(best[0]), *best[1:])
    if spill is not None:
        (spill / SPILL).unlink(missing_ok=True)  # a spilled candidate that a later one beat
    best[0].add_with_ids(probe.x, probe.ids)  # the held-out rows join the chosen index: it holds every row
    index, chosen, cand, _ = best
    params = {cand.param: chosen[cand.param]} if cand.param else {}
    set_search_params(index, params.get("nprobe"), params.get("ef_search"))
    record = {
        "target_recall": target.recall,
        "k": target.k,
        "max_memory": target.max_memory,
        "queries": len(probe.x),
        "train_sample": int(len(train_rows)),
        "margin": MARGIN,
        "exact_streamed": exact,
        "chosen": {"factory": cand.factory, **chosen},
        "met": bool(best[3]),
        "tried": tried,
    }
    return index, cand.factory, params, record


def build_auto_folder(
    embeddings_dir: Path,
    out: Path,
    target: Target,
    gpu: str = "auto",
    shard: bool = False,
    train_sample: int = 100_000,
    columns=None,
) -> dict[str, Any]:
    """``--factory auto``: choose, tune and save; index.json holds the chosen setting and every tried one. The
    spilled candidate waits in the stage folder, so a killed build leaves nothing in ``out``."""
    with building(out, embeddings_dir, columns) as (stage, es):
        if len(es) < target.k + 2:
            raise UserError(f"{embeddings_dir}: {len(es)} rows; --k {target.k} needs at least {target.k + 2}")
        gpus = parse_gpus(gpu)
        t0 = time.perf_counter()
        index, factory, params, record = auto_index(es, target, gpus, shard, train_sample, spill=stage)
        if not record["met"]:
            log.warning("index auto: no candidate reached the target; saved the best (%s)", record["chosen"])
        info = {
            "factory": factory,
            "embeddings": str(embeddings_dir),
            "gpus": gpus,
            "shard": shard,
            "train_sample": record["train_sample"],
            "build_seconds": round(time.perf_counter() - t0, 3),
            "search_params": params,
            "auto": record,
        }
        return save_folder(stage, index, es, info, out)
