"""Embedding a split rank-sharded, and the embeddings set: the artifact every later step reads.

An :class:`EmbeddingSet` is one folder, written and read only here::

    embeddings.npy      N x d float32 (or float16), rows ordered by image id
    ids.npy labels.npy super_labels.npy    N int64 each
    paths.json          N image paths as the shards recorded them
    meta.json           provenance: model, untrained, shards, split, input spec, count, dim, dtype, skipped,
                        world size, seconds, images/s; written last, so a folder without it is incomplete

``retrieval embed`` writes one per rank under ``OUT/parts/part-<rank>/`` and rank 0 merges them into ``OUT``;
``eval``, ``index build``, ``report`` and ``search`` load it. An index folder keeps the same catalogue columns
without the vectors (``save(..., vectors=False)``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from retrieval import dist
from retrieval.config import Config
from retrieval.config_io import load_config
from retrieval.data.loader import Reader, eval_loader
from retrieval.data.source import split_entry
from retrieval.errors import UserError
from retrieval.export import load_exported, read_input_spec, resolve_export
from retrieval.models import InputSpec, build_model, initial_model
from retrieval.runs import RunFolder
from retrieval.util import atomic_path, write_atomic

log = logging.getLogger(__name__)

COLUMNS = ("ids", "labels", "super_labels")  # int64 columns beside the vectors
META = "meta.json"


@dataclass
class EmbeddingSet:
    """Vectors with their image ids, classes, super classes, paths and provenance (``meta``)."""

    embeddings: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    super_labels: np.ndarray
    paths: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0

    @property
    def training(self) -> str:
        return "untrained" if self.meta.get("untrained") else "finetuned"

    # ----------------------------------------------------------------------------------- write
    def save(self, folder: str | Path, dtype: str = "float32", vectors: bool = True) -> Path:
        """Write the set into ``folder`` (each file atomically, ``meta.json`` last); ``vectors=False`` writes the
        catalogue columns only (an index folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(self, k).astype(np.int64) for k in COLUMNS}
        if vectors:
            arrays["embeddings"] = self.embeddings.astype(np.float16 if dtype == "float16" else np.float32)
        for name, array in arrays.items():
            with atomic_path(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, array)
        write_atomic(folder / "paths.json", json.dumps(self.paths))
        meta = {**self.meta, "count": len(self), "dim": self.dim, "dtype": dtype if vectors else None}
        write_atomic(folder / META, json.dumps(meta, indent=1) + "\n")
        return folder

    # ------------------------------------------------------------------------------------ read
    @staticmethod
    def is_folder(folder: str | Path) -> bool:
        return (Path(folder) / META).is_file() and (Path(folder) / "ids.npy").is_file()

    @classmethod
    def load(cls, folder: str | Path, vectors: bool = True, mmap: bool = False) -> EmbeddingSet:
        """Read and validate a folder written by :meth:`save`; every problem names the file and what was expected.

        ``mmap`` maps the vectors instead of reading them (the report reads a dozen rows of them).
        Non-finite vectors are refused: a metric or an index over NaN is a silent wrong result.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder (expected an embeddings folder written by `retrieval embed`)")
        meta = _read_json(folder / META, "the provenance written last by `retrieval embed`")
        columns = {k: _load_array(folder / f"{k}.npy", mmap=False) for k in COLUMNS}
        n = len(columns["ids"])
        for name, array in columns.items():
            if array.ndim != 1 or len(array) != n or not np.issubdtype(array.dtype, np.integer):
                raise UserError(f"{folder / name}.npy: expected {n} integers (one per image), got {array.shape}")
        emb = np.zeros((n, int(meta.get("dim", 0))), np.float32)
        if vectors:
            emb = _check_vectors(folder / "embeddings.npy", _load_array(folder / "embeddings.npy", mmap), n)
        paths = _read_json(folder / "paths.json", "one image path per row") if (folder / "paths.json").is_file() else []
        if not isinstance(paths, list) or (paths and len(paths) != n):
            raise UserError(f"{folder / 'paths.json'}: expected a list of {n} paths")
        ints = {k: v.astype(np.int64) for k, v in columns.items()}
        return cls(emb, ints["ids"], ints["labels"], ints["super_labels"], paths, meta)

    def vectors32(self) -> np.ndarray:
        """The vectors as contiguous float32 (a copy only when stored as float16 or memory-mapped)."""
        return np.ascontiguousarray(self.embeddings, dtype=np.float32)

    # ----------------------------------------------------------------------------------- merge
    @classmethod
    def merge(cls, parts: list[EmbeddingSet]) -> EmbeddingSet:
        """Concatenate rank parts ordered by image id; duplicate ids are a bug upstream, so they raise."""
        emb = np.concatenate([p.embeddings for p in parts])
        cols = {k: np.concatenate([getattr(p, k) for p in parts]) for k in COLUMNS}
        paths = [x for p in parts for x in p.paths]
        order = np.argsort(cols["ids"], kind="stable")
        ids = cols["ids"][order]
        dup = ids[1:][ids[1:] == ids[:-1]]
        if len(dup):
            raise RuntimeError(f"embedding parts contain duplicate image ids, e.g. {dup[:5].tolist()}")
        meta = {
            "skipped": sum(int(p.meta.get("skipped", 0)) for p in parts),
            "seconds": max((float(p.meta.get("seconds", 0.0)) for p in parts), default=0.0),
        }
        return cls(emb[order], ids, cols["labels"][order], cols["super_labels"][order], [paths[i] for i in order], meta)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: not found ({what}); is {path.parent} a complete `retrieval embed` output?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def _load_array(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: file not found (an embeddings folder holds embeddings.npy, ids.npy, labels.npy)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npy array ({e})") from e


def _check_vectors(path: Path, emb: np.ndarray, n: int, chunk: int = 65536) -> np.ndarray:
    if emb.ndim != 2 or emb.shape[0] != n or (n and emb.shape[1] < 1):
        raise UserError(f"{path}: expected shape ({n}, d) (one row per id), got {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise UserError(f"{path}: expected float32/float16 values, got {emb.dtype}")
    for start in range(0, n, chunk):  # chunked: a memory-mapped set is never read whole for this
        bad = ~np.isfinite(emb[start : start + chunk]).all(1)
        if bad.any():
            first = start + int(np.flatnonzero(bad)[0])
            raise UserError(f"{path}: rows contain NaN or inf (first: row {first}); the model that wrote them diverged")
    return emb


# ---------------------------------------------------------------------------------------------
# Embedding a split


def autocast(device: torch.device, mixed_precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def embed_split(
    model: torch.nn.Module,
    shards: str,
    split: str,
    spec: InputSpec,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    mixed_precision: str = "no",
    label_key: str | None = None,
) -> EmbeddingSet:
    """This rank's share of ``split`` (its ``meta`` holds ``skipped``, ``seconds``, ``count``).

    Rank 0 shows a progress bar in images; its total is the split's size (stats.json) over the ranks.
    """
    model.eval()
    world = dist.world_size()
    loader = eval_loader(shards, split, spec, batch_size, num_workers, Reader(dist.rank(), world), label_key)
    samples = int(split_entry(shards, split).get("samples", 0))
    out: dict[str, list] = {k: [] for k in ("embeddings", *COLUMNS)}
    paths: list[str] = []
    skipped, start = 0, time.perf_counter()
    bar = tqdm(
        total=-(-samples // world) or None, desc=f"embed {split} (this rank)", disable=not dist.is_main(), unit="img"
    )
    for batch in loader:
        skipped += int(batch.get("skipped", 0))
        bar.update(len(batch["label"]) + int(batch.get("skipped", 0)))
        if len(batch["label"]) == 0:
            continue
        with autocast(device, mixed_precision):
            emb = model(batch["image"].to(device, non_blocking=True))
        out["embeddings"].append(emb.float().cpu().numpy())
        out["ids"].append(batch["image_id"].numpy())
        out["labels"].append(batch["label"].numpy())
        out["super_labels"].append(batch["super_label"].numpy())
        paths.extend(batch["path"])
    bar.close()
    dim = int(getattr(model, "embed_dim", 0))
    arrays = {k: np.concatenate(v) if v else _empty(k, dim) for k, v in out.items()}
    meta = {"skipped": skipped, "seconds": time.perf_counter() - start, "count": len(paths)}
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


def load_model(model_path: str | Path, untrained: bool = False) -> LoadedModel:
    """A run folder, an export folder / ``model.safetensors``, or (with ``untrained``) a config YAML.

    ``untrained`` rebuilds the run's architecture at its seeded starting weights (the seed table's "untrained"
    row). The input spec is the one the model was trained with: ``input.json`` beside the weights, else the
    run's config, else the model's defaults.
    """
    path = Path(model_path)
    cfg = _run_config(path, untrained)
    if untrained and cfg is not None:
        model, spec = initial_model(cfg), None
    else:
        model, model_cfg = load_exported(path)
        spec = read_input_spec(resolve_export(path)[0])
        if untrained:
            torch.manual_seed(0)
            model = build_model(model_cfg)
    spec = spec or InputSpec.of(model, cfg.data if cfg is not None else None)
    return LoadedModel(model, spec, {"model": str(path), "untrained": untrained})


def _run_config(path: Path, untrained: bool) -> Config | None:
    if path.suffix in (".yaml", ".yml"):  # an experiment config: only meaningful at its starting weights
        if not untrained:
            raise UserError(
                f"--model {path}: a config file has no trained weights; add --untrained or pass "
                "a run folder / model.safetensors"
            )
        return load_config(path)
    return RunFolder(path).read_config() if RunFolder.is_run(path) else None
