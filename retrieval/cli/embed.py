"""``retrieval embed``: embed a split rank-sharded, then merge the parts into one embeddings set.

    retrieval embed --model runs/tiny --shards shards/out --split test --out runs/tiny/emb-test
    accelerate launch --num_processes 8 -m retrieval embed --model runs/sop --shards /data/sop --split test --out E
    retrieval embed --model runs/tiny --untrained ...   # the run's starting weights (seed table: "untrained")

Each rank embeds its own shards (every image exactly once across ranks) and writes ``OUT/parts/part-<rank>/``;
rank 0 merges them ordered by image id into ``OUT`` (:class:`retrieval.embedding.EmbeddingSet`), checking
against ``stats.json`` that no image is missing or duplicated, then removes the parts.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from retrieval import dist
from retrieval.data.loader import read_stats
from retrieval.embedding import EmbeddingSet, embed_split, load_model
from retrieval.errors import UserError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="run folder, model.safetensors (model.yaml beside it), or a config YAML with --untrained",
    )
    p.add_argument(
        "--shards",
        required=True,
        help="shard folder with stats.json, URL prefix/, or webdataset URLs (brace, '::', http(s)://, pipe:)",
    )
    p.add_argument("--label-key", help="cls, txt or json:FIELD; default: the one stats.json names, else cls")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--untrained", action="store_true", help="the run's architecture at its starting weights")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored embedding dtype")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--img-size", type=int, help="default: the run's data.img_size or the model's input size")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    stats = read_stats(args.shards)  # bad input fails here, before any process group or GPU work
    if args.split not in stats:
        raise UserError(f"{args.shards}/stats.json has no split {args.split!r}; found {sorted(stats)}")
    acc = dist.make_accelerator(args.precision, 1, args.out)
    loaded = load_model(args.model, args.untrained)
    spec = loaded.spec.with_size(args.img_size)
    model = loaded.model.to(acc.device)
    local = embed_split(
        model,
        args.shards,
        args.split,
        spec,
        args.batch_size,
        args.num_workers,
        acc.device,
        acc.mixed_precision,
        label_key=args.label_key,
    )
    seconds = local.meta["seconds"]
    log.info(
        "rank %d: %d images in %.1f s (%.1f images/s)",
        acc.process_index,
        len(local),
        seconds,
        len(local) / max(seconds, 1e-9),
    )
    out = Path(args.out)
    local.save(out / "parts" / f"part-{acc.process_index:05d}")
    acc.wait_for_everyone()
    if acc.is_main_process:
        parts = [EmbeddingSet.load(out / "parts" / f"part-{r:05d}") for r in range(acc.num_processes)]  # not stale
        merged = EmbeddingSet.merge(parts)
        _check_complete(merged, stats[args.split], args)
        merged.meta = {
            **loaded.provenance,
            "shards": str(args.shards),
            "split": args.split,
            "skipped": merged.meta["skipped"],
            "img_size": spec.size,
            "input": spec.to_dict(),
            "world_size": acc.num_processes,
            "seconds": round(merged.meta["seconds"], 3),
            "images_per_s": round(len(merged) / max(merged.meta["seconds"], 1e-9), 1),
        }
        merged.save(out, dtype=args.dtype)
        shutil.rmtree(out / "parts")
        log.info("wrote %d embeddings (dim %d) to %s", len(merged), merged.dim, out)
    acc.wait_for_everyone()
    acc.end_training()
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.num_workers < 0:
        raise UserError(f"--num-workers: expected 0 or more, got {args.num_workers}")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size: expected a positive integer, got {args.img_size}")


def _check_complete(merged: EmbeddingSet, split_stats: dict, args: argparse.Namespace) -> None:
    expected = int(split_stats["samples"])
    got = len(merged) + merged.meta["skipped"]
    if got != expected:
        raise UserError(
            f"embedded {len(merged)} images (+{merged.meta['skipped']} undecodable) of split "
            f"{args.split!r}, but {args.shards}/stats.json lists {expected}: shards changed or are incomplete"
        )
