"""``retrieval feedback export``: the judgements users sent to ``POST /feedback`` as training input.

    retrieval feedback export --log feedback/ --index runs/sop/index --images-root /data/sop --out fb/
    retrieval shards mix --new fb/feedback.csv --replay /data/sop --replay-classes 0.3 --out mix.csv
    retrieval shards build --manifest mix.csv --test-classes 0 --val-classes 0.1 --out shards/fb
    retrieval train --config CONFIG --shards shards/fb model.init_from=runs/sop data.hard_negatives=fb/hard_negatives.tsv

``fb/feedback.csv``: each query photo confirmed "the same" as a result, as an image of that product, and (with
``--index``) the catalogue photos of every judged product; ``fb/hard_negatives.tsv``: the product pairs judged "not
the same", which the continued run forces into its batches (:mod:`retrieval.search.feedback_export`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrieval.index.folder import IndexFolder
from retrieval.search.feedback_export import export_feedback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    e = sub.add_parser("export", help="a feedback log to a manifest and hard-negative pairs")
    e.add_argument("--log", required=True, type=Path, help="the folder given to `retrieval serve --feedback-dir`")
    e.add_argument("--out", required=True, type=Path, help="folder to write (feedback.csv, hard_negatives.tsv)")
    e.add_argument("--index", type=Path, help="the index judged: its catalogue photos of the judged products join")
    e.add_argument("--images-root", type=Path, help="the folder the catalogue's relative paths are relative to")


def run(args: argparse.Namespace) -> int:
    index = IndexFolder.load(args.index) if args.index else None
    print(json.dumps(export_feedback(args.log, args.out, index, args.images_root), indent=1))
    return 0
