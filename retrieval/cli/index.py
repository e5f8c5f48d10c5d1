"""``retrieval index build``: one Faiss index (with image ids) over an embeddings set.

retrieval index build --embeddings runs/sop/emb-test --out runs/sop/index                 # exact, CPU
retrieval index build --embeddings DIR --out DIR --factory IVF1024,PQ32 --train-sample 100000
retrieval index build --embeddings DIR --out DIR --factory HNSW32
retrieval index build --embeddings DIR --out DIR --gpu all --shard                          # every GPU, sharded
retrieval index build --embeddings DIR --out DIR --factory auto --target-recall 0.95 --k 10 --max-memory 8G
retrieval index build --embeddings vectors.npy --labels labels.npy --out DIR      # another tool's vectors
retrieval index build --embeddings clip-out/ --out DIR                            # clip-retrieval's folder

``--factory auto`` chooses among Flat, IVF-Flat, IVF-PQ and HNSW and tunes nprobe / efSearch against exact
search (:mod:`retrieval.index.auto`); index.json records every setting it tried.

``--out`` is written as one unit (:func:`retrieval.index.folder.building`): a second build into it is refused before
any work, a killed build leaves the old folder or the new one, and a folder that is no index folder is never replaced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrieval.cli._args import add_source_arguments, source_columns
from retrieval.errors import UserError
from retrieval.index.auto import Target, build_auto_folder, parse_bytes
from retrieval.index.folder import build_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build and save an index over an embeddings folder")
    b.add_argument(
        "--embeddings", required=True, type=Path, help="embeddings folder, a .npy (with --labels) or clip-retrieval's"
    )
    add_source_arguments(b)
    b.add_argument("--out", required=True, type=Path, help="index folder to write")
    b.add_argument(
        "--factory", default="Flat", help="Faiss factory string (Flat, IVF1024,PQ32, HNSW32, IVF256,Flat) or auto"
    )
    b.add_argument("--gpu", default="auto", help="auto | none | all | 0,1,... (CPU when Faiss has no GPU support)")
    b.add_argument("--shard", action="store_true", help="several GPUs: shard the index (default: replicate it)")
    b.add_argument("--train-sample", type=int, default=100_000, help="vectors used to train IVF/PQ")
    b.add_argument("--target-recall", type=float, default=0.95, help="auto: recall@k against exact search to reach")
    b.add_argument("--k", type=int, default=10, help="auto: the k of recall@k")
    b.add_argument("--max-memory", default=None, help="auto: memory budget of the index, e.g. 8G (default: none)")
    b.add_argument("--tune-queries", type=int, default=1000, help="auto: held-out queries used to tune")


def run(args: argparse.Namespace) -> int:
    if args.train_sample < 1:
        raise UserError(f"--train-sample: expected a positive integer, got {args.train_sample}")
    if args.factory.lower() != "auto":
        info = build_folder(
            args.embeddings, args.out, args.factory, args.gpu, args.shard, args.train_sample, source_columns(args)
        )
        print(json.dumps(info, indent=1))
        return 0
    if not 0 < args.target_recall <= 1 or args.k < 1 or args.tune_queries < 1:
        raise UserError(
            f"--target-recall in (0, 1], --k and --tune-queries >= 1: got {args.target_recall}, {args.k}, "
            f"{args.tune_queries}"
        )
    target = Target(args.target_recall, args.k, parse_bytes(args.max_memory), args.tune_queries)
    info = build_auto_folder(
        args.embeddings, args.out, target, args.gpu, args.shard, args.train_sample, source_columns(args)
    )
    auto = info["auto"]
    summary = {k: v for k, v in info.items() if k != "auto"}
    summary["auto"] = {k: auto[k] for k in ("chosen", "met", "exact_streamed", "queries")}
    summary["auto"]["tried"] = [
        {"factory": t["factory"], "met": t["met"], "trials": len(t["trials"])} for t in auto["tried"]
    ]
    print(json.dumps(summary, indent=1))
    return 0
