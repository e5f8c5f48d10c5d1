"""``retrieval eval``: retrieval metrics of saved embeddings sets.

    retrieval eval --embeddings runs/tiny/emb-test                 # SOP protocol; writes emb-test/metrics.json
    retrieval eval --embeddings DIR --out DIR --backend faiss --chunk 2048
    retrieval eval --queries runs/x/emb-query --gallery runs/x/emb-gallery --out runs/x/eval-inshop

With ``--embeddings``: the SOP self-retrieval protocol (every image queries all the others). With ``--queries`` and
``--gallery`` (two embeddings folders, e.g. In-Shop's query and gallery splits): each query searches the gallery;
Recall@K (K = 1, 10, 20, 30, 50, 100), MAP@R and GLDv2's mAP@100. Both are documented in :mod:`retrieval.metrics`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

from retrieval import knn
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.metrics import QG_TABLE, print_table, query_gallery_metrics, retrieval_metrics
from retrieval.util import peak_rss_gb, write_atomic

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", type=Path, default=None, help="folder written by `retrieval embed` (SOP)")
    parser.add_argument("--queries", type=Path, default=None, help="query embeddings folder (with --gallery)")
    parser.add_argument("--gallery", type=Path, default=None, help="gallery embeddings folder (with --queries)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where metrics.json goes (default: --embeddings/--queries)"
    )
    parser.add_argument("--backend", choices=knn.BACKENDS, default="auto")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", choices=knn.DTYPES, default="fp32", help="torch backend ranking precision")
    parser.add_argument("--chunk", type=int, default=4096, help="queries per block (memory O(chunk x N))")


def run(args: argparse.Namespace) -> int:
    if args.chunk < 1:
        raise UserError(f"--chunk: expected a positive integer, got {args.chunk}")
    if (args.embeddings is None) == (args.queries is None and args.gallery is None):
        raise UserError("give --embeddings DIR (self-retrieval), or --queries DIR --gallery DIR, not both")
    folders = [args.embeddings] if args.embeddings is not None else [args.queries, args.gallery]
    with contextlib.ExitStack() as held:  # no `retrieval embed` replaces a folder while it is scored
        for folder in filter(None, folders):
            held.enter_context(EmbeddingSet.reading(folder))
        return _query_gallery(args) if args.embeddings is None else _self_retrieval(args)


def _self_retrieval(args: argparse.Namespace) -> int:
    es = EmbeddingSet.load(args.embeddings)
    if len(es) < 2:
        raise UserError(f"{args.embeddings}: holds {len(es)} embedding(s); the protocol needs at least 2")
    log.info("eval: %d embeddings of dimension %d from %s", len(es), es.dim, args.embeddings)
    metrics = retrieval_metrics(
        es.vectors32(), es.labels, backend=args.backend, chunk=args.chunk, device=args.device, dtype=args.dtype
    )
    metrics["embeddings"] = str(args.embeddings)
    _write(metrics, args.out or args.embeddings, metrics["embeddings"])
    return 0


def _query_gallery(args: argparse.Namespace) -> int:
    if args.queries is None or args.gallery is None:
        raise UserError("--queries and --gallery go together (two embeddings folders)")
    queries, gallery = EmbeddingSet.load(args.queries), EmbeddingSet.load(args.gallery)
    if queries.dim != gallery.dim:
        raise UserError(f"{args.queries} has dimension {queries.dim}, {args.gallery} {gallery.dim}: other models?")
    if len(queries) < 1 or len(gallery) < 1:
        raise UserError(f"need at least one query and one gallery image, got {len(queries)} and {len(gallery)}")
    log.info("eval: %d queries against a gallery of %d (dimension %d)", len(queries), len(gallery), gallery.dim)
    metrics = query_gallery_metrics(
        queries.vectors32(), queries.labels, gallery.embeddings, gallery.labels, chunk=args.chunk, device=args.device
    )
    metrics.update(queries=str(args.queries), gallery=str(args.gallery))
    _write(metrics, args.out or args.queries, f"{args.queries.name} -> {args.gallery.name}", QG_TABLE)
    return 0


def _write(metrics: dict, out: Path, title: str, columns=None) -> None:
    metrics["peak_rss_gb"] = round(peak_rss_gb(), 3)
    why = "no image of their class in the gallery" if columns else "no other image of their class"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print_table([{"architecture": title, "training": "", **metrics}], *([columns] if columns else []))
    print(
        f"R-Precision {100 * metrics['r_precision']:.2f}  queries {metrics['num_queries']} "
        f"(excluded, {why}: {metrics['num_excluded']})  "
        f"search {metrics['search_seconds']:.1f} s ({metrics.get('backend', 'exact')})  "
        f"peak RSS {metrics['peak_rss_gb']:.2f} GB"
    )
    log.info("wrote %s", out / "metrics.json")
