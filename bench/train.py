"""``bench train``: the real ``retrieval train`` beside a raw timm training loop of the same backbone.

- ``raw_timm``: ``timm.create_model`` (same name and kwargs), forward + backward + ``torch.optim.AdamW`` on one
  fixed synthetic batch of P×K images in the config's precision: what the hardware gives this model.
- ``trainer``: ``python -m retrieval train`` for N steps (``train.max_steps``) on synthetic shards built by
  ``retrieval synth-sop`` + ``retrieval shards build``: streaming P×K batches, decode + augment, mining, loss,
  AdamW, logging. Its figures are the ones it logs in ``metrics.jsonl`` (images/s, per GPU, data wait, peak
  memory), the first log interval (start-up) skipped.

On CUDA both SwinV2-B recipes (from scratch, their precision) run besides the chosen config.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from bench import common

# level -> (trainer steps, steps per log interval = timed block, intervals skipped as warm-up)
SIZES = {"tiny": (6, 2, 1), "quick": (30, 5, 1), "full": (120, 10, 2)}
GPU_SIZES = {"tiny": (6, 2, 1), "quick": (16, 4, 1), "full": (35, 5, 2)}


def run(opts: common.Options) -> dict:
    steps, block, warm = (GPU_SIZES if common.cuda() else SIZES)[opts.level]
    reps = common.Repeats(warm, steps // block - warm, block)
    shards = common.synthetic_shards(opts.work, "gpu" if common.cuda() else opts.level)
    results: dict[str, Any] = {}
    ratios: dict[str, float | None] = {}
    configs: dict[str, Any] = {}
    for path, cfg in common.experiments(opts):
        name = common.label(cfg)
        configs[name] = {"file": path, "resolved": cfg}
        results[name] = res = {"batch": cfg["data"]["classes_per_batch"] * cfg["data"]["images_per_class"]}
        try:
            res["raw_timm"] = raw_train(cfg, reps)
            run_dir = Path(opts.work) / f"train-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            common.launch_train(1, Path(path), run_dir, common.train_overrides(shards, steps, block))
            res["trainer"] = common.trainer_figures(run_dir, warm)
        except torch.cuda.OutOfMemoryError as e:  # report the case, keep the others
            res["error"] = f"CUDA out of memory: {str(e).splitlines()[0]}"
        ratios[f"{name} trainer/raw"] = common.ratio(res.get("trainer"), res.get("raw_timm"))
    notes = [
        f"raw: {reps.repeats} timed blocks of {block} steps after {warm} warm-up block(s); trainer: {steps} steps "
        f"logged every {block}, the first {warm} interval(s) skipped",
        "trainer figures are the trainer's own metrics.jsonl records (kind=train)",
    ]
    return common.publish("train", opts, configs, results, ratios, notes)


def raw_train(cfg: dict, reps: common.Repeats) -> dict[str, Any]:
    """Forward + backward + AdamW of the bare timm backbone on one fixed synthetic batch."""
    torch.manual_seed(0)
    model = common.raw_timm(cfg).train()
    optim = cfg["optim"]
    opt = torch.optim.AdamW(model.parameters(), lr=optim["lr"], weight_decay=optim["weight_decay"])
    batch = cfg["data"]["classes_per_batch"] * cfg["data"]["images_per_class"]
    size = common.img_size(cfg)
    x = torch.randn(batch, 3, size, size, device=common.device())

    def step() -> None:
        with common.autocast(cfg):
            loss = model(x).float().pow(2).mean()  # a trivial loss: the backbone's backward is what costs
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if common.cuda():
        torch.cuda.reset_peak_memory_stats()
    stats = common.time_rate(step, batch, reps)
    return stats | {
        "peak_mem_gb": common.peak_gb(),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    }
