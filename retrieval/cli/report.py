"""``retrieval report RUN_DIR``: one self-contained HTML page for a run (see :mod:`retrieval.report`).

retrieval report runs/tiny                                  # -> runs/tiny/report.html
retrieval report runs/sop --embeddings runs/sop/emb-test --shards /data/sop-shards --out sop.html
"""

from __future__ import annotations

import argparse

from retrieval.report.build import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder (metrics.jsonl, config.yaml, emb-*/ ...)")
    parser.add_argument(
        "--embeddings",
        action="append",
        metavar="DIR",
        help="evaluation folder (embeddings.npy, labels.npy, ids.npy, ...); repeatable; "
        "default: RUN_DIR/emb-*/ and RUN_DIR/eval/*/",
    )
    parser.add_argument("--shards", help="shard folder for thumbnails (default: the folder's meta.json 'shards')")
    parser.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    parser.add_argument("--queries", type=int, default=12, help="queries in the gallery (default 12)")
    parser.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query sample (default 0)")


def run(args: argparse.Namespace) -> int:
    path = build_report(args.run_dir, args.embeddings, args.shards, args.out, args.queries, args.k, args.seed)
    print(path)
    return 0
