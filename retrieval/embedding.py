"""Embedding a split rank-sharded, and the embeddings set: the artifact every later step reads.

An :class:`EmbeddingSet` is one folder, written and read only through this class (its files are named in
:mod:`retrieval.embedding_store`, which nobody else imports)::

    embeddings.npy      N x d float32 (or float16), rows ordered by image id     (merged layout)
    ids.npy labels.npy super_labels.npy    N int64 each
    paths.json          N image paths as the shards recorded them
    parts.json, parts/  the same rows as parts written by each rank while it embeds  (parted layout)
    meta.json           provenance: model, model_sha256 (of its weights), untrained, shards, split, input spec,
                        count, dim, dtype, skipped, world size, seconds, images/s; written last, so a folder
                        without it is incomplete

``retrieval embed`` streams each rank's rows into parts (:meth:`EmbeddingSet.writer`: memory bounded by one
part whatever the split's size) and rank 0 ties them with a manifest (``--merge``: one file per column instead).
``eval``, ``index build``, ``report`` and ``search`` load either layout; a parted one is memory-mapped and
presented ordered by image id, as a merged one. An index folder keeps the same catalogue columns without the
vectors (``save(..., vectors=False)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from retrieval import dist
from retrieval import embedding_store as store
from retrieval.config import Config, ModelConfig
from retrieval.config_io import load_config
from retrieval.data.loader import Reader, eval_loader
from retrieval.data.source import split_entry
from retrieval.embedding_store import PartedVectors
from retrieval.errors import UserError
from retrieval.export import load_exported, read_input_spec, resolve_export
from retrieval.models import InputSpec, build_model, initial_model
from retrieval.runs import RunFolder

log = logging.getLogger(__name__)

COLUMNS = store.COLUMNS


@dataclass
class EmbeddingSet:
    """Vectors with their image ids, classes, super classes, paths and provenance (``meta``).

    ``embeddings`` is an array (merged layout, or a set built in memory) or, for a parted folder, a
    :class:`~retrieval.embedding_store.PartedVectors` over the memory-mapped parts: index it by rows, stream
    it with :meth:`blocks`, or take one float32 copy with :meth:`vectors32`.
    """

    embeddings: np.ndarray | PartedVectors
    ids: np.ndarray
    labels: np.ndarray
    super_labels: np.ndarray
    paths: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """The vectors' dimension (from ``meta`` when loaded without them)."""
        if self.embeddings.ndim == 2 and self.embeddings.shape[1]:
            return int(self.embeddings.shape[1])
        return int(self.meta.get("dim", 0))

    @property
    def training(self) -> str:
        return "untrained" if self.meta.get("untrained") else "finetuned"

    # ----------------------------------------------------------------------------------- write
    def save(self, folder: str | Path, dtype: str = "float32", vectors: bool = True) -> Path:
        """Write the set in the merged layout into ``folder`` (each file atomically, ``meta.json`` last);
        ``vectors=False`` writes the catalogue columns only (an index folder)."""
        folder = Path(folder)
        vecs = None
        if vectors:
            vecs = np.asarray(self.embeddings, dtype=np.float16 if dtype == "float16" else np.float32)
        meta = {**self.meta, "count": len(self), "dim": self.dim, "dtype": dtype if vectors else None}
        columns = {k: getattr(self, k) for k in store.COLUMNS}
        store.write_folder(folder, vecs, columns, self.paths, meta)
        return folder

    @staticmethod
    def writer(folder: str | Path, rank: int, rows_per_part: int = store.BLOCK_ROWS, dtype: str = "float32"):
        """A :class:`~retrieval.embedding_store.PartWriter`: one rank's rows streamed into parts of ``folder``."""
        return store.PartWriter(Path(folder), rank, rows_per_part, dtype)

    @staticmethod
    def finish_parts(folder: str | Path, world: int, dim: int, dtype: str = "float32") -> dict:
        """Once every rank closed its writer: tie the parts with their manifest; returns the ranks' summed count,
        skipped and seconds. The folder is complete only after :meth:`write_meta` (check the count first)."""
        return store.finish_parts(Path(folder), world, dim, dtype)

    @staticmethod
    def write_meta(folder: str | Path, meta: dict[str, Any], count: int, dim: int, dtype: str = "float32") -> None:
        """``meta.json`` of a parted folder, written last."""
        store.write_meta(Path(folder), {**meta, "count": count, "dim": dim, "dtype": dtype})

    @staticmethod
    def drop_parts(folder: str | Path) -> None:
        store.drop_parts(Path(folder))

    # ------------------------------------------------------------------------------------ read
    @staticmethod
    def is_folder(folder: str | Path) -> bool:
        return store.is_folder(Path(folder))

    @staticmethod
    def has_vectors(folder: str | Path) -> bool:
        return store.has_vectors(Path(folder))

    @classmethod
    def load(cls, folder: str | Path, vectors: bool = True, mmap: bool = False) -> EmbeddingSet:
        """Read and validate a folder (either layout); every problem names the file and what was expected.

        ``mmap`` maps the vectors instead of reading them (the report reads a dozen rows of them); a parted
        folder is always mapped. Non-finite vectors are refused: a metric or an index over NaN is a silent
        wrong result.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder (expected an embeddings folder written by `retrieval embed`)")
        if (folder / store.MANIFEST).is_file():
            emb, columns, paths, meta = store.read_parted(folder, vectors)
            return cls(emb, columns["ids"], columns["labels"], columns["super_labels"], paths, meta)
        columns, paths, meta = store.read_columns(folder)
        n = len(columns["ids"])
        emb = np.zeros((n, 0), np.float32)  # without vectors: no memory for them (an index folder of millions)
        if vectors:
            path = folder / store.VECTORS
            emb = store.check_vectors(path, store.load_array(path, mmap), n)
        return cls(emb, columns["ids"], columns["labels"], columns["super_labels"], paths, meta)

    def vectors32(self) -> np.ndarray:
        """The vectors as contiguous float32 (a copy only when stored as float16, memory-mapped or parted)."""
        if isinstance(self.embeddings, PartedVectors):
            return self.embeddings.materialize()
        return np.ascontiguousarray(self.embeddings, dtype=np.float32)

    def blocks(self, rows: int = store.BLOCK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(image ids, float32 vectors)`` blocks covering every row once: for consumers that stream
        (an index build adds rows without holding all vectors twice)."""
        if isinstance(self.embeddings, PartedVectors):
            for set_rows, block in self.embeddings.blocks(rows):
                yield self.ids[set_rows], block
            return
        for s0 in range(0, len(self), rows):
            yield self.ids[s0 : s0 + rows], np.ascontiguousarray(self.embeddings[s0 : s0 + rows], dtype=np.float32)

    # ----------------------------------------------------------------------------------- merge
    @classmethod
    def merge(cls, parts: list[EmbeddingSet]) -> EmbeddingSet:
        """Concatenate rank parts ordered by image id; duplicate ids are a bug upstream, so they raise."""
        emb = np.concatenate([p.embeddings for p in parts])
        cols = {k: np.concatenate([getattr(p, k) for p in parts]) for k in store.COLUMNS}
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
    writer: store.PartWriter | None = None,
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
