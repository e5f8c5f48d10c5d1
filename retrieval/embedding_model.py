"""The model side of embedding: load a model to embed with, and embed a split rank-sharded.

``retrieval embed`` and the trainer's validation run :func:`embed_split`; the search, the Python API and the
exports load a model with :func:`load_model`. The result is an :class:`~retrieval.embedding.EmbeddingSet`,
which lives in :mod:`retrieval.embedding` so that its readers (eval, index build, report) never import torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from retrieval import dist
from retrieval.config import Config, ModelConfig
from retrieval.config_io import load_config
from retrieval.data.loader import Reader, eval_loader
from retrieval.data.source import split_entry
from retrieval.embedding import COLUMNS, EmbeddingSet, PartWriter
from retrieval.errors import UserError
from retrieval.export import load_exported, read_input_spec, resolve_export
from retrieval.models import InputSpec, build_model, initial_model
from retrieval.runs import RunFolder

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Embedding a split


def autocast(device: torch.device, mixed_precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def _embedded_batches(
    model: torch.nn.Module, loader, device: torch.device, mixed_precision: str, progress: tuple, counts: dict
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], list[str]]]:
    """``(vectors, columns, paths)`` per batch; ``counts["skipped"]`` accumulates undecodable images; ``progress``
    is (split, images this rank expects) for the bar."""
    model.eval()
    split, total = progress
    bar = tqdm(total=total, desc=f"embed {split} (this rank)", disable=not dist.is_main(), unit="img")
    for batch in loader:
        counts["skipped"] += int(batch.get("skipped", 0))
        bar.update(len(batch["label"]) + int(batch.get("skipped", 0)))
        if len(batch["label"]) == 0:
            continue
        with torch.no_grad(), autocast(device, mixed_precision):
            emb = model(batch["image"].to(device, non_blocking=True))
        columns = {"ids": batch["image_id"], "labels": batch["label"], "super_labels": batch["super_label"]}
        yield emb.float().cpu().numpy(), {k: v.numpy() for k, v in columns.items()}, list(batch["path"])
    bar.close()


def embed_split(
    model: torch.nn.Module,
    shards: str,
    split: str,
    spec: InputSpec,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    mixed_precision: str = "no",
    writer: PartWriter | None = None,
    label_key: str | None = None,
) -> EmbeddingSet:
    """This rank's share of ``split`` (its ``meta`` holds ``skipped``, ``seconds``, ``count``).

    With ``writer`` (:meth:`EmbeddingSet.writer`) the rows go to parts on disk as they come and the returned set
    holds no rows (only its ``meta``): memory stays one part whatever the split's size. Without, they are
    gathered in memory (validation during training). Rank 0 shows a progress bar in images; its total is the
    split's size (stats.json) over the ranks.
    """
    world = dist.world_size()
    loader = eval_loader(shards, split, spec, batch_size, num_workers, Reader(dist.rank(), world), label_key)
    total = -(-int(split_entry(shards, split).get("samples", 0)) // world) or None
    dim = int(getattr(model, "embed_dim", 0))
    out: dict[str, list] = {k: [] for k in ("embeddings", *COLUMNS)}
    paths: list[str] = []
    counts, start, rows = {"skipped": 0}, time.perf_counter(), 0
    for vectors, columns, batch_paths in _embedded_batches(
        model, loader, device, mixed_precision, (split, total), counts
    ):
        rows += len(vectors)
        if writer is not None:
            writer.add(vectors, columns, batch_paths)
            continue
        out["embeddings"].append(vectors)
        for k in COLUMNS:
            out[k].append(columns[k])
        paths.extend(batch_paths)
    meta = {"skipped": counts["skipped"], "seconds": time.perf_counter() - start, "count": rows}
    if writer is not None:
        writer.close(meta)
    arrays = {k: np.concatenate(v) if v else _empty(k, dim) for k, v in out.items()}
    return EmbeddingSet(arrays["embeddings"], arrays["ids"], arrays["labels"], arrays["super_labels"], paths, meta)


def _empty(key: str, dim: int) -> np.ndarray:
    return np.zeros((0, dim), np.float32) if key == "embeddings" else np.zeros(0, np.int64)


def gather_embeddings(local: EmbeddingSet) -> EmbeddingSet | None:
    """In-memory gather for validation: the merged set on rank 0, None on the others."""
    parts = dist.gather_object(local)
    return EmbeddingSet.merge(parts) if parts is not None else None


# ---------------------------------------------------------------------------------------------
# The model to embed with


@dataclass
class LoadedModel:
    """A model ready to embed with: weights, the input spec it was trained with, and where it came from."""

    model: torch.nn.Module
    spec: InputSpec
    provenance: dict[str, Any]
    config: ModelConfig | None = None  # the architecture (timm name and kwargs) the weights belong to


def load_model(model_path: str | Path, untrained: bool = False) -> LoadedModel:
    """A run folder, an export folder / ``model.safetensors``, or (with ``untrained``) a config YAML.

    ``untrained`` rebuilds the run's architecture at its seeded starting weights (the seed table's "untrained"
    row). The input spec is the one the model was trained with: ``input.json`` beside the weights, else the
    run's config, else the model's defaults.
    """
    path = Path(model_path)
    cfg = _run_config(path, untrained)
    digest, source = None, path  # the identity of the weights (sha256 of model.safetensors); None for starting weights
    if untrained and cfg is not None:
        model, spec, model_cfg = initial_model(cfg), None, cfg.model
    else:
        model, model_cfg = load_exported(path)
        weights = source = resolve_export(path)[0]
        spec = read_input_spec(weights)
        if untrained:
            torch.manual_seed(0)
            model = build_model(model_cfg)
        else:
            digest = file_sha256(weights)
    spec = spec or InputSpec.of(model, cfg.data if cfg is not None else None)
    _check_finite_weights(model, source)
    return LoadedModel(model, spec, {"model": str(path), "untrained": untrained, "model_sha256": digest}, model_cfg)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_finite_weights(model: torch.nn.Module, path: Path) -> None:
    """Weights with NaN/inf embed every image to garbage (and an index over it answers nonsense): refuse them."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{path}: weight {name!r} holds NaN or inf: the model diverged in training; use another")


def _run_config(path: Path, untrained: bool) -> Config | None:
    if path.suffix in (".yaml", ".yml"):  # an experiment config: only meaningful at its starting weights
        if not untrained:
            raise UserError(
                f"--model {path}: a config file has no trained weights; add --untrained or pass "
                "a run folder / model.safetensors"
            )
        return load_config(path)
    return RunFolder(path).read_config() if RunFolder.is_run(path) else None
