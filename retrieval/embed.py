"""Embed a split rank-sharded, then merge the parts into one ordered set of arrays.

    retrieval embed --model runs/tiny --shards shards/out --split test --out runs/tiny/emb-test
    accelerate launch --num_processes 8 -m retrieval embed --model runs/sop --shards /data/sop --split test --out E
    retrieval embed --model runs/tiny --untrained ...   # the run's starting weights (seed table: "untrained")

Each rank embeds its own shards (every image exactly once across ranks) and writes
``OUT/parts/part-<rank>.npy`` (+ ``.npz`` with ids/labels and ``.json`` with paths); rank 0 merges them
ordered by image id into ``embeddings.npy``, ``ids.npy``, ``labels.npy``, ``super_labels.npy``,
``paths.json`` and ``meta.json``, checking against ``stats.json`` that no image is missing or duplicated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from retrieval import dist
from retrieval.data.loader import Reader, eval_loader, read_stats
from retrieval.errors import UserError
from retrieval.models import InputSpec

log = logging.getLogger(__name__)
KEYS = ("embeddings", "ids", "labels", "super_labels")


def _autocast(device: torch.device, mixed_precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def embed_split(
    model,
    shards: str,
    split: str,
    spec: InputSpec,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    mixed_precision: str = "no",
) -> dict:
    """This rank's share of ``split``: embeddings (float32) with ids, labels, super labels and paths."""
    model.eval()
    loader = eval_loader(shards, split, spec, batch_size, num_workers, Reader(dist.rank(), dist.world_size()))
    out: dict[str, list] = {k: [] for k in (*KEYS, "paths")}
    skipped, start, count = 0, time.perf_counter(), 0
    for batch in tqdm(loader, desc=f"embed {split}", disable=not dist.is_main(), unit="batch"):
        skipped += int(batch.get("skipped", 0))
        if len(batch["label"]) == 0:
            continue
        with _autocast(device, mixed_precision):
            emb = model(batch["image"].to(device, non_blocking=True))
        out["embeddings"].append(emb.float().cpu().numpy())
        out["ids"].append(batch["image_id"].numpy())
        out["labels"].append(batch["label"].numpy())
        out["super_labels"].append(batch["super_label"].numpy())
        out["paths"].extend(batch["path"])
        count += len(batch["label"])
    seconds = time.perf_counter() - start
    dim = getattr(model, "embed_dim", 0)
    local = {k: (np.concatenate(out[k]) if out[k] else _empty(k, dim)) for k in KEYS}
    local.update(paths=out["paths"], skipped=skipped, seconds=seconds, count=count)
    return local


def _empty(key: str, dim: int) -> np.ndarray:
    return np.zeros((0, dim), np.float32) if key == "embeddings" else np.zeros(0, np.int64)


def merge(parts: list[dict]) -> dict:
    """Concatenate rank parts and order by image id; duplicate ids are a bug upstream, so they raise."""
    merged = {k: np.concatenate([p[k] for p in parts]) for k in KEYS}
    paths = [x for p in parts for x in p["paths"]]
    order = np.argsort(merged["ids"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    merged["paths"] = [paths[i] for i in order]
    dup = merged["ids"][1:][merged["ids"][1:] == merged["ids"][:-1]]
    if len(dup):
        raise RuntimeError(f"embedding parts contain duplicate image ids, e.g. {dup[:5].tolist()}")
    merged["skipped"] = sum(p["skipped"] for p in parts)
    merged["seconds"] = max((p.get("seconds", 0.0) for p in parts), default=0.0)  # the slowest rank's loop
    return merged


def gather_embeddings(local: dict) -> dict | None:
    """In-memory gather for validation: the merged arrays on rank 0, None on the others."""
    parts = dist.gather_object(local)
    return merge(parts) if parts is not None else None


# ---------------------------------------------------------------------------------------------
# `retrieval embed`


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="run folder, model.safetensors (model.yaml beside it), or a config YAML with --untrained",
    )
    p.add_argument("--shards", required=True, help="shard folder with stats.json")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--untrained", action="store_true", help="the run's architecture at its starting weights")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored embedding dtype")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--img-size", type=int, help="default: the run's data.img_size or the model's input size")


def load_model_for_embedding(model_path: str, untrained: bool):
    """(model, img spec, provenance) from a run folder or an exported file."""
    from retrieval.config import load_config
    from retrieval.models import build_model, initial_model, load_exported

    path = Path(model_path)
    if path.suffix in (".yaml", ".yml"):  # an experiment config: only meaningful at its starting weights
        if not untrained:
            raise UserError(
                f"--model {model_path}: a config file has no trained weights; add --untrained or pass "
                "a run folder / model.safetensors"
            )
        run_cfg = path
    else:
        run_cfg = path / "config.yaml" if path.is_dir() else None
    cfg = load_config(run_cfg) if run_cfg is not None and run_cfg.is_file() else None
    if untrained and cfg is not None:
        model = initial_model(cfg)
    else:
        model, model_cfg = load_exported(path)
        if untrained:
            torch.manual_seed(0)
            model = build_model(model_cfg)
    if cfg is None:
        from retrieval.config import Config

        cfg = Config()
    return model, InputSpec.of(model, cfg.data), {"model": str(path), "untrained": untrained}


def run(args: argparse.Namespace) -> int:
    acc = dist.make_accelerator(args.precision, 1, args.out)
    model, img, provenance = load_model_for_embedding(args.model, args.untrained)
    img = img.with_size(args.img_size)
    stats = read_stats(args.shards)
    if args.split not in stats:
        raise UserError(f"{args.shards}/stats.json has no split {args.split!r}; found {sorted(stats)}")
    model = model.to(acc.device)
    local = embed_split(
        model, args.shards, args.split, img, args.batch_size, args.num_workers, acc.device, acc.mixed_precision
    )
    log.info(
        "rank %d: %d images in %.1f s (%.1f images/s)",
        acc.process_index,
        local["count"],
        local["seconds"],
        local["count"] / max(local["seconds"], 1e-9),
    )
    out = Path(args.out)
    _write_part(out / "parts", acc.process_index, local)
    acc.wait_for_everyone()
    if acc.is_main_process:
        parts = [out / "parts" / f"part-{r:05d}.npz" for r in range(acc.num_processes)]  # not stale ones
        merged = merge([_read_part(p) for p in parts])
        _check_complete(merged, stats[args.split], args)
        _write_merged(out, merged, args, img, provenance, acc.num_processes)
        shutil.rmtree(out / "parts")
    acc.wait_for_everyone()
    acc.end_training()
    return 0


def _write_part(folder: Path, rank: int, local: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"part-{rank:05d}.npz", **{k: local[k] for k in KEYS})
    (folder / f"part-{rank:05d}.json").write_text(
        json.dumps(
            {"paths": local["paths"], "skipped": local["skipped"], "seconds": local["seconds"], "count": local["count"]}
        )
    )


def _read_part(npz: Path) -> dict:
    with np.load(npz) as z:
        part = {k: z[k] for k in KEYS}
    part.update(json.loads(npz.with_suffix(".json").read_text()))
    return part


def _check_complete(merged: dict, split_stats: dict, args) -> None:
    expected = int(split_stats["samples"])
    got = len(merged["ids"]) + merged["skipped"]
    if got != expected:
        raise RuntimeError(
            f"embedded {len(merged['ids'])} images (+{merged['skipped']} undecodable) of split "
            f"{args.split!r}, but {args.shards}/stats.json lists {expected}"
        )


def _write_merged(out: Path, merged: dict, args, img: dict, provenance: dict, world: int) -> None:
    dtype = np.float16 if args.dtype == "float16" else np.float32
    np.save(out / "embeddings.npy", merged["embeddings"].astype(dtype))
    for key in ("ids", "labels", "super_labels"):
        np.save(out / f"{key}.npy", merged[key].astype(np.int64))
    (out / "paths.json").write_text(json.dumps(merged["paths"]))
    meta = {
        **provenance,
        "shards": str(args.shards),
        "split": args.split,
        "count": len(merged["ids"]),
        "dim": int(merged["embeddings"].shape[1]) if merged["embeddings"].ndim == 2 else 0,
        "dtype": args.dtype,
        "skipped": merged["skipped"],
        "img_size": img.size,
        "input": img.to_dict(),
        "world_size": world,
        "seconds": round(merged["seconds"], 3),  # loader start to last batch, slowest rank (bench embed reads it)
        "images_per_s": round(len(merged["ids"]) / max(merged["seconds"], 1e-9), 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("wrote %d embeddings (dim %d) to %s", meta["count"], meta["dim"], out)
