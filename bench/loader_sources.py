"""``bench loader-sources``: where the train loader reads from and how readers share shards, at equal work.

* ``folder`` (baseline): the builder's folder, enough shards for every worker (shard-per-rank path);
* ``http``: the same shards served by a local HTTP server on 127.0.0.1 (``http://127.0.0.1:PORT/`` prefix:
  every shard fetched with urllib, with retries, then parsed from memory);
* ``in_shard``: the same samples packed into ONE train shard, so the workers split it by class group
  (every worker reads all the bytes, decodes its own classes).

Same P×K, workers, steps and seeds everywhere; ratios are ours / ``folder`` (targets >= 0.9).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import tarfile
import threading
from pathlib import Path

from bench import common
from bench.loader import MEAN, SIZES, SOURCE_PX, STD, loader_rate
from retrieval.config import DataConfig
from retrieval.models import InputSpec


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


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
    repeats = max(repeats, 3)
    shards = common.synthetic_shards(opts.work, opts.level, SOURCE_PX)
    packed = one_shard(shards, Path(opts.work) / "one-shard")
    spec = InputSpec(size=size, mean=MEAN, std=STD)
    data = DataConfig(classes_per_batch=P, images_per_class=K, class_pool=4 * P, num_workers=2)
    results = {"folder": loader_rate(shards, data, spec, steps, repeats)}
    with serve(shards) as url:
        results["http"] = loader_rate(url, data, spec, steps, repeats)
    results["in_shard"] = loader_rate(packed, data, spec, steps, repeats)
    ratios = {f"{k}/folder": common.ratio(results[k], results["folder"]) for k in ("http", "in_shard")}
    n = len(list(shards.glob("train-*.tar")))
    config = {"img_size": size, "P": P, "K": K, "batches_per_repeat": steps, "workers": 2, "train_shards": n}
    notes = ["2 loader workers, 1 rank; in_shard: one shard for 2 readers (class groups split inside it)"]
    return common.publish("loader-sources", opts, config, results, ratios, notes)
