"""``retrieval report --run-dir RUN``: one self-contained HTML page for a run (see :mod:`retrieval.report`).

retrieval report --run-dir runs/tiny                        # -> runs/tiny/report.html
retrieval report --run-dir runs/sop --embeddings runs/sop/emb-test --shards /data/sop-shards --html sop.html

Old spellings kept for one release: the run folder as a positional, ``--out`` (now ``--html``: it is a file, where
every other command's ``--out`` is a folder) and ``--queries`` (now ``--num-queries``: a count, where ``search
--queries`` is a list of images).
"""

from __future__ import annotations

import argparse

from retrieval.cli._args import old_spelling
from retrieval.errors import UserError
from retrieval.report.build import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", help="run folder (metrics.jsonl, config.yaml, emb-*/ ...)")
    parser.add_argument("run", nargs="?", help=argparse.SUPPRESS)  # the old positional spelling of --run-dir
    parser.add_argument(
        "--embeddings",
        action="append",
        metavar="DIR",
        help="evaluation folder (embeddings.npy, labels.npy, ids.npy, ...); repeatable; "
        "default: RUN_DIR/emb-*/ and RUN_DIR/eval/*/",
    )
    parser.add_argument("--shards", help="shard folder for thumbnails (default: the folder's meta.json 'shards')")
    parser.add_argument("--html", help="HTML file to write (default: RUN_DIR/report.html)")
    old_spelling(parser, "--out", "--html", "html")
    parser.add_argument("--num-queries", type=int, default=12, help="queries in the gallery (default 12)")
    old_spelling(parser, "--queries", "--num-queries", "num_queries", type=int)
    parser.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query sample (default 0)")


def run(args: argparse.Namespace) -> int:
    if (args.run_dir is None) == (args.run is None):
        raise UserError("give the run folder once: --run-dir RUN")
    run_dir = args.run_dir or args.run
    path = build_report(run_dir, args.embeddings, args.shards, args.html, args.num_queries, args.k, args.seed)
    print(path)
    return 0
