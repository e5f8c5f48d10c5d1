"""``retrieval report --run-dir RUN_DIR``: one self-contained HTML page for a run, to open anywhere or attach to a ticket.

    retrieval report --run-dir runs/tiny                        # -> runs/tiny/report.html
    retrieval report --run-dir runs/sop --embeddings runs/sop/emb-test --shards /data/sop-shards --html sop.html

The page holds, in order: the metrics table (``results.json`` rows when the demo wrote them, else each
evaluation folder's ``metrics.json``, else the last validation line), loss / recall / throughput curves
from ``metrics.jsonl``, a gallery of sampled queries with their exact top-k neighbours (green frame: same
class, red: another class), ``summary.json``, the resolved config and the software versions. Plots and
thumbnails are embedded as base64 data URIs, so the file needs no folder beside it and no network.

Evaluation folders are the ``retrieval embed`` outputs found as ``RUN_DIR/emb-*/`` and ``RUN_DIR/eval/*/``,
plus any ``--embeddings DIR``. Thumbnails are read straight from the WebDataset shards (``--shards``, default
the ``shards`` entry of the folder's ``meta.json``): only the members needed, no extraction. Every part
that is missing is replaced by a sentence saying what was looked for, never by a traceback.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.report.analysis import (
    analyse,
    change_row,
    failure_items,
    failure_rows,
    search_queries,
    shard_images,
    wandb_folder,
)
from retrieval.report.html import METRICS, Explained, Gallery, data_uri, render_page
from retrieval.report.plots import curve_images, draw_histograms, draw_recall, figure_png
from retrieval.run_folder import RunFolder

log = logging.getLogger(__name__)


@dataclass
class EvalFolder:
    """One ``retrieval embed`` output (``metrics.json`` only when ``retrieval eval`` ran on it)."""

    path: Path
    meta: dict = field(default_factory=dict)
    metrics: dict | None = None

    @property
    def has_embeddings(self) -> bool:
        return EmbeddingSet.has_vectors(self.path)

    @property
    def training(self) -> str:
        return "untrained" if self.meta.get("untrained") else "finetuned"


def build_report(
    run_dir: str | Path,
    embeddings_dirs: list[str | Path] | None = None,
    shards: str | Path | None = None,
    out: str | Path | None = None,
    queries: int = 12,
    k: int = 5,
    seed: int = 0,
) -> Path:
    """Write the report of ``run_dir`` and return its path (``RUN_DIR/report.html`` unless ``out``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder (expected a run folder with metrics.jsonl)")
    if queries < 1 or k < 1:
        raise UserError(f"--queries and --k: expected positive integers, got {queries} and {k}")
    if shards is not None and not Path(shards).is_dir():
        raise UserError(f"--shards {shards}: not a folder (expected {{split}}-NNNNNN.tar files)")
    _check_run_dir(run_dir, bool(embeddings_dirs))
    run, log_notes = RunFolder(run_dir), []
    records = run.read_metrics(log_notes)
    train, val = [r for r in records if r.get("kind") == "train"], [r for r in records if r.get("kind") == "val"]
    folders = find_eval_folders(run_dir, embeddings_dirs)
    table, table_note = table_rows(run_dir, folders, val)
    gallery = build_gallery(folders, shards, queries, k, seed)
    explained = explain(run_dir, folders, shards, table, seed)
    page = render_page(
        run_dir=run_dir,
        table=table,
        table_note=table_note,
        curves=curve_images(train, val, _loss_name(run)),
        log_notes=log_notes,
        gallery=gallery,
        k=k,
        summary=run.read_summary(),
        config=run.read_config_text(),
        explained=explained,
    )
    out = Path(out) if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.0f KB)", out, out.stat().st_size / 1024)
    return out


# ---------------------------------------------------------------------------------------------
# Inputs


RUN_FILES = ("metrics.jsonl", "config.yaml", "summary.json", "results.json")


def _check_run_dir(run_dir: Path, explicit: bool) -> None:
    """A report is about a run and is written into it: refuse a folder of another kind before writing anything."""
    if (run_dir / "stats.json").is_file() or any(run_dir.glob("*.tar")):
        raise UserError(
            f"{run_dir}: a shards folder (stats.json, *.tar), not a run folder; pass the run folder (metrics.jsonl, "
            "config.yaml), and these shards with --shards"
        )
    traces = any((run_dir / name).is_file() for name in RUN_FILES) or any(run_dir.glob("emb-*/"))
    if not traces and not explicit:
        raise UserError(f"{run_dir}: not a run folder (none of {', '.join(RUN_FILES)}, no emb-*/ folder)")


def _loss_name(run: RunFolder) -> str:
    """The run's ``loss.name`` (the loss curve's label), or "loss" when its config cannot be read."""
    try:
        return run.read_config().loss.name
    except UserError:
        return "loss"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def find_eval_folders(run_dir: Path, explicit: list[str | Path] | None) -> list[EvalFolder]:
    """The explicit folders (each must exist), else ``emb-*/`` and ``eval/*/`` under the run folder."""
    if explicit:
        paths = [Path(p) for p in explicit]
        for p in paths:
            if not p.is_dir():
                raise UserError(f"--embeddings {p}: not a folder (expected embeddings.npy, labels.npy, ids.npy)")
    else:
        candidates = sorted(run_dir.glob("emb-*/")) + sorted(run_dir.glob("eval/*/"))
        paths = [p for p in candidates if (p / "embeddings.npy").is_file() or (p / "metrics.json").is_file()]
    folders = []
    for p in paths:
        meta = EmbeddingSet.load(p, vectors=False).meta if EmbeddingSet.is_folder(p) else {}
        metrics = _read_json(p / "metrics.json") if (p / "metrics.json").is_file() else None
        folders.append(EvalFolder(p, meta if isinstance(meta, dict) else {}, metrics))
    return folders


def table_rows(run_dir: Path, folders: list[EvalFolder], val: list[dict]) -> tuple[list[dict], str]:
    """Rows of the metrics table (each a dict with 'name', 'training' and metric keys) and where they came from."""
    results = run_dir / "results.json"
    if results.is_file():
        rows = _read_json(results)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{results}: expected a list of objects with 'training' and metric keys")
        return [{"name": r.get("architecture", r.get("model", run_dir.name)), **r} for r in rows], results.name
    # untrained rows first, as in the seed's table (baseline, then fine-tuned)
    scored = sorted((f for f in folders if f.metrics), key=lambda f: f.training != "untrained")
    if scored:
        rows = [
            {"name": f.path.name, "training": f.training, "split": f.meta.get("split", ""), **f.metrics} for f in scored
        ]
        return rows, ", ".join(f"{f.path.name}/metrics.json" for f in scored)
    if val:
        last = val[-1]
        return [{"name": run_dir.name, "training": f"val @ step {last.get('step')}", **last}], "metrics.jsonl"
    return [], ""


# ---------------------------------------------------------------------------------------------
# Gallery


def pick_gallery_folder(folders: list[EvalFolder]) -> EvalFolder | None:
    """The fine-tuned embeddings when several folders exist (the untrained ones are the baseline)."""
    usable = [f for f in folders if f.has_embeddings]
    finetuned = [f for f in usable if not f.meta.get("untrained")]
    return (finetuned or usable or [None])[0]


def sample_queries(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` query indices, a pure function of (labels, n, seed); classes with a second image are preferred,
    since a query with no same-class image can only show red frames."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    pool = np.flatnonzero(counts[inverse] > 1)
    if len(pool) == 0:
        pool = np.arange(len(labels))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))


def top_k(embeddings: np.ndarray, queries: np.ndarray, k: int, use_knn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, scores) of the exact inner-product top-k of the query rows, each query excluded by index.

    Uses the team's exact search (:func:`retrieval.knn.search`, Faiss flat IP: the search ``retrieval eval``
    ranks with), so the gallery shows what the metrics counted; a chunked numpy matmul when Faiss/torch are
    not importable (the page itself needs neither).
    """
    k = min(k, len(embeddings) - 1)
    if use_knn:
        try:
            from retrieval import knn
        except ImportError as e:
            log.info("retrieval.knn unavailable (%s): numpy search for the gallery", e)
        else:
            scores, order = knn.search(np.asarray(embeddings[queries]), embeddings, k, exclude=queries, backend="faiss")
            return order, scores
    return _numpy_top_k(embeddings, queries, k)


def _numpy_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int, chunk: int = 16384):
    """A dozen queries against N rows: memory O(queries x chunk), exact, ties to the smaller index."""
    q = np.asarray(embeddings[queries], dtype=np.float32)
    scores = np.concatenate(
        [q @ np.asarray(embeddings[s : s + chunk], dtype=np.float32).T for s in range(0, len(embeddings), chunk)],
        axis=1,
    )
    scores[np.arange(len(queries)), queries] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def build_gallery(
    folders: list[EvalFolder], shards: str | Path | None, queries: int, k: int, seed: int
) -> Gallery | None:
    folder = pick_gallery_folder(folders)
    if folder is None:
        return None
    es = EmbeddingSet.load(folder.path, mmap=True)  # a dozen queries: the vectors are not read whole
    emb, labels, ids, paths = es.embeddings, es.labels, es.ids, es.paths
    gallery = Gallery(folder.path)
    if len(emb) < 2:
        gallery.notes.append(f"{folder.path.name} holds {len(emb)} embedding(s): no neighbours to show.")
        return gallery
    picked = sample_queries(labels, queries, seed)
    order, scores = top_k(emb, picked, k)
    needed = {int(ids[i]) for i in np.concatenate([picked, order.ravel()])}
    thumbs = _data_uris(shard_images(folder.meta, folder.path, shards, needed, gallery.notes))

    def item(i: int, score: float | None = None) -> dict:
        return {
            "index": int(i),
            "id": int(ids[i]),
            "label": int(labels[i]),
            "path": paths[i] if paths else "",
            "score": score,
            "thumb": thumbs.get(int(ids[i])),
        }

    for row, q in enumerate(picked):
        neighbours = [item(j, float(s)) for j, s in zip(order[row], scores[row], strict=True)]
        gallery.rows.append({"query": item(q), "neighbours": neighbours})
    return gallery


# ---------------------------------------------------------------------------------------------
# What explains the numbers: failures, Recall@K curve, super classes, score histograms, search queries, wandb


def explain(run_dir: Path, folders: list[EvalFolder], shards, table: list[dict], seed: int) -> Explained:
    out = Explained(
        search=search_queries(run_dir),
        change=change_row(table, [key for key, _ in METRICS]),
        wandb=wandb_folder(run_dir),
    )
    usable = [f for f in folders if f.has_embeddings]
    main = pick_gallery_folder(folders)
    if main is None:
        return out
    curves = {}
    for folder in sorted(usable, key=lambda f: f.training != "untrained"):
        es = EmbeddingSet.load(folder.path, mmap=True)
        analysis = analyse(es, seed=seed)
        if analysis.ks:
            curves[f"{folder.path.name} ({folder.training})"] = (analysis.ks, analysis.recall)
        if folder is main:
            out.source, out.queries, out.super_classes = folder.path.name, analysis.queries, analysis.super_classes
            out.total = analysis.total
            out.failures = _failures_with_thumbs(folder, es, analysis.failures, shards, out.notes)
            if len(analysis.positive) and len(analysis.negative):
                out.histogram = figure_png(lambda ax, a=analysis: draw_histograms(ax, a.positive, a.negative))
    if curves:
        out.recall_curve = figure_png(lambda ax: draw_recall(ax, curves))
    return out


def _failures_with_thumbs(folder: EvalFolder, es: EmbeddingSet, failures: list[dict], shards, notes: list[str]):
    """The failure gallery's items (:func:`~retrieval.report.analysis.failure_items`), their images as data URIs."""
    ids = {int(es.ids[r]) for r in failure_rows(failures)}
    images = shard_images(folder.meta, folder.path, shards, ids, notes) if ids else {}
    items = failure_items(es, failures, images)
    for row in items:
        for item in filter(None, row.values()):
            image = item.pop("image")
            item["thumb"] = data_uri(image) if image is not None else None
    return items


def _data_uris(images: dict) -> dict[int, str]:
    return {image_id: data_uri(image) for image_id, image in images.items()}
