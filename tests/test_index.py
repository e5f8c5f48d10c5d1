"""Index build -> save -> load -> search round trips (Flat, IVF, IVF-PQ, HNSW) with image ids preserved."""

import json

import numpy as np
import pytest

from retrieval import knn
from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.index import folder as rindex


def _catalogue(folder, n: int = 2000, d: int = 32, classes: int = 100, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, d))
    x = (centres[labels] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.permutation(np.arange(10_000, 10_000 + 3 * n, 3))  # not row numbers, not sorted
    paths = [f"img/{i}.jpg" for i in range(n)]
    meta = {"model": "runs/x/model.safetensors"}
    EmbeddingSet(x, ids, labels, labels // 10, paths, meta).save(folder)
    return x, labels, ids


@pytest.mark.parametrize(
    "factory,min_recall",
    [("Flat", 1.0), ("IVF16,Flat", 0.99), ("IVF16,PQ8x4", 0.3), ("HNSW16", 0.9)],
)
def test_round_trip(tmp_path, factory, min_recall):
    x, labels, ids = _catalogue(tmp_path / "emb")
    out = tmp_path / "index"
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(out), "--factory", factory]) == 0
    info = json.loads((out / "index.json").read_text())
    assert info["dim"] == 32 and info["count"] == 2000 and info["metric"] == "inner_product"
    assert info["factory"] == factory and info["model"] == "runs/x/model.safetensors"
    assert {"index.faiss", "ids.npy", "labels.npy", "paths.json"} <= {p.name for p in out.iterdir()}

    q = x[:200]
    loaded = rindex.IndexFolder.load(out)
    scores, got = loaded.search(q, k=10)
    _, exact_rows = knn.search(q, x, 10, backend="faiss")
    exact = ids[exact_rows]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)])
    assert recall >= min_recall, recall
    assert set(np.unique(got)) <= set(ids.tolist())  # image ids, never row numbers
    if factory == "Flat":
        np.testing.assert_array_equal(got[:, 0], ids[:200])  # each vector finds itself first
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    rows = loaded.rows(got)
    assert np.array_equal(loaded.catalogue.ids[rows], got)  # every hit names its catalogue row
    row = int(np.flatnonzero(ids == got[0, 0])[0])
    assert rows[0, 0] == row and loaded.catalogue.paths[row] == f"img/{row}.jpg"
    assert loaded.catalogue.labels[row] == labels[row]
    assert loaded.rows(np.array([-1, 7]))[0] == -1 and loaded.rows(np.array([7]))[0] == -1  # unknown ids


def test_bad_factory_and_missing_folder(tmp_path, capsys):
    _catalogue(tmp_path / "emb", n=50)
    argv = ["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "i")]
    assert main(argv + ["--factory", "NotAnIndex"]) == 2
    assert "--factory 'NotAnIndex'" in capsys.readouterr().err
    assert main(argv + ["--factory", "IVF1024,Flat"]) == 2  # 50 training vectors for 1024 lists
    assert "training on 50 vectors failed" in capsys.readouterr().err
    assert main(["index", "build", "--embeddings", str(tmp_path / "nope"), "--out", str(tmp_path / "i")]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(rindex.UserError, match="index.json not found"):
        rindex.IndexFolder.load(tmp_path / "emb")


def test_gpu_flag_on_cpu_faiss(tmp_path, caplog):
    """faiss-cpu: --gpu all falls back to CPU and says so."""
    if knn.faiss_has_gpu():
        pytest.skip("this Faiss has GPU support")
    assert rindex.parse_gpus("none") == []
    assert rindex.parse_gpus("0,1") == []
    assert "no GPU support" in caplog.text
    with pytest.raises(rindex.UserError, match="--gpu"):
        rindex.parse_gpus("zero")
