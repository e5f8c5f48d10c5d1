"""Shard builder benchmark: ``retrieval shards build`` images/s with 1 and 2 workers against a plain PIL
decode -> resize -> encode loop over the same files, in the same run.

    retrieval bench shards --quick
    python -c "from pathlib import Path; from retrieval.bench.shards import run_bench; run_bench(True, Path('b'))"

The source is a synthetic SOP tree (``retrieval synth-sop``) at 512 px, larger than the default max side
(256) like real SOP photos, so every image is decoded, resized and re-encoded. Each builder repeat is a
complete build into an empty folder (catalogue read, plan, encode, tar, stats): the wall time a user
waits. The plain loop is the one-process baseline a script would write (``Image.open`` -> RGB -> Lanczos
resize -> JPEG q90 into memory, no tar, no checks). A second pair measures the pass-through regime (the
source already within the max side, as synthetic demo data is). Medians over repeats after one warm-up.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from PIL import Image

from retrieval.bench import common
from retrieval.data.shards import build
from retrieval.data.sop import read_sop
from retrieval.data.synth import synth_sop

# level -> (classes, source px, repeats)
LEVELS = {"tiny": (16, 320, 2), "quick": (60, 512, 3), "full": (300, 512, 5)}
MAX_SIDE, QUALITY = 256, 90


def _plain_loop(paths: list[Path], max_side: int) -> None:
    """The baseline: decode, resize to the max side, encode; what a simple conversion script does."""
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            scale = min(1.0, max_side / max(im.size))
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
            im.save(io.BytesIO(), "JPEG", quality=QUALITY)


def _time(fn, n_images: int, repeats: int) -> dict[str, Any]:
    """images/s of ``fn`` (one warm-up call, then ``repeats`` timed calls)."""
    fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n_images / (time.perf_counter() - t0))
    return common.summarize(rates, "images/s", warmup=1)


def _builder(sop: Path, out: Path, workers: int, max_side: int):
    def once() -> None:
        shutil.rmtree(out, ignore_errors=True)
        build(out=out, sop_root=str(sop), workers=workers, max_side=max_side, quality=QUALITY, shard_size=100)

    return once


def run_bench(quick: bool, out_dir: Path, tiny: bool = False, work: Path | None = None) -> dict:
    """Measure, print a table, write ``bench-shards.json`` into ``out_dir``; returns the JSON payload."""
    level = common.level_of(quick, tiny)
    classes, px, repeats = LEVELS[level]
    out_dir = Path(out_dir)
    work = Path(work or out_dir / "work") / f"shards-bench-{level}"
    sop = work / "sop"
    if not (sop / "Ebay_test.txt").is_file():
        synth_sop(sop, classes, (2, 6), seed=0, size=px, workers=min(4, os.cpu_count() or 1), force=sop.exists())
    train, test, _ = read_sop(sop)
    paths = [sop / r.path for r in train + test]
    quiet = logging.getLogger("retrieval.data.shards")
    level_before = quiet.level
    quiet.setLevel(logging.WARNING)  # one build per repeat: its INFO summary would drown the table
    try:
        results: dict[str, Any] = {"plain_pil_loop": _time(lambda: _plain_loop(paths, MAX_SIDE), len(paths), repeats)}
        for w in (1, 2):
            results[f"builder_w{w}"] = _time(_builder(sop, work / f"out-w{w}", w, MAX_SIDE), len(paths), repeats)
        # pass-through: max side >= source side, so the builder copies the JPEG bytes after a full decode check
        results["plain_pil_loop_passthrough"] = _time(lambda: _plain_loop(paths, px), len(paths), repeats)
        results["builder_w1_passthrough"] = _time(_builder(sop, work / "out-pt", 1, px), len(paths), repeats)
    finally:
        quiet.setLevel(level_before)
    ratios = {
        f"builder_w{w}/plain_pil_loop": common.ratio(results[f"builder_w{w}"], results["plain_pil_loop"])
        for w in (1, 2)
    }
    ratios["builder_w2/builder_w1"] = common.ratio(results["builder_w2"], results["builder_w1"])
    ratios["builder_w1_passthrough/plain_pil_loop_passthrough"] = common.ratio(
        results["builder_w1_passthrough"], results["plain_pil_loop_passthrough"]
    )
    config = {
        "images": len(paths),
        "classes": classes,
        "source_px": px,
        "max_side": MAX_SIDE,
        "quality": QUALITY,
        "shard_size": 100,
        "repeats": repeats,
    }
    notes = [
        "builder_wN: a whole `shards build` into an empty folder with N worker processes (wall time); "
        "it decodes large JPEGs with libjpeg DCT scaling (Image.draft), the plain loop decodes at full size",
        "plain_pil_loop: one process, decode -> RGB -> Lanczos resize -> JPEG q90 in memory (no tar, no checks)",
        f"{os.cpu_count()} CPUs; load average {common.load_average()} (shared machines make 2-worker figures noisy)",
    ]
    payload = common.envelope("shards", level, "cpu", config, results, ratios, notes)
    return common.publish(out_dir, payload)
