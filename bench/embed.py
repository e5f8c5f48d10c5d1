"""``bench embed``: the real ``retrieval embed`` beside raw timm inference of the same backbone.

- ``raw_timm``: the bare timm backbone, ``eval()`` + ``no_grad`` (+ the config's autocast on CUDA), on synthetic
  batches of the command's batch size, as many images as the split: the model-only ceiling.
- ``embed``: ``retrieval embed --model <config> --untrained --split test`` over synthetic shards, whole passes in
  this process (``retrieval.cli.main``); each pass's rate is the ``images_per_s`` the command writes in its
  ``meta.json`` (loader start to last batch: streaming read, decode, eval transform in workers, forward, host copy).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bench import common
from retrieval.embed.embeddings import EmbeddingSet

SIZES = {"tiny": (1, 2), "quick": (1, 3), "full": (1, 5)}  # level -> (warm-up passes, timed passes)


def run(opts: common.Options) -> dict:
    warm, timed = SIZES[opts.level]
    shards = common.synthetic_shards(opts.work, "gpu" if common.cuda() else opts.level)
    results: dict[str, Any] = {}
    ratios: dict[str, float | None] = {}
    configs: dict[str, Any] = {}
    for path, cfg in common.experiments(opts):
        name = common.label(cfg)
        configs[name] = {"file": path, "resolved": cfg}
        batch, workers = cfg["data"]["eval_batch_size"], cfg["data"]["num_workers"]
        results[name] = res = {"batch": batch, "num_workers": workers}
        try:
            metas = [embed_pass(path, shards, Path(opts.work) / f"embed-{name}", batch, workers, cfg) for _ in range(warm + timed)]  # fmt: skip
            count = metas[-1]["count"]
            rates = [m["images_per_s"] for m in metas[warm:]]
            res["embed"] = common.summarize(rates, "images/s", warm, images_per_pass=count)
            res["raw_timm"] = raw_infer(cfg, count, batch, common.Repeats(warm, timed))
        except torch.cuda.OutOfMemoryError as e:
            res["error"] = f"CUDA out of memory: {str(e).splitlines()[0]}"
        ratios[f"{name} embed/raw"] = common.ratio(res.get("embed"), res.get("raw_timm"))
    notes = [f"{timed} timed passes over the test split after {warm} warm-up pass(es), both sides"]
    return common.publish("embed", opts, configs, results, ratios, notes)


def embed_pass(config: str, shards: Path, out: Path, batch: int, workers: int, cfg: dict) -> dict:
    """One ``retrieval embed`` of the test split at the config's starting weights; its meta.json."""
    precision = cfg["train"].get("precision", "auto")
    common.retrieval("embed", "--model", config, "--untrained", "--shards", shards, "--split", "test", "--out", out, "--batch-size", batch, "--workers", workers, "--precision", precision)  # fmt: skip
    return EmbeddingSet.load(out, vectors=False).meta


@torch.no_grad()
def raw_infer(cfg: dict, count: int, batch: int, reps: common.Repeats) -> dict[str, Any]:
    torch.manual_seed(0)
    model = common.raw_timm(cfg).eval()
    size = common.img_size(cfg)
    x = torch.randn(batch, 3, size, size, device=common.device())
    n = math.ceil(count / batch)

    def one_pass() -> None:
        for _ in range(n):
            with common.autocast(cfg):
                model(x)

    if common.cuda():
        torch.cuda.reset_peak_memory_stats()
    return common.time_rate(one_pass, n * batch, reps) | {"peak_mem_gb": common.peak_gb()}
