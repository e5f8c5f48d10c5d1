"""Embeddings in and out: a plain .npy + labels and clip-retrieval's layout evaluate to the metrics of our own folder
of the same vectors and index to the same answers; parquet and .npy exports round-trip through pyarrow / numpy,
streamed block by block (a parted set is never materialised); what is missing is named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_embed_parts import _write_parts

from retrieval.cli import main
from retrieval.embed import _store
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.embed.interop import Columns, export_set
from retrieval.index.folder import IndexFolder

METRICS = ("recall@1", "recall@10", "recall@100", "map@r", "r_precision", "num_queries", "num_excluded")


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    """300 unit vectors in 40 classes, clustered so the metrics are far from chance and from 1."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 40, 300)
    x = rng.standard_normal((40, 32))[labels] + 0.9 * rng.standard_normal((300, 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels.astype(np.int64)


def _ours(folder: Path, x: np.ndarray, labels: np.ndarray) -> Path:
    n = len(x)
    EmbeddingSet(x, np.arange(n), labels, labels // 10, [f"img/{i}.jpg" for i in range(n)]).save(folder)
    return folder


def _clip(folder: Path, x: np.ndarray, labels: np.ndarray, parts=(0, 120, 300)) -> Path:
    """clip-retrieval's output: img_emb/img_emb_N.npy + metadata/metadata_N.parquet, row for row; string classes."""
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for n, (a, b) in enumerate(zip(parts[:-1], parts[1:], strict=True)):
        np.save(folder / "img_emb" / f"img_emb_{n}.npy", x[a:b])
        table = pa.table(
            {"image_path": [f"img/{i}.jpg" for i in range(a, b)], "product": [f"sku-{c}" for c in labels[a:b]]}
        )
        pq.write_table(table, folder / "metadata" / f"metadata_{n}.parquet")
    return folder


def _eval(tmp_path: Path, name: str, *argv: str) -> dict:
    out = tmp_path / f"eval-{name}"
    assert main(["eval", *argv, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: metrics[k] for k in METRICS}


def test_npy_and_clip_retrieval_evaluate_as_our_folder(vectors, tmp_path: Path) -> None:
    x, labels = vectors
    ours = _eval(tmp_path, "ours", "--embeddings", str(_ours(tmp_path / "ours", x, labels)))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "labels.npy", labels)
    plain = _eval(tmp_path, "npy", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "labels.npy"))
    clip = _eval(
        tmp_path, "clip", "--embeddings", str(_clip(tmp_path / "clip", x, labels)), "--label-column", "product"
    )
    assert plain == ours and clip == ours
    assert 0.2 < ours["recall@1"] < 0.99  # a real ranking, not a degenerate one


def test_npy_and_clip_retrieval_index_as_our_folder(vectors, tmp_path: Path) -> None:
    x, labels = vectors
    ids = np.arange(1000, 1300, dtype=np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "ids.npy", ids)
    npy = [
        "--embeddings",
        str(tmp_path / "x.npy"),
        "--labels",
        str(tmp_path / "labels.npy"),
        "--ids",
        str(tmp_path / "ids.npy"),
    ]
    clip = ["--embeddings", str(_clip(tmp_path / "clip", x, labels)), "--label-column", "product"]
    answers = {}
    for name, argv in (("npy", npy), ("clip", clip)):
        assert main(["index", "build", *argv, "--out", str(tmp_path / f"index-{name}")]) == 0
        answers[name] = IndexFolder.load(tmp_path / f"index-{name}").search(x[:20], k=5)[1]
    exact = np.argsort(-(x[:20] @ x.T), axis=1)[:, :5]
    np.testing.assert_array_equal(answers["clip"], exact)  # clip-retrieval: ids are the row numbers
    np.testing.assert_array_equal(answers["npy"], ids[exact])  # --ids: the given ids
    assert IndexFolder.load(tmp_path / "index-clip").catalogue.paths[7] == "img/7.jpg"


def test_missing_pieces_are_named(vectors, tmp_path: Path, capsys) -> None:
    x, labels = vectors
    np.save(tmp_path / "x.npy", x)
    assert main(["eval", "--embeddings", str(tmp_path / "x.npy")]) == 2
    assert "needs --labels" in capsys.readouterr().err
    clip = _clip(tmp_path / "clip", x, labels)
    assert main(["eval", "--embeddings", str(clip)]) == 2  # the default column `label` is not there
    err = capsys.readouterr().err
    assert "no column 'label'" in err and "--label-column" in err
    (clip / "metadata" / "metadata_1.parquet").unlink()
    assert (
        main(["index", "build", "--embeddings", str(clip), "--label-column", "product", "--out", str(tmp_path / "i")])
        == 2
    )
    assert "metadata_1.parquet: missing" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    assert main(["eval", "--embeddings", str(tmp_path / "other")]) == 2
    assert "not an embeddings set" in capsys.readouterr().err


def test_parquet_export_round_trips_streamed(tmp_path: Path, monkeypatch) -> None:
    """A parted set (two ranks' parts) goes out as row groups of a block each: pyarrow reads the same ids, classes,
    paths and vectors; the set is never materialised (PartedVectors' whole-set copies fail here)."""
    x, ids, labels, _ = _write_parts(tmp_path / "emb", n=200, rows_per_part=37)
    es = EmbeddingSet.load(tmp_path / "emb")
    monkeypatch.setattr(_store.PartedVectors, "materialize", lambda *a, **k: pytest.fail("materialised the set"))
    path = export_set(es, "parquet", tmp_path / "pq", rows=16)
    table = pq.read_table(path)
    assert table.column_names == ["image_id", "label", "super_label", "path", "embedding"]
    assert pq.ParquetFile(path).metadata.num_row_groups > 5
    got_ids = table.column("image_id").to_numpy()
    by_id = {int(i): row for row, i in enumerate(ids)}
    rows = np.array([by_id[int(i)] for i in got_ids])
    assert sorted(got_ids.tolist()) == sorted(ids.tolist())
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels[rows])
    np.testing.assert_array_equal(table.column("super_label").to_numpy(), labels[rows] // 2)
    assert table.column("path").to_pylist() == [f"p{i}" for i in got_ids]
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), x[rows])


def test_npy_export_round_trips_through_eval(vectors, tmp_path: Path) -> None:
    x, labels = vectors
    ours = _ours(tmp_path / "ours", x, labels)
    assert main(["embeddings", "export", str(ours), "--format", "npy", "--out", str(tmp_path / "npy")]) == 0
    out = tmp_path / "npy"
    back = EmbeddingSet.open(out / "embeddings.npy", Columns(str(out / "labels.npy"), str(out / "ids.npy")))
    np.testing.assert_array_equal(back.vectors32(), x)
    np.testing.assert_array_equal(back.labels, labels)
    assert back.paths == [f"img/{i}.jpg" for i in range(len(x))]
    assert main(["embeddings", "export", str(ours), "--format", "parquet", "--out", str(tmp_path / "pq")]) == 0
    assert pq.read_table(tmp_path / "pq" / "embeddings.parquet").num_rows == len(x)
