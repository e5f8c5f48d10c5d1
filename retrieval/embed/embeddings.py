"""The embeddings set: the artifact every later step reads (numpy only: eval, index build and search load it
without torch; embedding a split with a model is :mod:`retrieval.embed.sharded`).

An :class:`EmbeddingSet` is one folder, written and read only through this class (its files are named in
:mod:`retrieval.embed._store`, which nobody else imports)::

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
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval import util
from retrieval.embed import _store as store
from retrieval.embed._store import PartedVectors, PartWriter  # noqa: F401  (PartWriter: re-exported for embed.sharded)
from retrieval.errors import UserError

log = logging.getLogger(__name__)

COLUMNS = store.COLUMNS


@dataclass
class EmbeddingSet:
    """Vectors with their image ids, classes, super classes, paths and provenance (``meta``).

    ``embeddings`` is an array (merged layout, or a set built in memory) or, for a parted folder, a
    :class:`~retrieval.embed._store.PartedVectors` over the memory-mapped parts: index it by rows, stream
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
        """The seed table's rows: untrained, pretrained (zero-shot: a timm model's own weights), fine-tuned."""
        if self.meta.get("untrained"):
            return "untrained"
        return "pretrained (zero-shot)" if self.meta.get("zero_shot") else "finetuned"

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
        """A :class:`~retrieval.embed._store.PartWriter`: one rank's rows streamed into parts of ``folder``."""
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

    @staticmethod
    def check_replaceable(folder: str | Path) -> None:
        """``retrieval embed --out`` replaces the folder whole: refused when it holds something else than a set."""
        folder = Path(folder)
        if folder.is_dir() and any(folder.iterdir()) and not store.is_set_folder(folder):
            raise UserError(
                f"--out {folder}: a folder that is no embeddings set (no {store.META}, {store.MANIFEST} or ids.npy); "
                "`retrieval embed` replaces its --out whole: choose a new folder or an embeddings folder"
            )

    # ------------------------------------------------------------------------------------ read
    @staticmethod
    @contextlib.contextmanager
    def reading(folder: str | Path) -> Iterator[None]:
        """Hold ``folder`` against a new ``retrieval embed`` into it while it is read (its lock, shared: readers
        go together, a writer waits for none of them and is refused). A parted set is read lazily, so an eval or
        an index build holds it for its whole run; a folder this user may not lock beside is read without."""
        try:
            fd = util.lock(util.folder_lock_path(folder), shared=True)
        except util.Busy as e:
            raise UserError(
                f"{folder} is being written by `retrieval embed` (pid {e.holder}): wait for it to end"
            ) from None
        try:
            yield
        finally:
            util.unlock(fd)

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
            if n:  # an empty set's vectors have no width to compare
                store.check_dim(folder / store.META, meta.get("dim"), emb.shape[1])
        return cls(emb, columns["ids"], columns["labels"], columns["super_labels"], paths, meta)

    @classmethod
    def open(cls, path: str | Path, columns=None) -> EmbeddingSet:
        """Our folder (:meth:`load`), or another tool's embeddings (:mod:`retrieval.embed.interop`): a plain .npy
        with its labels (``columns``: an :class:`~retrieval.embed.interop.Columns`), clip-retrieval's folder."""
        from retrieval.embed import interop  # pyarrow only when a parquet file is read

        path = Path(path)
        if not interop.is_foreign(path):
            return cls.load(path)
        emb, ids, labels, super_labels, paths, meta = interop.read_foreign(path, columns or interop.Columns())
        return cls(emb, ids, labels, super_labels, paths, {**meta, "count": len(ids), "dim": int(emb.shape[1])})

    def vectors32(self) -> np.ndarray:
        """The vectors as contiguous float32 (a copy only when stored as float16, memory-mapped or parted)."""
        if isinstance(self.embeddings, PartedVectors):
            return self.embeddings.materialize()
        if isinstance(self.embeddings, np.memmap):  # a mapped .npy (another tool's): a writable copy for torch
            return np.array(self.embeddings, dtype=np.float32)
        return np.ascontiguousarray(self.embeddings, dtype=np.float32)

    def blocks(self, rows: int = store.BLOCK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(image ids, float32 vectors)`` blocks covering every row once: for consumers that stream
        (an index build adds rows without holding all vectors twice)."""
        for set_rows, block in self.row_blocks(rows):
            yield self.ids[set_rows], block

    def block_count(self, rows: int = store.BLOCK_ROWS) -> int:
        """How many blocks :meth:`blocks` yields (a progress bar's total)."""
        if isinstance(self.embeddings, PartedVectors):
            return int(sum(-(-int(n) // rows) for n in np.diff(self.embeddings.offsets)))
        return -(-len(self) // rows)

    def row_blocks(self, rows: int = store.BLOCK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(row numbers, float32 vectors)`` blocks covering every row once, in storage order (memory O(block))."""
        if isinstance(self.embeddings, PartedVectors):
            yield from self.embeddings.blocks(rows)
            return
        for s0 in range(0, len(self), rows):
            rows_here = np.arange(s0, min(s0 + rows, len(self)))
            yield rows_here, np.ascontiguousarray(self.embeddings[s0 : s0 + rows], dtype=np.float32)

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
