"""``bench loader``: ``retrieval.data.loader.train_loader`` (streaming P×K batches, decode + train transforms in
0..2 worker processes) against plain loops over the same JPEG bytes in one process: a raw decode, and a decode +
torchvision RandomResizedCrop/flip/ToTensor/Normalize. Each loader repeat builds a fresh loader and leaves its
first max(1, workers) batches untimed (start-up, pool fill): the steady state an epoch sees.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from bench import common
from retrieval.config.schema import DataConfig
from retrieval.data.input_spec import InputSpec
from retrieval.data.loader import EpochSpan, Reader, train_loader

# level -> (img_size, P, K, batches per repeat, repeats, most workers)
SIZES = {"tiny": (64, 4, 2, 6, 2, 1), "quick": (224, 8, 4, 14, 3, 2), "full": (224, 16, 4, 40, 5, 8)}
SOURCE_PX = 256  # the shard builder's default longer side: what a real epoch decodes
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run(opts: common.Options) -> dict:
    size, P, K, steps, repeats, most = SIZES[opts.level]
    shards = common.synthetic_shards(opts.work, opts.level, SOURCE_PX)
    jpgs = train_jpegs(shards)[: P * K * steps]
    spec = InputSpec(size=size, mean=MEAN, std=STD)
    results: dict[str, Any] = plain_loops(jpgs, size, repeats)
    workers = list(range(min(most, os.cpu_count() or 1) + 1))
    for w in workers:
        data = DataConfig(classes_per_batch=P, images_per_class=K, class_pool=4 * P, num_workers=w)
        results[f"loader_w{w}"] = loader_rate(shards, data, spec, steps, repeats)
    ratios = {f"loader_w{w}/raw_decode": common.ratio(results[f"loader_w{w}"], results["raw_decode"]) for w in workers}
    ratios["loader_w0/decode_transform"] = common.ratio(results["loader_w0"], results["decode_transform"])
    config = {"img_size": size, "P": P, "K": K, "batches_per_repeat": steps, "workers": workers, "shards": shards}
    notes = [
        "loader_wN: N worker processes (0 = in this process), the first max(N, 1) batches untimed",
        f"raw_decode, decode_transform: one process, one torch thread, the same {len(jpgs)} JPEGs",
    ]
    return common.publish("loader", opts, config, results, ratios, notes)


def train_jpegs(shards: Path) -> list[bytes]:
    """The JPEG bytes of the train shards, read with tarfile: what the baselines decode."""
    out = []
    for path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return out


def plain_loops(jpgs: list[bytes], size: int, repeats: int) -> dict[str, Any]:
    augment = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])  # fmt: skip
    loops = {
        "raw_decode": lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in jpgs],
        "decode_transform": lambda: [augment(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpgs],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        return {name: common.time_rate(fn, len(jpgs), common.Repeats(1, repeats)) for name, fn in loops.items()}
    finally:
        torch.set_num_threads(threads)


def loader_rate(
    shards: Path | str, data: DataConfig, spec: InputSpec, steps: int, repeats: int, epoch: int = 0
) -> dict[str, Any]:
    """Images/s of ``repeats`` fresh loaders (epochs ``epoch``, ``epoch + 1``, ...), each past its warm batches."""
    rates, startup, warm = [], [], max(data.num_workers, 1)
    for r in range(epoch, epoch + repeats):
        start = time.perf_counter()
        batches = iter(train_loader(shards, data, spec, EpochSpan(epoch=r, steps=steps + warm), Reader(0, 1)))
        for _ in range(warm):
            next(batches)
        startup.append(time.perf_counter() - start)
        start, n = time.perf_counter(), 0
        for batch in batches:
            n += len(batch["label"])
        rates.append(n / (time.perf_counter() - start))
    return common.summarize(
        rates, "images/s", 0, untimed_batches=warm, startup_s=common.summarize(startup, "s", 0)["median"]
    )
