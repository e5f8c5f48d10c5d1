"""``retrieval synth-sop OUT``: a synthetic catalogue in the exact Stanford Online Products layout.

    retrieval synth-sop data/synth --classes 200 --images-per-class 2-12 --seed 0 --query-views 2

What is drawn, and why it is hard for an untrained network, is documented in :mod:`retrieval.data.synth`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from retrieval.data.synth import parse_images_per_class, synth_sop

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (the Stanford_Online_Products root)")
    parser.add_argument("--classes", type=int, default=200, help="classes in all, split about half train/half test")
    parser.add_argument(
        "--train-classes",
        type=int,
        default=None,
        help="how many of --classes are train (default: half, as SOP); the rest are test",
    )
    parser.add_argument("--images-per-class", default="2-12", help="K or LO-HI (uniform per class); SOP has 2..12")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="longer image side in pixels")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering classes in parallel")
    parser.add_argument("--force", action="store_true", help="replace a previous synth-sop output in OUT")
    parser.add_argument(
        "--query-views",
        type=int,
        default=0,
        help="also render N new photos of every test product into OUT/queries (not in the catalogue; queries.txt)",
    )


def run(args: argparse.Namespace) -> int:
    counts = synth_sop(
        args.out,
        args.classes,
        parse_images_per_class(args.images_per_class),
        args.seed,
        args.size,
        max(1, args.workers),
        args.force,
        args.query_views,
        args.train_classes,
    )
    log.info(
        "wrote %d images to %s: train %d classes / %d images, test %d classes / %d images",
        counts["images"],
        args.out,
        counts["train_classes"],
        counts["train_images"],
        counts["test_classes"],
        counts["test_images"],
    )
    if counts["query_images"]:
        log.info("and %d held-out query views of the test products (%s/queries.txt)", counts["query_images"], args.out)
    return 0
