"""``retrieval index build``: one Faiss index (with image ids) over an embeddings set.

retrieval index build --embeddings runs/sop/emb-test --out runs/sop/index                 # exact, CPU
retrieval index build --embeddings DIR --out DIR --factory IVF1024,PQ32 --train-sample 100000
retrieval index build --embeddings DIR --out DIR --factory HNSW32
retrieval index build --embeddings DIR --out DIR --gpu all --shard                          # every GPU, sharded
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrieval.errors import UserError
from retrieval.index import build_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build and save an index over an embeddings folder")
    b.add_argument("--embeddings", required=True, type=Path, help="folder written by `retrieval embed`")
    b.add_argument("--out", required=True, type=Path, help="index folder to write")
    b.add_argument("--factory", default="Flat", help="Faiss factory string: Flat, IVF1024,PQ32, HNSW32, IVF256,Flat")
    b.add_argument("--gpu", default="auto", help="auto | none | all | 0,1,... (CPU when Faiss has no GPU support)")
    b.add_argument("--shard", action="store_true", help="several GPUs: shard the index (default: replicate it)")
    b.add_argument("--train-sample", type=int, default=100_000, help="vectors used to train IVF/PQ")


def run(args: argparse.Namespace) -> int:
    if args.train_sample < 1:
        raise UserError(f"--train-sample: expected a positive integer, got {args.train_sample}")
    info = build_folder(args.embeddings, args.out, args.factory, args.gpu, args.shard, args.train_sample)
    print(json.dumps(info, indent=1))
    return 0
