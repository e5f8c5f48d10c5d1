"""What the report explains beyond the metrics table: where retrieval fails and how scores separate.

    a = analyse(EmbeddingSet.load("runs/x/emb-test", mmap=True))
    a.failures        # queries whose wrong top-1 scores highest, each beside its best same-class match
    a.recall          # Recall@K for K = 1..100 (the curve)
    a.super_classes   # Recall@1/@10 per super class (SOP's 12 categories)
    a.positive, a.negative   # cosine scores of same-class pairs and of random other-class pairs

Queries are a seeded sample of at most ``max_queries`` images (every image when the set is smaller), each searched
exactly against the whole set with itself excluded by index (the protocol ``retrieval eval`` counts), so a 60k-image
SOP test set costs seconds, not the full N x N. Also here: the search-queries summary, the untrained -> fine-tuned
change, the wandb runs of a run folder, and the failure gallery with its images read from the shards (only the
members needed). Used by ``retrieval report`` and by the trainer's wandb summary at the end of a run: the same
failures, found once.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.data.decode import decode_image
from retrieval.embed.embeddings import EmbeddingSet

log = logging.getLogger(__name__)

RECALL_KS = (1, 2, 4, 8, 16, 32, 64, 100)
THUMB_PX = 96  # the longer side of a gallery image
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}
WANDB_URL = re.compile(r"https?://[^\s\"']+/runs/[A-Za-z0-9]+")


@dataclass
class Analysis:
    queries: int = 0
    total: int = 0  # images in the set (the queries are a seeded sample of at most max_queries of them)
    ks: list[int] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # query, wrong, correct rows and scores
    super_classes: list[dict] = field(default_factory=list)
    positive: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    negative: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def analyse(es: EmbeddingSet, max_queries: int = 2000, n_failures: int = 6, seed: int = 0) -> Analysis:
    """Failures, Recall@K curve, per-super-class recall and score histograms of one embeddings set."""
    from retrieval import knn

    n = len(es)
    if n < 2:
        return Analysis()
    emb, labels = es.vectors32(), es.labels
    queries = _sample(n, max_queries, seed)
    k = min(max(RECALL_KS), n - 1)
    scores, order = knn.search(emb[queries], emb, k, exclude=queries, backend="faiss")
    hit = labels[order] == labels[queries][:, None]
    first = np.where(hit.any(1), hit.argmax(1), k)  # rank (0-based) of the first same-class neighbour
    ks = [x for x in RECALL_KS if x <= k]
    return Analysis(
        queries=len(queries),
        total=n,
        ks=ks,
        recall=[float((first < x).mean()) for x in ks],
        failures=_failures(emb, labels, queries, order, scores, hit, n_failures),
        super_classes=_super_classes(es, queries, first),
        positive=_positive_scores(emb, labels, queries),
        negative=_negative_scores(emb, labels, seed),
    )


def _failures(emb, labels, queries, order, scores, hit, n: int) -> list[dict]:
    """The ``n`` queries whose wrong top-1 scores highest, each with its best-scoring same-class image (or None)."""
    wrong = np.flatnonzero(~hit[:, 0])
    worst = wrong[np.argsort(-scores[wrong, 0], kind="stable")][:n]
    out = []
    for row in worst:
        q = int(queries[row])
        same = np.flatnonzero(labels == labels[q])
        same = same[same != q]
        correct, correct_score = None, None
        if len(same):
            sims = emb[same] @ emb[q]
            correct, correct_score = int(same[int(np.argmax(sims))]), float(sims.max())
        out.append(
            {
                "query": q,
                "wrong": int(order[row, 0]),
                "wrong_score": float(scores[row, 0]),
                "correct": correct,
                "correct_score": correct_score,
            }
        )
    return out


def _super_name(path: str) -> str:
    """SOP paths start with the super class folder (``bicycle_final/...``): its name without ``_final``."""
    head = path.split("/", 1)[0] if "/" in path else ""
    return head.removesuffix("_final")


def _super_classes(es: EmbeddingSet, queries: np.ndarray, first: np.ndarray) -> list[dict]:
    rows = []
    supers = es.super_labels[queries]
    for s in np.unique(supers):
        mask = supers == s
        sample = int(queries[np.flatnonzero(mask)[0]])
        rows.append(
            {
                "super_class_id": int(s),
                "name": _super_name(es.paths[sample]) if es.paths else "",
                "queries": int(mask.sum()),
                "recall@1": float((first[mask] < 1).mean()),
                "recall@10": float((first[mask] < 10).mean()),
            }
        )
    return sorted(rows, key=lambda r: r["recall@1"])  # the weakest category first


def _positive_scores(emb: np.ndarray, labels: np.ndarray, queries: np.ndarray, cap: int = 20000) -> np.ndarray:
    out = []
    for q in queries:
        same = np.flatnonzero(labels == labels[q])
        same = same[same > q]  # each pair once
        if len(same):
            out.append(emb[same] @ emb[q])
        if sum(len(x) for x in out) >= cap:
            break
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _negative_scores(emb: np.ndarray, labels: np.ndarray, seed: int, pairs: int = 20000) -> np.ndarray:
    """Every other-class pair of a small set (each once); a seeded sample of ``pairs`` pairs of a large one."""
    n = len(emb)
    if n * (n - 1) // 2 <= pairs:
        a, b = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed + 1)
        a, b = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    keep = labels[a] != labels[b]
    return np.einsum("ij,ij->i", emb[a[keep]], emb[b[keep]])


# ---------------------------------------------------------------------------------------------
# Run-folder facts


def search_queries(run_dir: Path) -> dict | None:
    """The summary of ``search --queries``: the demo's ``RUN/search-queries.json`` (its ``--json`` output), else the
    one ``retrieval search --queries`` saved in an index folder under the run folder (the newest)."""
    path = run_dir / "search-queries.json"
    if path.is_file():
        try:
            summary = json.loads(path.read_text()).get("summary")
        except (json.JSONDecodeError, AttributeError):
            return {"error": f"{path.name}: not the JSON of `retrieval search --queries --json`"}
        return {**summary, "source": path.name} if isinstance(summary, dict) else None
    from retrieval.index.folder import IndexFolder  # faiss, only for a run that has an index folder

    found = [s for s in map(IndexFolder.read_search_summary, IndexFolder.find(run_dir)) if s]
    return max(found, key=lambda s: s.get("created", "")) if found else None


def change_row(rows: list[dict], keys: list[str]) -> dict | None:
    """Fine-tuned minus untrained, per metric, when the table holds one row of each."""
    by = {r.get("training"): r for r in rows}
    base, tuned = by.get("untrained"), by.get("finetuned")
    if base is None or tuned is None:
        return None
    change = {
        k: tuned[k] - base[k]
        for k in keys
        if isinstance(base.get(k), (int, float)) and isinstance(tuned.get(k), (int, float))
    }
    return change or None


def wandb_folder(run_dir: Path) -> dict | None:
    """The run's wandb folders (one per invocation: each resume or requeue writes its own, all with the run's one
    id), whether they are offline, and the URL when a log names one."""
    folders = sorted((f for f in (run_dir / "wandb").glob("*run-*") if f.is_dir()), key=lambda p: p.name)
    if not folders:
        return None
    url = None
    for log in [p for f in reversed(folders) for p in sorted(f.glob("logs/*.log")) + sorted(f.glob("files/*.json"))]:
        found = WANDB_URL.search(log.read_text(errors="replace"))
        if found:
            url = found.group(0)
            break
    return {
        "folders": [str(f) for f in folders],
        "offline": all(f.name.startswith("offline-") for f in folders),
        "url": url,
    }


# ---------------------------------------------------------------------------------------------
# The failure gallery and its images


def failure_items(es: EmbeddingSet, failures: list[dict], images: dict[int, object]) -> list[dict]:
    """Each failure of :func:`analyse` as query / wrong top-1 / best correct items (id, class, path, score, PIL
    ``image`` or None), ``images`` keyed by image id (:func:`shard_images`)."""

    def item(row: int | None, score: float | None) -> dict | None:
        if row is None:
            return None
        image_id = int(es.ids[row])
        path = es.paths[row] if es.paths else ""
        label = int(es.labels[row])
        return {
            "index": row,
            "id": image_id,
            "label": label,
            "path": path,
            "score": score,
            "image": images.get(image_id),
        }

    return [
        {
            "query": item(f["query"], None),
            "wrong": item(f["wrong"], f["wrong_score"]),
            "correct": item(f["correct"], f["correct_score"]),
        }
        for f in failures
    ]


def failure_rows(failures: list[dict]) -> list[int]:
    """Every row a failure gallery shows (queries, wrong top-1s, best correct matches)."""
    return [r for f in failures for r in (f["query"], f["wrong"], f["correct"]) if r is not None]


def failure_gallery(es: EmbeddingSet, shards: str | Path | None, split: str | None, n: int = 6) -> list[dict]:
    """The ``n`` worst failures of ``es`` with their images from the shards (the trainer's wandb gallery)."""
    failures = analyse(es, n_failures=n).failures
    meta = {"shards": str(shards) if shards else None, "split": split}
    images = shard_images(meta, Path("."), shards, {int(es.ids[r]) for r in failure_rows(failures)}, [])
    return failure_items(es, failures, images)


def shard_images(meta: dict, folder: Path, shards, ids: set[int], notes: list[str]) -> dict:
    """image id -> PIL thumbnail, read from ``shards`` (else the ``shards`` that an embeddings set's ``meta`` names,
    tried relative to the folders above ``folder`` too). What cannot be found is said in ``notes``."""
    source = shards or meta.get("shards")
    if not source:
        notes.append("No shard folder (no --shards, no 'shards' in meta.json): showing ids and classes only.")
        return {}
    # meta.json keeps the path as given to `retrieval embed`, often relative to the repo root: also try it
    # relative to the folders above the embeddings, so the report works from any working directory.
    pattern = f"{meta['split']}-*.tar" if meta.get("split") else "*.tar"
    candidates = (Path(source), *(a / source for a in folder.resolve().parents[:4]))
    found = [p for p in candidates if p.is_dir() and any(p.glob(pattern))]
    if not found:
        notes.append(f"Shard folder {source} (from {folder.name}/meta.json) has no {pattern}: ids and classes only.")
        return {}
    if not meta.get("split"):  # SOP's train and test files both number images from 1
        notes.append(f"{folder.name}/meta.json names no split: thumbnails from any shard with the image id.")
    images = read_thumbnails(found[0], meta.get("split"), ids, notes)
    if len(images) < len(ids):
        notes.append(f"{len(ids) - len(images)} of {len(ids)} images not found in {source}: shown as ids.")
    return images


def read_thumbnails(
    shards: Path, split: str | None, ids: set[int], notes: list[str] | None = None, size: int = THUMB_PX
) -> dict:
    """image_id -> PIL thumbnail (max side ``size``), reading only the wanted members of ``{split}-*.tar``.

    Tar has no index, so headers are scanned, but only the wanted images are decompressed; the scan
    stops as soon as every wanted id is found.
    """
    notes = notes if notes is not None else []
    wanted, thumbs = set(ids), {}
    for tar in sorted(shards.glob(f"{split}-*.tar" if split else "*.tar")):
        try:
            with tarfile.open(tar) as tf:
                for member in tf:
                    key, _, ext = Path(member.name).name.partition(".")
                    if ext.lower() not in IMAGE_EXTS or not key.isdigit() or int(key) not in wanted:
                        continue
                    wanted.discard(int(key))
                    try:
                        thumbs[int(key)] = _thumbnail(tf.extractfile(member).read(), size)
                    except (OSError, ValueError, AttributeError) as e:  # a corrupt image costs one thumbnail
                        notes.append(f"{tar.name}/{member.name}: not a readable image ({e}).")
                    if not wanted:
                        return thumbs
        except (tarfile.TarError, OSError) as e:
            notes.append(f"{tar.name}: unreadable ({e}); its images are shown as ids.")
    return thumbs


def _thumbnail(data: bytes, size: int):
    im = decode_image(data)  # upright, as the model saw it
    im.thumbnail((size, size))
    return im
