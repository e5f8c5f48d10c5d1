"""Loader benchmark: streaming P×K train batches (decode + train transforms), 0..N workers, against the
raw JPEG decode of the same bytes and against decode + transforms in one plain loop, in the same run.

    retrieval bench loader --quick          # via the bench command
    python -c "from pathlib import Path; from retrieval.bench.loader import run_bench; run_bench(True, Path('b'))"

Each loader measurement builds a fresh ``train_loader`` (so worker start-up and pool filling happen),
consumes the first W batches untimed (one per worker: start-up, pool fill), then times the rest: the
steady state a training epoch sees. Medians over repeats. Ratios are loader images/s over the single
process references, so they travel between machines better than the absolute numbers.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.bench import common
from retrieval.config import DataConfig
from retrieval.data import transforms as tfm
from retrieval.data.loader import shard_urls, train_loader
from retrieval.data.pk import SkipCounter, read_samples

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# level -> (img_size, P, K, steps per repeat, repeats, max workers)
LEVELS = {"tiny": (64, 4, 2, 6, 2, 2), "quick": (224, 8, 4, 14, 3, 2), "full": (224, 16, 4, 40, 5, 8)}
SOURCE_PX = 256  # the shard builder's default max side: what a real epoch decodes


def _fallback_shards(out: Path, classes: int = 48, per_class: int = 5, per_shard: int = 60) -> Path:
    """Contract-format train shards of smooth random 256 px images, for when the shard builder is unavailable."""
    if (out / "stats.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng, members, image_id = np.random.default_rng(0), [], 1
    for c in range(1, classes + 1):
        for _ in range(per_class):
            low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # low-frequency content compresses like a photo
            img = Image.fromarray(low).resize((SOURCE_PX, int(rng.integers(160, SOURCE_PX + 1))), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            meta = {"image_id": image_id, "class_id": c, "super_class_id": 0, "path": f"{image_id}.jpg"}
            members.append((f"{image_id:09d}", buf.getvalue(), c, meta))
            image_id += 1
    for s in range(0, len(members), per_shard):
        with tarfile.open(out / f"train-{s // per_shard:06d}.tar", "w") as tar:
            for key, jpg, c, meta in members[s : s + per_shard]:
                for ext, data in (("jpg", jpg), ("cls", str(c).encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (out / "stats.json").write_text(json.dumps({"train": {"samples": len(members), "classes": classes}}))
    return out


def _shards(work: Path, level: str) -> tuple[Path, str]:
    try:
        return common.synthetic_shards(work, level, px=SOURCE_PX), "retrieval synth-sop + shards build"
    except (ImportError, RuntimeError, SystemExit) as e:  # builder not installed/failed: still measure the loader
        return _fallback_shards(work / "loader-fallback-shards"), f"fallback writer ({type(e).__name__}: {e})"


def _reference_rates(jpgs: list[bytes], transform, reps: int) -> tuple[dict, dict]:
    """Single-process images/s: raw full decode, and decode + the same train transform (no loader)."""

    def decode_all() -> None:
        for b in jpgs:
            Image.open(io.BytesIO(b)).convert("RGB")

    def decode_transform_all() -> None:
        for b in jpgs:
            transform(tfm.decode_image(b))

    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker: one image's tensor ops are too small to split
    try:
        for name, fn in (("raw_decode", decode_all), ("decode_transform", decode_transform_all)):
            runs[name] = common.time_rate(fn, len(jpgs), common.Repeats(warmup=1, repeats=reps))
    finally:
        torch.set_num_threads(threads)
    return runs["raw_decode"], runs["decode_transform"]


def _loader_rate(shards: Path, cfg: DataConfig, img_size: int, steps: int, reps: int) -> dict[str, Any]:
    rates, startup = [], []
    warm = max(cfg.num_workers, 1)
    for r in range(reps):
        t0 = time.perf_counter()
        loader = train_loader(shards, cfg, img_size, MEAN, STD, epoch=r, steps=steps + warm, rank=0, world=1)
        it = iter(loader)
        for _ in range(warm):
            next(it)
        startup.append(time.perf_counter() - t0)
        t1, n = time.perf_counter(), 0
        for batch in it:
            n += len(batch["label"])
        rates.append(n / (time.perf_counter() - t1))
    return common.summarize(rates, "images/s", 0, untimed_batches=warm, startup_s=float(np.median(startup)))


def run_bench(
    quick: bool, out_dir: Path, tiny: bool = False, shards: Path | None = None, work: Path | None = None
) -> dict:
    """Measure, print a table, write ``bench-loader.json`` into ``out_dir``; returns the JSON payload."""
    level = common.level_of(quick, tiny)
    img_size, P, K, steps, reps, max_workers = LEVELS[level]
    out_dir = Path(out_dir)
    source = "given"
    if shards is None:
        shards, source = _shards(Path(work or out_dir / "work"), level)
    counter = SkipCounter("bench")
    jpgs = [s.jpg for s in read_samples(shard_urls(shards, "train"), counter)][: P * K * steps]
    base = DataConfig(classes_per_batch=P, images_per_class=K, class_pool=4 * P, num_workers=0)
    raw, dec_tf = _reference_rates(jpgs, tfm.train_transform(img_size, base, MEAN, STD), reps)
    workers = list(range(0, min(max_workers, os.cpu_count() or 1) + 1))
    results: dict[str, Any] = {"raw_decode": raw, "decode_transform": dec_tf}
    for w in workers:
        cfg = DataConfig(classes_per_batch=P, images_per_class=K, class_pool=4 * P, num_workers=w)
        results[f"loader_w{w}"] = _loader_rate(shards, cfg, img_size, steps, reps)
    ratios = {f"loader_w{w}/raw_decode": common.ratio(results[f"loader_w{w}"], raw) for w in workers}
    ratios["loader_w0/decode_transform"] = common.ratio(results["loader_w0"], dec_tf)
    sizes = [Image.open(io.BytesIO(b)).size for b in jpgs[:50]]
    config = {
        "img_size": img_size,
        "P": P,
        "K": K,
        "batches_per_repeat": steps,
        "workers": workers,
        "shards": str(shards),
        "shards_source": source,
        "source_size_median": np.median(sizes, 0).tolist(),
        "transform": "RandomResizedCrop(0.25-1, bicubic) + flip + ToTensor + Normalize (torchvision v1)",
    }
    notes = [
        "loader_wN: N worker processes (0 = in the main process); the first max(N,1) batches (start-up, "
        "pool fill) are untimed",
        "raw_decode and decode_transform: one process, the same JPEG bytes",
        f"{os.cpu_count()} CPUs; load average {common.load_average()}",
    ]
    payload = common.envelope("loader", level, "cpu", config, results, ratios, notes)
    return common.publish(out_dir, payload)
