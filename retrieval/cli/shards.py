"""``retrieval shards build|verify|merge-stats|index|mix``: WebDataset shards from SOP, a manifest or an image folder,
the index of a corpus written by other tools, and the manifest of a training mixture (new products + a replay).

    retrieval shards build --sop-root /data/Stanford_Online_Products --out /data/sop-shards --workers 16
    retrieval shards build --manifest catalogue.csv --out shards/out
    retrieval shards build --inshop-root "/data/In-shop Clothes Retrieval Benchmark" --out /data/inshop-shards
    retrieval shards verify shards/out
    retrieval shards index /data/img2ds --split train --label-key json:product_id --out idx   # then --shards idx
    retrieval shards mix --new new.csv --replay /data/sop --replay-classes 0.3 --out mix.csv  # then build --manifest

The layout and the builder are documented in :mod:`retrieval.data.shards`, the mixture in :mod:`retrieval.data.mix`.
"""

from __future__ import annotations

import argparse
import json
import os

from retrieval.data.shard_writer import verify
from retrieval.data.shards import DEFAULT_SHARD_SIZE, build, merge_stats, parse_part
from retrieval.data.sop import ON_MISSING


def _classes_arg(text: str) -> int | float:
    """A number of classes (``100``) or a fraction (``0.2``)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of classes or a fraction, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="write DIR/{train,val,test or query,gallery}-NNNNNN.tar, stats.json, sizes.json")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--sop-root", help="Stanford_Online_Products root (Ebay_train.txt, Ebay_test.txt)")
    src.add_argument("--inshop-root", help="In-Shop Clothes root (list_eval_partition.txt): train/val/query/gallery")
    src.add_argument("--manifest", help="CSV/TSV path,label[,group]; paths relative to the manifest's folder")
    src.add_argument("--image-folder", help="ImageFolder tree: one subfolder per class")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")
    b.add_argument("--max-side", type=int, default=256, help="longer image side after re-encoding")
    b.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    b.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"max samples per shard, a class is never cut (default {DEFAULT_SHARD_SIZE}: SOP's ~48k train images "
        "make ~190 shards, one per reader for up to 48 processes x 4 workers; fewer shards than readers still "
        "train, split by class inside the shards)",
    )
    b.add_argument(
        "--val-classes",
        type=_classes_arg,
        default=0.2,
        help="train classes held out for validation: a count or a fraction (default 0.2)",
    )
    b.add_argument(
        "--test-classes",
        type=_classes_arg,
        default=0.5,
        help="manifest/image folder only: classes held out for test (SOP uses its test file)",
    )
    b.add_argument("--seed", type=int, default=0, help="seeds the val split and the train class order")
    b.add_argument("--on-missing", choices=ON_MISSING, default="error", help="a listed image file is missing")
    b.add_argument(
        "--part",
        default="0/1",
        metavar="I/N",
        help="build only part I of N (Slurm arrays); then run merge-stats",
    )
    v = sub.add_parser("verify", help="decode every sample and check counts against stats.json")
    v.add_argument("dir")
    v.add_argument("--workers", type=int, default=1)
    m = sub.add_parser("merge-stats", help="write stats.json / sizes.json once every --part has finished")
    m.add_argument("dir")
    i = sub.add_parser(
        "index", help="scan a foreign WebDataset corpus (img2dataset, S3, HTTP) once: stats.json + sizes.json"
    )
    i.add_argument("source", help="folder of .tar, brace pattern or '::'-joined URLs (http(s)://, pipe:...)")
    i.add_argument("--out", required=True, help="index folder; then train/embed with --shards OUT")
    i.add_argument("--split", default="train", help="the split these shards are (index each split once)")
    i.add_argument("--label-key", default="cls", help="cls, txt or json:FIELD (e.g. json:product_id)")
    x = sub.add_parser("mix", help="a manifest of new products' images plus a replay sample of old products' classes")
    x.add_argument("--new", action="append", default=[], help="SOP root (train list), manifest or image folder")
    x.add_argument("--replay", help="the old products: SOP root (train list), manifest or image folder")
    x.add_argument("--replay-classes", type=_classes_arg, default=0.3, help="old classes replayed: count or fraction")
    x.add_argument("--new-class-offset", type=int, default=0, help="added to the new sources' class ids")
    x.add_argument("--seed", type=int, default=0, help="draws the replayed classes")
    x.add_argument("--out", required=True, help="manifest to write (path,label,group; absolute paths)")


# `shards build` options passed to data.shards.build as they are (--part is parsed first)
BUILD_OPTIONS = ("out", "sop_root", "inshop_root", "manifest", "image_folder", "workers", "max_side", "quality")
BUILD_OPTIONS += ("shard_size", "val_classes", "test_classes", "seed", "on_missing")


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        build(**{key: getattr(args, key) for key in BUILD_OPTIONS}, part=parse_part(args.part))
        return 0
    if args.action == "merge-stats":
        merge_stats(args.dir)
        return 0
    if args.action == "mix":
        from retrieval.data.mix import mix

        counts = mix(args.new, args.replay, args.replay_classes, args.out, args.new_class_offset, args.seed)
        print(json.dumps(counts))
        return 0
    if args.action == "index":
        from retrieval.data.corpus import index_corpus  # imports webdataset (and torch): only when indexing

        index_corpus(args.source, args.out, args.split, args.label_key)
        return 0
    problems, stats = verify(args.dir, args.workers)
    if problems:
        for p in problems[:50]:
            print(f"verify: {p}")
        print(f"verify: {args.dir}: FAILED, {len(problems)} problem(s)")
        return 1
    print(
        f"verify: {args.dir}: ok, "
        + ", ".join(
            f"{s} {stats[s]['samples']} samples / {stats[s]['classes']} classes / {stats[s]['shards']} shards"
            for s in stats
            if s != "config"
        )
    )
    return 0
