"""The files of an embeddings set: the one module that knows their names (used only by :mod:`retrieval.embed.embeddings`).

Two layouts, one reader (``EmbeddingSet.load`` picks by what it finds):

**merged** (one file per column)::

    embeddings.npy  ids.npy labels.npy super_labels.npy  paths.json  meta.json (last)

**parted** (what ``retrieval embed`` writes: each rank streams its rows into parts as it goes, so its memory
does not grow with the split)::

    parts/r00000-p00000/        one part of rank 0: a merged-layout folder of at most ``rows_per_part`` rows
    parts/rank-00000.json       rank 0's list of parts, written when that rank finished (count, skipped, seconds)
    parts.json                  the manifest: every part with its row count, the total, dim, dtype (rank 0, checked)
    meta.json                   written last

A parted set is read with its vectors memory-mapped (:class:`PartedVectors`): the columns (ids, labels) are
loaded and the rows presented ordered by image id, exactly as the merged layout stores them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import UserError
from retrieval.util import atomic_path, write_atomic

COLUMNS = ("ids", "labels", "super_labels")  # int64 columns beside the vectors
META, MANIFEST, PARTS, VECTORS = "meta.json", "parts.json", "parts", "embeddings.npy"
BLOCK_ROWS = 65536


# ------------------------------------------------------------------------------------------- one folder
def write_folder(folder: Path, vectors: np.ndarray | None, columns: dict, paths: list[str], meta: dict) -> None:
    """Each file atomically, ``meta.json`` last; ``vectors=None`` writes the catalogue columns only."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(columns[k]).astype(np.int64) for k in COLUMNS}
    if vectors is not None:
        arrays["embeddings"] = vectors
    for name, array in arrays.items():
        with atomic_path(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    write_atomic(folder / "paths.json", json.dumps(paths))
    write_atomic(folder / META, json.dumps(meta, indent=1) + "\n")


def write_meta(folder: Path, meta: dict) -> None:
    write_atomic(Path(folder) / META, json.dumps(meta, indent=1) + "\n")


def is_folder(folder: Path) -> bool:
    return (folder / META).is_file() and ((folder / "ids.npy").is_file() or (folder / MANIFEST).is_file())


def is_set_folder(folder: Path) -> bool:
    """Any trace of an embeddings set, complete or not (a folder a killed run left counts)."""
    return any((folder / name).exists() for name in (META, MANIFEST, PARTS, "ids.npy", VECTORS))


def has_vectors(folder: Path) -> bool:
    return is_folder(folder) and ((folder / VECTORS).is_file() or (folder / MANIFEST).is_file())


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: not found ({what}); is {path.parent} a complete `retrieval embed` output?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def load_array(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: file not found (an embeddings folder holds embeddings.npy, ids.npy, labels.npy)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npy array ({e})") from e


def check_vectors(path: Path, emb: np.ndarray, n: int, chunk: int = BLOCK_ROWS) -> np.ndarray:
    if emb.ndim != 2 or emb.shape[0] != n or (n and emb.shape[1] < 1):
        raise UserError(f"{path}: expected shape ({n}, d) (one row per id), got {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise UserError(f"{path}: expected float32/float16 values, got {emb.dtype}")
    for start in range(0, n, chunk):  # chunked: a memory-mapped set is never read whole for this
        block = emb[start : start + chunk]
        bad = ~np.isfinite(block).all(1)
        if bad.any():
            first = start + int(np.flatnonzero(bad)[0])
            raise UserError(f"{path}: rows contain NaN or inf (first: row {first}); the model that wrote them diverged")
        zero = ~block.any(1)  # an all-zero row has no direction: every score against it is 0, a metric over it noise
        if zero.any():
            first = start + int(np.flatnonzero(zero)[0])
            raise UserError(
                f"{path}: {int(zero.sum())} rows are all zero (first: row {first}); the model that wrote them "
                "collapsed or was never trained: re-embed with a working model"
            )
    return emb


def check_dim(path: Path, claimed: Any, dim: int) -> None:
    """``path`` (a manifest or meta.json) claims the vectors' dimension: it must be the one they have."""
    if claimed is not None and (not isinstance(claimed, int) or isinstance(claimed, bool) or claimed != dim):
        raise UserError(
            f"{path}: says dim {claimed!r}, but the vectors are {dim}-dimensional; the folder is inconsistent "
            "(edited or mixed from two runs): embed again"
        )


def read_columns(folder: Path) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """The int64 columns, paths and meta of one merged-layout folder, each checked."""
    meta = read_json(folder / META, "the provenance written last by `retrieval embed`")
    columns = {k: load_array(folder / f"{k}.npy", mmap=False) for k in COLUMNS}
    n = len(columns["ids"])
    for name, array in columns.items():
        if array.ndim != 1 or len(array) != n or not np.issubdtype(array.dtype, np.integer):
            raise UserError(f"{folder / name}.npy: expected {n} integers (one per image), got {array.shape}")
    paths = read_json(folder / "paths.json", "one image path per row") if (folder / "paths.json").is_file() else []
    if not isinstance(paths, list) or (paths and len(paths) != n):
        raise UserError(f"{folder / 'paths.json'}: expected a list of {n} paths")
    return {k: v.astype(np.int64) for k, v in columns.items()}, paths, meta


# -------------------------------------------------------------------------------------------- writing parts
class PartWriter:
    """One rank's rows, written as parts of at most ``rows_per_part`` rows while they come (bounded memory)."""

    def __init__(self, folder: Path, rank: int, rows_per_part: int = BLOCK_ROWS, dtype: str = "float32") -> None:
        self.root, self.rank, self.rows_per_part = Path(folder) / PARTS, rank, rows_per_part
        self.dtype = np.float16 if dtype == "float16" else np.float32
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"r{rank:05d}-p*"):  # a previous run's parts of this rank
            shutil.rmtree(stale)
        self._rank_file.unlink(missing_ok=True)
        if rank == 0:  # the folder is incomplete until rank 0 writes meta.json again
            (Path(folder) / META).unlink(missing_ok=True)
        self.parts: list[dict] = []
        self._clear()

    @property
    def _rank_file(self) -> Path:
        return self.root / f"rank-{self.rank:05d}.json"

    def _clear(self) -> None:
        self.buf: dict[str, list[np.ndarray]] = {k: [] for k in ("embeddings", *COLUMNS)}
        self.paths: list[str] = []
        self.rows = 0

    def add(self, vectors: np.ndarray, columns: dict[str, np.ndarray], paths: list[str]) -> None:
        self.buf["embeddings"].append(np.asarray(vectors, self.dtype))
        for k in COLUMNS:
            self.buf[k].append(np.asarray(columns[k], np.int64))
        self.paths.extend(paths)
        self.rows += len(vectors)
        if self.rows >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"r{self.rank:05d}-p{len(self.parts):05d}"
        arrays = {k: np.concatenate(v) for k, v in self.buf.items()}
        write_folder(self.root / name, arrays.pop("embeddings"), arrays, self.paths, {"count": self.rows})
        self.parts.append({"name": name, "count": self.rows})
        self._clear()

    def close(self, meta: dict) -> dict:
        """Write the last part and this rank's list of parts (its ``meta``: skipped, seconds)."""
        self.flush()
        record = {**meta, "rank": self.rank, "count": sum(p["count"] for p in self.parts), "parts": self.parts}
        write_atomic(self._rank_file, json.dumps(record, indent=1) + "\n")
        return record


def finish_parts(folder: Path, world: int, dim: int, dtype: str) -> dict:
    """Tie every rank's parts into ``parts.json`` (after all ranks closed); returns the summed rank records.

    Files of another layout or of a previous run with more ranks are removed: the folder then holds one set.
    """
    folder = Path(folder)
    records = [read_json(folder / PARTS / f"rank-{r:05d}.json", f"rank {r}'s list of parts") for r in range(world)]
    parts = [p for rec in records for p in rec["parts"]]
    listed = {p["name"] for p in parts} | {f"rank-{r:05d}.json" for r in range(world)}
    for stale in (folder / PARTS).iterdir():
        if stale.name not in listed:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for name in (VECTORS, *(f"{k}.npy" for k in COLUMNS), "paths.json"):
        (folder / name).unlink(missing_ok=True)
    manifest = {"count": sum(p["count"] for p in parts), "dim": dim, "dtype": dtype, "parts": parts}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return {
        "count": manifest["count"],
        "skipped": sum(int(rec.get("skipped", 0)) for rec in records),
        "seconds": max((float(rec.get("seconds", 0.0)) for rec in records), default=0.0),
    }


def drop_parts(folder: Path) -> None:
    """After a merge: the parts and their manifest go (the merged files are complete by then)."""
    (Path(folder) / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(Path(folder) / PARTS, ignore_errors=True)


# -------------------------------------------------------------------------------------------- reading parts
def read_parted(folder: Path, vectors: bool) -> tuple[PartedVectors | None, dict, list[str], dict]:
    """Columns (sorted by image id), paths, meta and the memory-mapped vectors of a parted folder, checked
    against the manifest: every part present with the row count it lists, ids unique."""
    manifest = read_json(folder / MANIFEST, "the list of parts written by `retrieval embed`")
    meta = read_json(folder / META, "the provenance written last by `retrieval embed`")
    cols: dict[str, list[np.ndarray]] = {k: [] for k in COLUMNS}
    paths: list[str] = []
    files, counts = [], []
    for part in manifest["parts"]:
        pdir = folder / PARTS / part["name"]
        c, p, _ = read_columns(pdir)
        if len(c["ids"]) != part["count"]:
            raise UserError(f"{pdir}: holds {len(c['ids'])} rows, {folder / MANIFEST} lists {part['count']}")
        for k in COLUMNS:
            cols[k].append(c[k])
        paths += p
        array = load_array(pdir / VECTORS, mmap=True)  # the header only: its shape
        check_dim(folder / MANIFEST, manifest["dim"], array.shape[1] if array.ndim == 2 else -1)
        if vectors:
            check_vectors(pdir / VECTORS, array, part["count"])
        files.append(pdir / VECTORS)
        counts.append(part["count"])
    check_dim(folder / META, meta.get("dim"), manifest["dim"])  # after the parts: they hold the truth
    ids = np.concatenate(cols["ids"]) if counts else np.zeros(0, np.int64)
    if len(ids) != manifest["count"]:
        raise UserError(f"{folder / MANIFEST}: lists {manifest['count']} rows, its parts hold {len(ids)}")
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if (sorted_ids[1:] == sorted_ids[:-1]).any():
        raise UserError(f"{folder}: parts contain duplicate image ids (a rank embedded an image twice)")
    columns = {k: (np.concatenate(v) if v else np.zeros(0, np.int64))[order] for k, v in cols.items()}
    paths = [paths[i] for i in order] if len(paths) == len(ids) else []
    vecs = PartedVectors(files, counts, int(manifest["dim"]), manifest.get("dtype") or "float32", order)
    return vecs, columns, paths, meta


class PartedVectors:
    """N x d vectors kept in memory-mapped parts, seen in the set's row order (by image id).

    Supports what readers of an embeddings set do: ``len``, ``shape``, ``dtype``, row indexing (ints, slices,
    arrays, masks), ``np.asarray`` (one N x d copy) and :meth:`blocks` (every row once, memory O(block))."""

    ndim = 2

    def __init__(self, files: list[Path], counts: list[int], dim: int, dtype: str, order: np.ndarray) -> None:
        self.files = files
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.order = order  # row i of the set is stored row order[i]
        self.shape = (int(self.offsets[-1]), dim)
        self.dtype = np.dtype(dtype)
        self._inverse: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _map(self, part: int) -> np.ndarray:
        return np.load(self.files[part], mmap_mode="r")

    def __getitem__(self, key) -> np.ndarray:
        scalar = isinstance(key, (int, np.integer))
        rows = np.arange(len(self))[key]
        stored = self.order[np.atleast_1d(rows)]
        part = np.searchsorted(self.offsets, stored, side="right") - 1
        out = np.empty((len(stored), self.shape[1]), self.dtype)
        for p in np.unique(part):
            hit = part == p
            out[hit] = self._map(int(p))[stored[hit] - self.offsets[p]]
        return out[0] if scalar else out

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(set rows, float32 block)`` in storage order; each block is read through a short-lived map, so the
        resident memory stays one block whatever N (the pages of a finished map do not stay counted)."""
        if self._inverse is None:
            self._inverse = np.empty_like(self.order)
            self._inverse[self.order] = np.arange(len(self.order))
        for p in range(len(self.files)):
            off, n = int(self.offsets[p]), int(self.offsets[p + 1] - self.offsets[p])
            for s0 in range(0, n, rows):
                mm = self._map(p)
                block = np.array(mm[s0 : s0 + rows], np.float32)
                del mm
                yield self._inverse[off + s0 : off + s0 + len(block)], block

    def materialize(self, dtype=np.float32) -> np.ndarray:
        out = np.empty(self.shape, dtype)
        for rows, block in self.blocks():
            out[rows] = block
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.materialize(dtype or self.dtype)
