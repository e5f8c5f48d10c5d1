"""``retrieval embed``: embed a split rank-sharded, each rank streaming its rows into parts of one embeddings set.

    retrieval embed --model runs/tiny --shards shards/out --split test --out runs/tiny/emb-test
    accelerate launch --num_processes 8 -m retrieval embed --model runs/sop --shards /data/sop --split test --out E
    retrieval embed --model runs/tiny --untrained ...   # the run's starting weights (seed table: "untrained")
    retrieval embed --model swinv2_base_window16_256 --pretrained ...     # zero-shot (seed table: "pretrained")
    retrieval embed --model swinv2_base_window16_256 --pretrained-file w.safetensors ...   # the same, offline
    retrieval embed ... --merge                        # one embeddings.npy instead of parts (holds N x d once)
    retrieval embed --model runs/sop --manifest new.csv --out runs/sop/emb-new --id-offset 200000   # no shards
    retrieval embed --model runs/sop --image-folder new_products/ --out E --id-offset 200000 --class-offset 30000

Each rank embeds its own shards (every image exactly once across ranks) and writes its rows as it goes into
``OUT/parts/`` (a part every ``--part-rows`` rows: memory stays one part, whatever the split's size); rank 0 then
checks against ``stats.json`` that no image is missing or duplicated and writes the manifest and ``meta.json``
(:mod:`retrieval.embed.sharded`; the set is :class:`retrieval.embed.embeddings.EmbeddingSet`: every reader
memory-maps the parts, ordered by image id). ``OUT`` is replaced as one unit once the new set is complete (a second
``embed`` into it, or one while ``eval``/``index build`` read it, is refused before any work); what was derived from
the old set (``eval``'s ``metrics.json``) goes with it. ``--workers`` defaults to the CPUs per rank less one, at
most 4 (:func:`retrieval.cpus.cpu_share`).

``--manifest`` / ``--image-folder`` embed a few hundred new photos without shards, in one process, through the same
model loader, decoder and input spec (:mod:`retrieval.embed.listed`); ``retrieval index add`` then takes the set.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from retrieval import cpus, dist
from retrieval.cli._args import add_model_arguments, model_options, old_spelling
from retrieval.data.check import check_split
from retrieval.data.loader import read_stats, shard_urls
from retrieval.data.sop import ON_MISSING
from retrieval.embed.listed import ListedJob, embed_listed
from retrieval.embed.sharded import EmbedJob, embed_to_folder
from retrieval.errors import UserError
from retrieval.model.loading import load_model

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--shards",
        help="shard folder with stats.json, URL prefix/, or webdataset URLs (brace, '::', http(s)://, pipe:)",
    )
    source.add_argument("--manifest", type=Path, help="CSV/TSV path,label[,group] of images to embed (no shards)")
    source.add_argument("--image-folder", type=Path, help="one subfolder of images per class (no shards)")
    p.add_argument("--id-offset", type=int, default=0, help="--manifest/--image-folder: added to every image id")
    p.add_argument("--class-offset", type=int, default=0, help="--manifest/--image-folder: added to every class id")
    p.add_argument("--on-missing", choices=ON_MISSING, default="error", help="--manifest: a listed file is missing")
    p.add_argument("--label-key", help="cls, txt or json:FIELD; default: the one stats.json names, else cls")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vector-dtype", choices=DTYPES, default="float32", help="stored embedding dtype")
    old_spelling(p, "--dtype", "--vector-dtype", "vector_dtype", choices=DTYPES)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader workers per rank (default: from the CPUs per rank, at most 4; 4 on 2 cores were slower than 1)",
    )
    old_spelling(p, "--num-workers", "--workers", "workers", type=int)
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "no", "bf16", "fp16"),
        help="auto: the launcher's, else bf16 on CUDA",
    )
    p.add_argument("--img-size", type=int, help="default: the run's data.img_size or the model's input size")
    p.add_argument("--part-rows", type=int, default=65536, help="rows per part file (a rank holds one part)")
    p.add_argument("--merge", action="store_true", help="merge the parts into one file per column at the end")
    p.add_argument(
        "--allow-listed-commands",
        action="store_true",
        help="let the shard URLs the shards' stats.json lists run programs: pipe: shell commands, gs:// s3:// "
        "hf:// (they run as you; only for an index you wrote). Without it such URLs read from data are refused",
    )


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.shards is None:
        return _run_listed(args)
    if args.id_offset or args.class_offset:
        raise UserError("--id-offset / --class-offset: only with --manifest or --image-folder (shards carry their ids)")
    stats = read_stats(args.shards)  # bad input fails here, before any process group or GPU work
    if args.split not in stats:
        raise UserError(f"{args.shards}/stats.json has no split {args.split!r}; found {sorted(stats)}")
    check_split(args.shards, args.split, stats)  # a missing or truncated shard: one line, before any work
    shard_urls(args.shards, args.split, stats[args.split], args.allow_listed_commands)  # listed URLs trusted?
    acc = dist.make_accelerator(args.precision, 1, args.out, setting="--precision")
    workers = cpus.use_cpu_share(args.workers, "embed").workers
    loaded = load_model(args.model, **model_options(args))
    job = EmbedJob(
        args.shards,
        args.split,
        Path(args.out),
        args.vector_dtype,
        args.batch_size,
        workers,
        args.part_rows,
        args.merge,
        args.label_key,
        args.allow_listed_commands,
    )
    embed_to_folder(acc, loaded, loaded.spec.with_size(args.img_size), job, stats)
    acc.end_training()
    return 0


def _run_listed(args: argparse.Namespace) -> int:
    """``--manifest`` / ``--image-folder``: one process, no shards (:mod:`retrieval.embed.listed`)."""
    if dist.world_size() > 1:
        raise UserError("--manifest / --image-folder embed in one process: run without a launcher")
    if args.id_offset < 0 or args.class_offset < 0:
        raise UserError(f"--id-offset, --class-offset: expected 0 or more, got {args.id_offset}, {args.class_offset}")
    cpus.use_cpu_share(0, "embed")
    job = ListedJob(Path(args.out), args.manifest, args.image_folder, args.id_offset, args.class_offset)
    job = dataclasses.replace(job, batch_size=args.batch_size, dtype=args.vector_dtype, on_missing=args.on_missing)
    loaded = load_model(args.model, **model_options(args))
    embed_listed(loaded, loaded.spec.with_size(args.img_size), job)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers: expected 0 or more, got {args.workers}")
    if args.part_rows < 1:
        raise UserError(f"--part-rows: expected a positive integer, got {args.part_rows}")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size: expected a positive integer, got {args.img_size}")
