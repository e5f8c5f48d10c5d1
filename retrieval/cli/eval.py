"""``retrieval eval``: the SOP retrieval protocol on a saved embeddings set.

    retrieval eval --embeddings runs/tiny/emb-test                 # writes runs/tiny/emb-test/metrics.json
    retrieval eval --embeddings DIR --out DIR --backend faiss --chunk 2048

The protocol and its metrics are documented in :mod:`retrieval.metrics`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from retrieval import knn
from retrieval.embedding import EmbeddingSet
from retrieval.errors import UserError
from retrieval.metrics import print_table, retrieval_metrics
from retrieval.util import peak_rss_gb, write_atomic

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, type=Path, help="folder written by `retrieval embed`")
    parser.add_argument("--out", type=Path, default=None, help="where metrics.json goes (default: --embeddings)")
    parser.add_argument("--backend", choices=knn.BACKENDS, default="auto")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", choices=knn.DTYPES, default="fp32", help="torch backend ranking precision")
    parser.add_argument("--chunk", type=int, default=4096, help="queries per block (memory O(chunk x N))")


def run(args: argparse.Namespace) -> int:
    if args.chunk < 1:
        raise UserError(f"--chunk: expected a positive integer, got {args.chunk}")
    es = EmbeddingSet.load(args.embeddings)
    if len(es) < 2:
        raise UserError(f"{args.embeddings}: holds {len(es)} embedding(s); the protocol needs at least 2")
    log.info("eval: %d embeddings of dimension %d from %s", len(es), es.dim, args.embeddings)
    metrics = retrieval_metrics(
        es.vectors32(), es.labels, backend=args.backend, chunk=args.chunk, device=args.device, dtype=args.dtype
    )
    metrics["peak_rss_gb"] = round(peak_rss_gb(), 3)
    metrics["embeddings"] = str(args.embeddings)
    out = args.out or args.embeddings
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print_table([{"architecture": metrics["embeddings"], "training": "", **metrics}])
    print(
        f"R-Precision {100 * metrics['r_precision']:.2f}  queries {metrics['num_queries']} "
        f"(excluded, no other image of their class: {metrics['num_excluded']})  "
        f"search {metrics['search_seconds']:.1f} s ({metrics['backend']})  peak RSS {metrics['peak_rss_gb']:.2f} GB"
    )
    log.info("wrote %s", out / "metrics.json")
    return 0
