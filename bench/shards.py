"""``bench shards``: ``retrieval shards build`` (1 and 2 workers) against a plain PIL loop over the same files.

The source is a synthetic SOP tree from ``retrieval synth-sop`` at 512 px, larger than the builder's default
longer side (256) as real SOP photos are, so every image is decoded, resized and re-encoded. A builder repeat is a
whole ``retrieval shards build`` into an empty folder (catalogue, plan, encode, tar, stats), in this process:
the wall time a user waits, less the interpreter start. The plain loop is what a one-off script does
(``Image.open`` -> RGB -> Lanczos resize -> JPEG q90 in memory; no tar, no checks). A second pair measures the
pass-through regime (the source already within the longer side: the builder checks the JPEG and copies it).
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from bench import common

SIZES = {"tiny": (16, 320, 2), "quick": (60, 512, 3), "full": (300, 512, 5)}  # level -> (classes, source px, repeats)
MAX_SIDE = 256


def run(opts: common.Options) -> dict:
    classes, px, repeats = SIZES[opts.level]
    work = Path(opts.work) / f"shards-bench-{opts.level}"
    sop = work / "sop"
    if not (sop / "Ebay_test.txt").is_file():
        common.retrieval("synth-sop", sop, "--classes", classes, "--images-per-class", "2-6", "--size", px, "--force")
    paths = sorted(sop.rglob("*.JPG")) + sorted(sop.rglob("*.jpg"))
    reps = common.Repeats(1, repeats)
    quiet = logging.getLogger("retrieval")
    level, _ = quiet.level, quiet.setLevel(logging.WARNING)  # one build per repeat: its summary would drown the table
    try:
        results: dict[str, Any] = {
            "plain_pil_loop": common.time_rate(lambda: plain_loop(paths, MAX_SIDE), len(paths), reps)
        }
        for w in (1, 2):
            results[f"builder_w{w}"] = common.time_rate(builder(sop, work / f"out-w{w}", w, MAX_SIDE), len(paths), reps)
        results["plain_pil_loop_passthrough"] = common.time_rate(lambda: plain_loop(paths, px), len(paths), reps)
        results["builder_w1_passthrough"] = common.time_rate(builder(sop, work / "out-pt", 1, px), len(paths), reps)
    finally:
        quiet.setLevel(level)
    ratios = {f"builder_w{w}/plain_pil_loop": common.ratio(results[f"builder_w{w}"], results["plain_pil_loop"]) for w in (1, 2)}  # fmt: skip
    ratios["builder_w2/builder_w1"] = common.ratio(results["builder_w2"], results["builder_w1"])
    ratios["passthrough builder_w1/plain_pil_loop"] = common.ratio(
        results["builder_w1_passthrough"], results["plain_pil_loop_passthrough"]
    )
    config = {"images": len(paths), "classes": classes, "source_px": px, "max_side": MAX_SIDE, "quality": 90}
    notes = [
        "builder_wN: a whole `retrieval shards build` into an empty folder with N worker processes (wall time); it "
        "decodes large JPEGs with libjpeg DCT scaling (Image.draft), the plain loop decodes at full size",
        "plain_pil_loop: one process, decode -> RGB -> Lanczos resize -> JPEG q90 in memory (no tar, no checks)",
    ]
    return common.publish("shards", opts, config, results, ratios, notes)


def plain_loop(paths: list[Path], max_side: int) -> None:
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            scale = min(1.0, max_side / max(im.size))
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
            im.save(io.BytesIO(), "JPEG", quality=90)


def builder(sop: Path, out: Path, workers: int, max_side: int):
    def build() -> None:
        shutil.rmtree(out, ignore_errors=True)
        common.retrieval("shards", "build", "--sop-root", sop, "--out", out, "--workers", workers, "--max-side", max_side, "--quality", 90, "--shard-size", 100)  # fmt: skip

    return build
