"""``bench loader-sources``: where the train loader reads from and how readers share shards, at equal work.

* ``folder`` (baseline): the builder's folder, enough shards for every worker (shard-per-rank path);
* ``http``: the same shards served by a local HTTP server on 127.0.0.1 (``http://127.0.0.1:PORT/`` prefix:
  every shard fetched with urllib, with retries, then parsed from memory);
* ``in_shard``: the same samples packed into ONE train shard, so the workers split it by class group
  (every worker reads all the bytes, decodes its own classes).

Same P×K, workers, steps and seeds everywhere; ratios are ours / ``folder`` (targets >= 0.9). The repeats are
interleaved (folder, http, in_shard, folder, ...) so that a load change on the machine hits every source alike,
and the server is its own process (``python -m http.server``), as a web server or object store is: it does not
share the loader's interpreter. The catalogue is the ``full`` level's (about 1,000 train images, 200 classes)
at quick and full levels: with a handful of classes per reader the in-shard planner would measure its pool
refills, not the read path.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench import common
from bench.loader import MEAN, SIZES, SOURCE_PX, STD, loader_rate
from bench.serve import wait_until_served
from retrieval.config.schema import DataConfig
from retrieval.data.input_spec import InputSpec
from retrieval.util import free_port


@contextlib.contextmanager
def serve(folder: Path):
    """``folder`` over HTTP from a separate ``python -m http.server`` process on 127.0.0.1; yields the URL prefix."""
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_served(url + "stats.json", server, seconds=20)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def one_shard(shards: Path, out: Path) -> Path:
    """The train split of ``shards`` repacked into one tar (classes stay contiguous), beside its stats.json."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "train-000000.tar", "w") as dst:
        for path in sorted(shards.glob("train-*.tar")):
            with tarfile.open(path) as src:
                for m in src.getmembers():
                    dst.addfile(m, src.extractfile(m))
    shutil.copy(shards / "stats.json", out / "stats.json")
    return out


def run(opts: common.Options) -> dict:
    size, P, K, steps, repeats, _ = SIZES[opts.level]
    repeats = max(repeats, 5)
    shards = common.synthetic_shards(opts.work, "tiny" if opts.level == "tiny" else "full", SOURCE_PX)
    packed = one_shard(shards, Path(opts.work) / f"one-shard-{opts.level}")
    spec = InputSpec(size=size, mean=MEAN, std=STD)
    data = DataConfig(classes_per_batch=P, images_per_class=K, class_pool=4 * P, num_workers=2)
    rates: dict[str, list[float]] = {"folder": [], "http": [], "in_shard": []}
    with serve(shards) as url:
        sources = {"folder": shards, "http": url, "in_shard": packed}
        for r in range(repeats):  # interleaved: one repeat of each source in turn
            for name, source in sources.items():
                rates[name].append(loader_rate(source, data, spec, steps, 1, epoch=r)["median"])
    results = {k: common.summarize(v, "images/s", 0, untimed_batches=2) for k, v in rates.items()}
    ratios = {f"{k}/folder": common.ratio(results[k], results["folder"]) for k in ("http", "in_shard")}
    n = len(list(shards.glob("train-*.tar")))
    config = {"img_size": size, "P": P, "K": K, "batches_per_repeat": steps, "workers": 2, "train_shards": n}
    notes = [
        "2 loader workers, 1 rank; in_shard: one shard for 2 readers (class groups split inside it)",
        "repeats interleaved folder/http/in_shard; http: a separate python -m http.server on 127.0.0.1",
    ]
    return common.publish("loader-sources", opts, config, results, ratios, notes)
