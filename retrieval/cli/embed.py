"""``retrieval embed``: embed a split rank-sharded, each rank streaming its rows into parts of one embeddings set.

    retrieval embed --model runs/tiny --shards shards/out --split test --out runs/tiny/emb-test
    accelerate launch --num_processes 8 -m retrieval embed --model runs/sop --shards /data/sop --split test --out E
    retrieval embed --model runs/tiny --untrained ...   # the run's starting weights (seed table: "untrained")
    retrieval embed ... --merge                        # one embeddings.npy instead of parts (holds N x d once)

Each rank embeds its own shards (every image exactly once across ranks) and writes its rows as it goes into
``OUT/parts/`` (a part every ``--part-rows`` rows: memory stays one part, whatever the split's size); rank 0 then
checks against ``stats.json`` that no image is missing or duplicated and writes the manifest and ``meta.json``
(:class:`retrieval.embedding.EmbeddingSet`: every reader memory-maps the parts, ordered by image id).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from retrieval import dist
from retrieval.data.check import check_split
from retrieval.data.loader import read_stats
from retrieval.embedding import EmbeddingSet
from retrieval.embedding_model import embed_split, load_model
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
    p.add_argument("--part-rows", type=int, default=65536, help="rows per part file (a rank holds one part)")
    p.add_argument("--merge", action="store_true", help="merge the parts into one file per column at the end")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    stats = read_stats(args.shards)  # bad input fails here, before any process group or GPU work
    if args.split not in stats:
        raise UserError(f"{args.shards}/stats.json has no split {args.split!r}; found {sorted(stats)}")
    check_split(args.shards, args.split, stats)  # a missing or truncated shard: one line, before any work
    acc = dist.make_accelerator(args.precision, 1, args.out)
    loaded = load_model(args.model, args.untrained)
    spec = loaded.spec.with_size(args.img_size)
    model = loaded.model.to(acc.device)
    out = Path(args.out)
    writer = EmbeddingSet.writer(out, acc.process_index, args.part_rows, args.dtype)
    local = embed_split(
        model,
        args.shards,
        args.split,
        spec,
        args.batch_size,
        args.num_workers,
        acc.device,
        acc.mixed_precision,
        writer,
        label_key=args.label_key,
    )
    seconds = local.meta["seconds"]
    rate = local.meta["count"] / max(seconds, 1e-9)
    log.info("rank %d: %d images in %.1f s (%.1f images/s)", acc.process_index, local.meta["count"], seconds, rate)
    acc.wait_for_everyone()
    if acc.is_main_process:
        _finish(out, args, loaded.provenance, spec, acc.num_processes, int(getattr(model, "embed_dim", 0)), stats)
    acc.wait_for_everyone()
    acc.end_training()
    return 0


def _finish(out: Path, args: argparse.Namespace, provenance: dict, spec, world: int, dim: int, stats: dict) -> None:
    """Rank 0: manifest, completeness against stats.json, meta.json last (and the merge when asked)."""
    meta = {**provenance, "shards": str(args.shards), "split": args.split, "img_size": spec.size}
    meta.update(input=spec.to_dict(), world_size=world, layout="merged" if args.merge else "parts")
    summary = EmbeddingSet.finish_parts(out, world, dim, args.dtype)
    try:
        _check_complete(summary["count"], summary["skipped"], stats[args.split], args)
    except UserError:
        EmbeddingSet.drop_parts(out)  # no part a rerun could take for a good one
        raise
    meta.update(
        skipped=summary["skipped"],
        seconds=round(summary["seconds"], 3),
        images_per_s=round(summary["count"] / max(summary["seconds"], 1e-9), 1),
    )
    EmbeddingSet.write_meta(out, meta, summary["count"], dim, args.dtype)
    if args.merge:
        merged = EmbeddingSet.load(out)
        merged.meta = meta
        merged.save(out, dtype=args.dtype)
        EmbeddingSet.drop_parts(out)
    log.info("wrote %d embeddings (dim %d) to %s (%s)", summary["count"], dim, out, meta["layout"])


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.num_workers < 0:
        raise UserError(f"--num-workers: expected 0 or more, got {args.num_workers}")
    if args.part_rows < 1:
        raise UserError(f"--part-rows: expected a positive integer, got {args.part_rows}")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size: expected a positive integer, got {args.img_size}")


def _check_complete(count: int, skipped: int, split_stats: dict, args: argparse.Namespace) -> None:
    expected = int(split_stats["samples"])
    if count + skipped != expected:
        raise UserError(
            f"embedded {count} images (+{skipped} undecodable) of split "
            f"{args.split!r}, but {args.shards}/stats.json lists {expected}: shards changed or are incomplete"
        )
