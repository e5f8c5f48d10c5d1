"""``retrieval bench embed``: our embedding throughput against raw timm inference of the same model.

- ``raw_timm``: the bare timm backbone, ``eval()`` + ``no_grad`` (+ bf16 autocast where the config's precision
  says so), on the same images already decoded into memory (the test split of the synthetic shards; synthetic
  tensors where the shard readers are not installed), same batch size.
- ``our_model_in_memory``: our model (backbone + head + L2 norm) with ``embed_split``'s per-batch work (autocast,
  fp32 embeddings copied to host memory) on the same in-memory batches: the model-side overhead.
- ``embed_split``: ``retrieval.embed.embed_split`` over the shards: streaming read, decode, eval transform in
  loader workers, forward, host copy; one timed item is one full pass over the split (loader start included).

Ratios are ours / raw (1.0 = no overhead). On CUDA both SwinV2-B recipes run, as in ``bench train``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from retrieval import dist
from retrieval.bench import common
from retrieval.bench.train import _free, _peak_gb, _reset_peak, _workdir, autocast, case_label, cases, img_size
from retrieval.config import Config
from retrieval.config_io import to_dict

log = logging.getLogger(__name__)

# (warm-up passes, timed passes, in-memory batches per pass)
CPU_SIZES = {"tiny": (1, 2, 2), "quick": (1, 3, 4), "full": (1, 5, 8)}
GPU_SIZES = {"tiny": (1, 2, 2), "quick": (1, 3, 4), "full": (2, 5, 8)}


def run_bench(
    quick: bool,
    out_dir: Path,
    *,
    tiny: bool = False,
    config: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    work: Path | None = None,
    trainer: bool = True,
) -> dict[str, Any]:
    """Measure every case, write ``out_dir/bench-embed.json`` and return its payload."""
    level = common.level_of(quick, tiny)
    device = common.default_device()
    warm, timed, n_batches = (GPU_SIZES if device.type == "cuda" else CPU_SIZES)[level]
    reps = common.Repeats(warmup=warm, repeats=timed)
    missing = common.data_stack_missing()
    use_shards = trainer and not missing
    notes = [f"{timed} timed passes after {warm} warm-up pass(es); a pass is every batch of the data once"]
    if not use_shards:
        why = f"{missing} is not installed" if missing else "--no-trainer"
        notes.append(f"embed_split over shards skipped ({why}): raw and ours run on synthetic in-memory tensors")
    results: dict[str, Any] = {}
    ratios: dict[str, float | None] = {}
    configs: dict[str, Any] = {}
    with _workdir(work) as wd:
        shards = common.synthetic_shards(wd, level, 256 if device.type == "cuda" else None) if use_shards else None
        for cfg, source in cases(config, overrides, device.type == "cuda"):
            label = case_label(cfg)
            configs[label] = {"file": source, "resolved": to_dict(cfg)}
            try:
                res = measure_case(cfg, device, reps, shards, n_batches)
            except torch.cuda.OutOfMemoryError as e:
                res = {"error": f"CUDA out of memory: {str(e).splitlines()[0]}"}
                notes.append(f"{label}: out of memory; lower data.eval_batch_size")
            finally:
                _free(device)
            results[label] = res
            ratios[f"{label} embed_split/raw"] = common.ratio(res.get("embed_split"), res.get("raw_timm"))
            ratios[f"{label} model/raw"] = common.ratio(res.get("our_model_in_memory"), res.get("raw_timm"))
    ratios = {k: v for k, v in ratios.items() if v is not None}
    payload = common.envelope(
        "embed",
        level,
        device,
        configs,
        results,
        ratios,
        notes,
        sizes={"warmup_passes": warm, "timed_passes": timed, "batches_per_pass": n_batches},
    )
    return common.publish(out_dir, payload)


def measure_case(
    cfg: Config, device: torch.device, reps: common.Repeats, shards: Path | None, n_batches: int
) -> dict[str, Any]:
    from retrieval.models import build_model

    precision = dist.resolve_precision(cfg.train.precision, device.type == "cuda")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device).eval()
    spec = {
        "img_size": img_size(cfg),
        "mean": tuple(model.data_config["mean"]),
        "std": tuple(model.data_config["std"]),
        "crop_pct": model.data_config.get("crop_pct", 0.875),
    }
    if shards is not None:
        batches = decoded_split(cfg, shards, spec, device)
    else:
        batches = synthetic_batches(cfg, n_batches, device)
    res: dict[str, Any] = {
        "batch": cfg.data.eval_batch_size,
        "img_size": spec["img_size"],
        "precision": precision,
        "images_per_pass": sum(len(b) for b in batches),
    }
    _reset_peak(device)
    res["raw_timm"] = raw_timm_infer(cfg, batches, device, precision, reps)
    _free(device)
    _reset_peak(device)
    res["our_model_in_memory"] = model_in_memory(model, batches, device, precision, reps)
    if shards is not None:
        _reset_peak(device)
        res["embed_split"] = embed_split_rate(cfg, model, shards, spec, device, precision, reps)
    return res


def decoded_split(cfg: Config, shards: Path, spec: dict, device: torch.device) -> list[torch.Tensor]:
    """The test split through our eval loader once, kept in memory: the same images for both sides."""
    from retrieval.data.loader import eval_loader

    loader = eval_loader(
        shards,
        cfg.data.test_split,
        cfg.data.eval_batch_size,
        spec["img_size"],
        spec["mean"],
        spec["std"],
        spec["crop_pct"],
        num_workers=0,
        rank=0,
        world=1,
    )
    return [b["image"].to(device) for b in loader if len(b["label"])]


def synthetic_batches(cfg: Config, n: int, device: torch.device) -> list[torch.Tensor]:
    from retrieval.bench.train import synthetic_images

    return [synthetic_images(cfg, cfg.data.eval_batch_size, device, seed=i) for i in range(n)]


def _per_pass(fn, images: int, reps: common.Repeats, device: torch.device) -> dict[str, Any]:
    stats = common.time_rate(fn, images, reps, device, unit="images/s")
    stats["peak_mem_gb"] = _peak_gb(device)
    return stats


@torch.no_grad()
def raw_timm_infer(
    cfg: Config, batches: list[torch.Tensor], device: torch.device, precision: str, reps: common.Repeats
) -> dict[str, Any]:
    from retrieval.bench.train import raw_timm_model

    torch.manual_seed(cfg.train.seed)
    model = raw_timm_model(cfg, device).eval()

    def one_pass() -> None:
        for x in batches:
            with autocast(device, precision):
                model(x)

    return _per_pass(one_pass, sum(len(b) for b in batches), reps, device)


@torch.no_grad()
def model_in_memory(
    model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, precision: str, reps: common.Repeats
) -> dict[str, Any]:
    """``embed_split``'s per-batch work without the loader: autocast forward, fp32 embeddings to host numpy."""

    def one_pass() -> None:
        for x in batches:
            with autocast(device, precision):
                emb = model(x)
            emb.float().cpu().numpy()

    return _per_pass(one_pass, sum(len(b) for b in batches), reps, device)


def embed_split_rate(
    cfg: Config,
    model: torch.nn.Module,
    shards: Path,
    spec: dict,
    device: torch.device,
    precision: str,
    reps: common.Repeats,
) -> dict[str, Any]:
    """Whole passes of ``retrieval.embed.embed_split`` over the test split (loader workers started each pass)."""
    from retrieval.embed import embed_split

    counts: list[int] = []

    def one_pass() -> None:
        local = embed_split(
            model,
            str(shards),
            cfg.data.test_split,
            spec,
            cfg.data.eval_batch_size,
            cfg.data.num_workers,
            device,
            precision,
        )
        counts.append(int(local["count"]))

    for _ in range(reps.warmup):
        one_pass()
    rates = []
    for _ in range(reps.repeats):
        start = time.perf_counter()
        one_pass()
        common.synchronize(device)
        rates.append(counts[-1] / max(time.perf_counter() - start, 1e-12))
    stats = common.summarize(
        rates, "images/s", reps.warmup, images_per_pass=counts[-1], num_workers=cfg.data.num_workers
    )
    stats["peak_mem_gb"] = _peak_gb(device)
    return stats
