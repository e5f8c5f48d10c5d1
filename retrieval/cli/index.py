"""``retrieval index build|add|remove``: one Faiss index (with image ids) over an embeddings set, and its updates.

retrieval index build --embeddings runs/sop/emb-test --out runs/sop/index                 # exact, CPU
retrieval index build --embeddings DIR --out DIR --factory IVF1024,PQ32 --train-sample 100000
retrieval index build --embeddings DIR --out DIR --factory HNSW32
retrieval index build --embeddings DIR --out DIR --gpu all --shard                          # every GPU, sharded
retrieval index build --embeddings DIR --out DIR --factory auto --target-recall 0.95 --k 10 --max-memory 8G
retrieval index build --embeddings vectors.npy --labels labels.npy --out DIR      # another tool's vectors
retrieval index build --embeddings clip-out/ --out DIR                            # clip-retrieval's folder

``--factory auto`` chooses among Flat, IVF-Flat, IVF-PQ and HNSW and tunes nprobe / efSearch against exact
search (:mod:`retrieval.index.auto`); index.json records every setting it tried.

retrieval index add --index runs/sop/index --embeddings runs/sop/emb-new                 # new products' rows
retrieval index add --index IDX --embeddings EMB --replace                                 # new vectors for held ids
retrieval index remove --index IDX --ids gone.txt                                          # one image id a line
retrieval index remove --index IDX --classes discontinued.txt                              # one class id a line

``add`` and ``remove`` write the next version of the folder (:mod:`retrieval.index.update`): every index family,
no rebuild, the old version or the new one whatever happens; ``index.json`` keeps the versions.

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
from retrieval.index.update import add_rows, remove_rows


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

    a = sub.add_parser("add", help="add the rows of an embeddings set to an index (a new version, no rebuild)")
    a.add_argument("--index", required=True, type=Path, help="index folder written by `retrieval index build`")
    a.add_argument("--embeddings", required=True, type=Path, help="embeddings of the same model, new image ids")
    a.add_argument("--replace", action="store_true", help="ids the index holds get the new vectors (else refused)")
    r = sub.add_parser("remove", help="take rows out of an index by image id or class (a new version)")
    r.add_argument("--index", required=True, type=Path, help="index folder written by `retrieval index build`")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", type=Path, help="file of image ids to remove, one a line")
    which.add_argument("--classes", type=Path, help="file of class ids whose images to remove, one a line")


def _summary(info: dict) -> dict:
    """What an update prints: the version's record and the index's state after it."""
    keys = ("count", "tombstones", "added_after_training", "since_build", "rebuild_advised")
    return {"index": info["versions"][-1], **{k: info.get(k) for k in keys}}


def run(args: argparse.Namespace) -> int:
    if args.action == "add":
        print(json.dumps(_summary(add_rows(args.index, args.embeddings, args.replace)), indent=1))
        return 0
    if args.action == "remove":
        print(json.dumps(_summary(remove_rows(args.index, args.ids, args.classes)), indent=1))
        return 0
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
