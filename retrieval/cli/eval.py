"""``retrieval eval``: retrieval metrics of saved embeddings sets.

    retrieval eval --embeddings runs/tiny/emb-test                 # SOP protocol; writes emb-test/metrics.json
    retrieval eval --embeddings DIR --out DIR --backend faiss --chunk 2048
    retrieval eval --embeddings vectors.npy --labels labels.npy    # another tool's vectors (ids: row numbers)
    retrieval eval --embeddings clip-out/ --label-column product   # clip-retrieval's img_emb/ + metadata/
    retrieval eval --query-embeddings runs/x/emb-query --gallery-embeddings runs/x/emb-gallery --out runs/x/eval

With ``--embeddings``: the SOP self-retrieval protocol (every image queries all the others). With
``--query-embeddings`` and ``--gallery-embeddings`` (two embeddings sets, e.g. In-Shop's query and gallery
splits): each query searches the gallery; Recall@K (K = 1, 10, 20, 30, 50, 100), MAP@R and GLDv2's mAP@100. Both are documented in :mod:`retrieval.metrics`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

from retrieval import knn
from retrieval.cli._args import add_source_arguments, old_spelling, source_columns
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.metrics import QG_TABLE, print_table, query_gallery_metrics, retrieval_metrics
from retrieval.util import peak_rss_gb, write_atomic

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embeddings", type=Path, default=None, help="embeddings folder, a .npy (with --labels) or clip-retrieval's"
    )
    add_source_arguments(parser)
    parser.add_argument("--query-embeddings", type=Path, help="query embeddings (with --gallery-embeddings)")
    parser.add_argument("--gallery-embeddings", type=Path, help="gallery embeddings (with --query-embeddings)")
    old_spelling(parser, "--queries", "--query-embeddings", "query_embeddings", type=Path)
    old_spelling(parser, "--gallery", "--gallery-embeddings", "gallery_embeddings", type=Path)
    parser.add_argument(
        "--out", type=Path, default=None, help="folder of metrics.json (default: the embeddings folder, the .npy's)"
    )
    parser.add_argument("--backend", choices=knn.BACKENDS, default="auto")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--search-precision", choices=knn.DTYPES, default="fp32", help="torch backend ranking precision"
    )
    old_spelling(parser, "--dtype", "--search-precision", "search_precision", choices=knn.DTYPES)
    parser.add_argument("--chunk", type=int, default=4096, help="queries per block (memory O(chunk x N))")


def run(args: argparse.Namespace) -> int:
    if args.chunk < 1:
        raise UserError(f"--chunk: expected a positive integer, got {args.chunk}")
    if (args.embeddings is None) == (args.query_embeddings is None and args.gallery_embeddings is None):
        raise UserError(
            "give --embeddings DIR (self-retrieval), or --query-embeddings DIR --gallery-embeddings DIR, not both"
        )
    folders = [args.embeddings] if args.embeddings is not None else [args.query_embeddings, args.gallery_embeddings]
    with contextlib.ExitStack() as held:  # no `retrieval embed` replaces a folder while it is scored
        for folder in filter(EmbeddingSet.is_folder, filter(None, folders)):  # our sets (another tool's: no lock)
            held.enter_context(EmbeddingSet.reading(folder))
        return _query_gallery(args) if args.embeddings is None else _self_retrieval(args)


def _self_retrieval(args: argparse.Namespace) -> int:
    es = EmbeddingSet.open(args.embeddings, source_columns(args))
    if len(es) < 2:
        raise UserError(f"{args.embeddings}: holds {len(es)} embedding(s); the protocol needs at least 2")
    log.info("eval: %d embeddings of dimension %d from %s", len(es), es.dim, args.embeddings)
    metrics = retrieval_metrics(
        es.vectors32(),
        es.labels,
        backend=args.backend,
        chunk=args.chunk,
        device=args.device,
        dtype=args.search_precision,
        progress="eval: search",
    )
    metrics["embeddings"] = str(args.embeddings)
    _write(metrics, args.out or _folder(args.embeddings), metrics["embeddings"])
    return 0


def _query_gallery(args: argparse.Namespace) -> int:
    qpath, gpath = args.query_embeddings, args.gallery_embeddings
    if qpath is None or gpath is None:
        raise UserError("--query-embeddings and --gallery-embeddings go together (two embeddings sets)")
    columns = source_columns(args)
    queries, gallery = EmbeddingSet.open(qpath, columns), EmbeddingSet.open(gpath, columns)
    if queries.dim != gallery.dim:
        raise UserError(f"{qpath} has dimension {queries.dim}, {gpath} {gallery.dim}: other models?")
    if len(queries) < 1 or len(gallery) < 1:
        raise UserError(f"need at least one query and one gallery image, got {len(queries)} and {len(gallery)}")
    log.info("eval: %d queries against a gallery of %d (dimension %d)", len(queries), len(gallery), gallery.dim)
    metrics = query_gallery_metrics(
        queries.vectors32(),
        queries.labels,
        gallery.embeddings,
        gallery.labels,
        chunk=args.chunk,
        device=args.device,
        progress="eval: search the gallery",
    )
    metrics.update(queries=str(qpath), gallery=str(gpath))
    _write(metrics, args.out or _folder(qpath), f"{qpath.name} -> {gpath.name}", QG_TABLE)
    return 0


def _folder(embeddings: Path) -> Path:
    """Where metrics.json goes by default: the embeddings folder, or the folder of a plain .npy."""
    return embeddings.parent if embeddings.suffix == ".npy" else embeddings


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
