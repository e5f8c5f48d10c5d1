"""Embeddings from and for other tools (numpy only; pyarrow imported when a parquet file is read or written).

In (``retrieval eval --embeddings``, ``retrieval index build --embeddings``, :meth:`EmbeddingSet.open`)::

    vectors.npy --labels labels.npy [--ids ids.npy]     a plain N x d array; N integer classes; ids default to rows
    clip/img_emb/img_emb_0.npy + clip/metadata/metadata_0.parquet ...    clip-retrieval's output folder: one
                                                         metadata file per vector file, row for row; the class is
                                                         the column --label-column (default ``label``; strings
                                                         are numbered), ids the ``image_id`` column or the row
                                                         numbers, paths the ``image_path`` column when present

Out (``retrieval embeddings export EMB --format parquet|npy --out DIR``), streamed a block of rows at a time (the
set is never read whole):

    parquet   DIR/embeddings.parquet: image_id, label, super_label (int64), path (string), embedding (list of
              float32): what autofaiss, vector databases and pandas load; a row group per block
    npy       DIR/embeddings.npy (N x d float32, rows in the set's order), ids.npy, labels.npy, super_labels.npy,
              paths.txt: the plain form, read back with ``--embeddings DIR/embeddings.npy --labels
              DIR/labels.npy --ids DIR/ids.npy``

A foreign set has no super classes (``super_labels`` are -1) and no model provenance: ``search``/``serve`` over
its index need ``--model`` (the model that made the vectors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.embed import _store as store
from retrieval.errors import UserError, require
from retrieval.util import atomic_path, write_atomic

CLIP_EMB, CLIP_META = "img_emb", "metadata"
FORMATS = ("parquet", "npy")


@dataclass(frozen=True)
class Columns:
    """Where a foreign set's columns are: ``labels``/``ids`` files beside a plain .npy, or clip-retrieval's label
    column."""

    labels: str | None = None
    ids: str | None = None
    label_column: str = "label"


def is_foreign(path: Path) -> bool:
    """Not a folder of ours: a .npy file, clip-retrieval's folder, or something unknown (refused by name)."""
    ours = any((path / name).exists() for name in (store.META, store.MANIFEST, store.VECTORS, "ids.npy"))
    return path.suffix == ".npy" or (path.is_dir() and not ours)


def read_foreign(path: Path, columns: Columns) -> tuple:
    """(vectors, ids, labels, super labels, paths, meta) of a plain .npy or a clip-retrieval folder, each checked."""
    if path.suffix == ".npy":
        return _read_npy(path, columns)
    if (path / CLIP_EMB).is_dir():
        return _read_clip(path, columns.label_column)
    raise UserError(
        f"{path}: not an embeddings set: expected a folder written by `retrieval embed` (meta.json), a .npy of N x d "
        f"vectors (with --labels), or clip-retrieval's folder ({CLIP_EMB}/{CLIP_EMB}_*.npy + "
        f"{CLIP_META}/{CLIP_META}_*.parquet)"
    )


def _int_column(path: Path, n: int, what: str) -> np.ndarray:
    array = store.load_array(path, mmap=False)
    if array.ndim != 1 or len(array) != n or not np.issubdtype(array.dtype, np.integer):
        raise UserError(
            f"{path}: expected {n} integers ({what}, one per row of the vectors), got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64)


def _read_npy(path: Path, columns: Columns) -> tuple:
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected an N x d .npy of vectors)")
    vectors = store.load_array(path, mmap=True)
    n = len(vectors)
    store.check_vectors(path, vectors, n)
    if columns.labels is None:
        raise UserError(f"{path}: a plain .npy of vectors needs --labels LABELS.npy (one integer class per row)")
    labels = _int_column(Path(columns.labels), n, "classes")
    ids = _int_column(Path(columns.ids), n, "image ids") if columns.ids else np.arange(n, dtype=np.int64)
    paths = Path(path).with_name("paths.txt")  # what `embeddings export --format npy` writes beside the vectors
    names = paths.read_text().splitlines() if paths.is_file() else []
    meta = {"source": "npy", "embeddings": str(path), "labels": columns.labels, "ids": columns.ids}
    return vectors, ids, labels, np.full(n, -1, np.int64), names if len(names) == n else [], meta


def _part_number(path: Path) -> int:
    found = re.search(r"_(\d+)\.npy$", path.name)
    return int(found.group(1)) if found else -1


def _read_clip(folder: Path, label_column: str) -> tuple:
    files = sorted((folder / CLIP_EMB).glob(f"{CLIP_EMB}_*.npy"), key=_part_number)
    if not files:
        raise UserError(f"{folder / CLIP_EMB}: holds no {CLIP_EMB}_N.npy (clip-retrieval's vector files)")
    require("pyarrow", "interop", "reading clip-retrieval's metadata (parquet)")
    import pyarrow.parquet as pq

    counts, tables, dims = [], [], set()
    for f in files:
        mapped = store.load_array(f, mmap=True)
        vectors = store.check_vectors(f, mapped, len(mapped))
        meta_file = folder / CLIP_META / f"{CLIP_META}_{_part_number(f)}.parquet"
        if not meta_file.is_file():
            raise UserError(f"{meta_file}: missing (clip-retrieval writes one {CLIP_META}_N.parquet per {f.name})")
        names = pq.read_schema(meta_file).names
        if label_column not in names:
            raise UserError(f"{meta_file}: no column {label_column!r} (found {names}); choose one with --label-column")
        table = pq.read_table(meta_file, columns=[c for c in (label_column, "image_id", "image_path") if c in names])
        if table.num_rows != len(vectors):
            raise UserError(f"{meta_file}: {table.num_rows} rows, {f} holds {len(vectors)} vectors (row for row)")
        counts.append(len(vectors))
        tables.append(table)
        dims.add((vectors.shape[1], str(vectors.dtype)))
    if len(dims) != 1:
        raise UserError(f"{folder / CLIP_EMB}: the vector files differ in dimension or dtype: {sorted(dims)}")
    ((dim, dtype),) = dims
    labels = _labels(np.concatenate([t.column(label_column).to_numpy(zero_copy_only=False) for t in tables]))
    ids = _clip_ids(tables, sum(counts), folder)
    order = np.argsort(ids, kind="stable")  # a set's rows are ordered by image id
    paths = (
        [p for t in tables for p in t.column("image_path").to_pylist()]
        if "image_path" in tables[0].column_names
        else []
    )
    vectors = store.PartedVectors(files, counts, dim, dtype, order)
    meta = {"source": "clip-retrieval", "embeddings": str(folder), "label_column": label_column}
    return (
        vectors,
        ids[order],
        labels[order],
        np.full(len(ids), -1, np.int64),
        [paths[i] for i in order] if paths else [],
        meta,
    )


def _labels(values: np.ndarray) -> np.ndarray:
    """Integer classes as they are; any other label (a SKU, a name) numbered in sorted order."""
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    return np.unique(values.astype(str), return_inverse=True)[1].astype(np.int64)


def _clip_ids(tables: list, n: int, folder: Path) -> np.ndarray:
    if "image_id" not in tables[0].column_names:
        return np.arange(n, dtype=np.int64)
    ids = np.concatenate([t.column("image_id").to_numpy() for t in tables])
    if not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"{folder / CLIP_META}: column 'image_id' must hold integers, got {ids.dtype}")
    return ids.astype(np.int64)


# ------------------------------------------------------------------------------------------------- export
def export_set(es, fmt: str, out: Path, rows: int = store.BLOCK_ROWS) -> Path:
    """``es`` (an :class:`EmbeddingSet`) as ``fmt`` into the folder ``out``, a block of ``rows`` rows at a time."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    return (_export_parquet if fmt == "parquet" else _export_npy)(es, out, rows)


def _export_parquet(es, out: Path, rows: int) -> Path:
    pa = require("pyarrow", "interop", "parquet export")
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("image_id", pa.int64()), ("label", pa.int64()), ("super_label", pa.int64()), ("path", pa.string())]
        + [("embedding", pa.list_(pa.float32()))]
    )
    path = out / "embeddings.parquet"
    with atomic_path(path) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        for set_rows, block in es.row_blocks(rows):
            offsets = pa.array(np.arange(0, block.size + 1, es.dim, dtype=np.int32))
            columns = [es.ids[set_rows], es.labels[set_rows], es.super_labels[set_rows]]
            names = [es.paths[i] for i in set_rows] if es.paths else [None] * len(set_rows)
            embedding = pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1), pa.float32()))
            writer.write_table(
                pa.Table.from_arrays([*map(pa.array, columns), pa.array(names, pa.string()), embedding], schema=schema)
            )
    return path


def _export_npy(es, out: Path, rows: int) -> Path:
    path = out / "embeddings.npy"
    with atomic_path(path) as tmp:
        vectors = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(es), es.dim))
        for set_rows, block in es.row_blocks(rows):
            vectors[set_rows] = block  # file-backed: written pages go to disk, not held
        vectors.flush()
        del vectors
    for name, column in (("ids", es.ids), ("labels", es.labels), ("super_labels", es.super_labels)):
        with atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(column, np.int64))
    if es.paths:
        write_atomic(out / "paths.txt", "".join(f"{p}\n" for p in es.paths))
    return path
