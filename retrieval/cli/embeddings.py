"""``retrieval embeddings export``: an embeddings set in the formats other tools load (autofaiss, vector databases,
pandas, clip-retrieval's readers), streamed a block of rows at a time.

    retrieval embeddings export runs/sop/emb-test --format parquet --out exports/emb-parquet   # embeddings.parquet
    retrieval embeddings export runs/sop/emb-test --format npy --out exports/emb-npy           # embeddings.npy + ids.npy ...
    retrieval embeddings export clip-out/ --format npy --out exports/clip-npy                  # another tool's set too

Parquet columns: ``image_id``, ``label``, ``super_label``, ``path``, ``embedding`` (list of float32). The formats
are documented in :mod:`retrieval.embed.interop`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.cli._args import add_source_arguments, source_columns
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.embed.interop import FORMATS, export_set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    e = sub.add_parser("export", help="write an embeddings set as parquet or plain .npy files")
    e.add_argument("embeddings", type=Path, help="embeddings folder, a .npy (with --labels) or clip-retrieval's")
    add_source_arguments(e)
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--out", required=True, type=Path, help="output folder")


def run(args: argparse.Namespace) -> int:
    es = EmbeddingSet.open(args.embeddings, source_columns(args))
    print(export_set(es, args.format, args.out))
    return 0
