"""`retrieval index add` / `index remove`: a new version of the folder per update, equal to a fresh build over the
same rows (Flat: ids and scores exactly; IVF, HNSW: the recall a fresh build has), removed ids never returned."""

from __future__ import annotations

import json

import numpy as np
import pytest

# the trainer and the service import pytorch-metric-learning, which swaps faiss.Index.search for a torch-aware one
# without `params` (the removed-row filter): every test here runs with that swap in place, as they would
import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401

from retrieval import knn
from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.index.folder import IndexFolder

D = 32
META = {"model": "runs/x", "model_sha256": "a" * 64}


def _products(first: int, count: int, seed: int, per: int = 4) -> EmbeddingSet:
    """``count`` products (classes ``first``..) of ``per`` images each; image ids 10 x class + image."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(first, first + count), per)
    centres = rng.standard_normal((count, D))
    x = centres[labels - first] + 0.6 * rng.standard_normal((len(labels), D))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = labels * 10 + np.tile(np.arange(per), count)
    return EmbeddingSet(x, ids.astype(np.int64), labels, labels % 7, [f"p{i}.jpg" for i in ids], dict(META))


def _save(es: EmbeddingSet, folder) -> str:
    es.save(folder)
    return str(folder)


def _subset(es: EmbeddingSet, keep: np.ndarray) -> EmbeddingSet:
    return EmbeddingSet(es.embeddings[keep], es.ids[keep], es.labels[keep], es.super_labels[keep],
                        [p for p, k in zip(es.paths, keep, strict=True) if k], dict(es.meta))  # fmt: skip


def _merge(a: EmbeddingSet, b: EmbeddingSet) -> EmbeddingSet:
    both = EmbeddingSet.merge([a, b])
    both.meta = dict(META)
    return both


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """300 products built, 100 new ones to add, 50 of the 400 to remove; the rows that remain, as one set."""
    root = tmp_path_factory.mktemp("living")
    old, new = _products(1, 300, seed=0), _products(301, 100, seed=1)
    gone = np.random.default_rng(2).choice(np.arange(1, 401), 50, replace=False)
    (root / "gone.txt").write_text("\n".join(map(str, gone)) + "\n")
    both = _merge(old, new)
    remain = _subset(both, ~np.isin(both.labels, gone))
    queries = _products(1, 400, seed=3, per=1).embeddings  # new photos of every product, removed ones included
    return {"root": root, "old": _save(old, root / "emb-old"), "new": _save(new, root / "emb-new"),
            "remain": _save(remain, root / "emb-remain"), "gone": gone, "queries": queries}  # fmt: skip


def _updated(c: dict, factory: str, out) -> IndexFolder:
    assert main(["index", "build", "--embeddings", c["old"], "--out", str(out), "--factory", factory]) == 0
    assert main(["index", "add", "--index", str(out), "--embeddings", c["new"]]) == 0
    assert main(["index", "remove", "--index", str(out), "--classes", str(c["root"] / "gone.txt")]) == 0
    return IndexFolder.load(out)


def _recall(found: np.ndarray, es: EmbeddingSet, q: np.ndarray, k: int = 10) -> float:
    _, rows = knn.search(q, es.vectors32(), k, backend="faiss")
    truth = es.ids[rows]
    return float((found[:, :k, None] == truth[:, None, :]).any(2).mean())


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16"])
def test_add_then_remove_equals_a_fresh_build_and_never_returns_a_removed_id(catalogue, tmp_path, factory):
    c = catalogue
    updated = _updated(c, factory, tmp_path / "index")
    assert main(["index", "build", "--embeddings", c["remain"], "--out", str(tmp_path / "fresh"),
                 "--factory", factory]) == 0  # fmt: skip
    fresh = IndexFolder.load(tmp_path / "fresh")
    remain = EmbeddingSet.load(c["remain"])
    assert updated.info["count"] == fresh.info["count"] == len(remain) == 4 * 350
    np.testing.assert_array_equal(updated.catalogue.ids, fresh.catalogue.ids)  # the same rows, ordered by id
    np.testing.assert_array_equal(updated.catalogue.labels, fresh.catalogue.labels)
    assert updated.catalogue.paths == fresh.catalogue.paths
    k = 50  # deep enough to reach many removed products' rows, were they returned
    scores, ids = updated.search(c["queries"], k)
    fresh_scores, fresh_ids = fresh.search(c["queries"], k)
    removed = np.asarray(c["gone"]) * 10
    assert not np.isin(ids // 10 * 10, removed).any() and (ids >= 0).all()
    if factory == "Flat":
        np.testing.assert_array_equal(ids, fresh_ids)
        np.testing.assert_array_equal(scores, fresh_scores)
    else:  # the updated index answers with the recall a fresh build of the same factory has (new queries)
        assert _recall(ids, remain, c["queries"]) >= _recall(fresh_ids, remain, c["queries"]) - 0.02
    history = updated.info["versions"]
    assert [v["change"] for v in history] == ["build", "add", "remove"] and updated.info["version"] == 3
    assert [v["count"] for v in history] == [1200, 1600, 1400]
    assert history[1]["added"] == 400 and history[2]["removed"] == 200 and history[2]["not_found"] == 0
    assert updated.info["tombstones"] == (0 if factory == "Flat" else 200)  # IVF, HNSW: filtered at search time
    assert updated.info.get("added_after_training", 0) == (400 if factory.startswith("IVF") else 0)


def test_replace_gives_held_ids_their_new_vectors(catalogue, tmp_path):
    """HNSW too: the old row of a replaced id stays in the graph as a tombstone and is never returned."""
    c = catalogue
    for factory in ("Flat", "HNSW16"):
        out = tmp_path / factory
        assert main(["index", "build", "--embeddings", c["old"], "--out", str(out), "--factory", factory]) == 0
        old = EmbeddingSet.load(c["old"])
        moved = _subset(old, np.isin(old.labels, [5, 6]))
        moved.embeddings = -moved.embeddings  # the products' photos re-shot: new vectors under the same ids
        _save(moved, tmp_path / f"emb-moved-{factory}")
        argv = ["index", "add", "--index", str(out), "--embeddings", str(tmp_path / f"emb-moved-{factory}")]
        assert main(argv) == 2  # held ids without --replace
        assert main([*argv, "--replace"]) == 0
        index = IndexFolder.load(out)
        assert index.info["count"] == 1200 and index.info["versions"][-1]["replaced"] == 8
        scores, ids = index.search(moved.embeddings, 1)
        np.testing.assert_array_equal(ids[:, 0], moved.ids)  # the new vectors answer for their ids
        _, ids = index.search(old.embeddings[np.isin(old.labels, [5, 6])], 1200)
        for row in ids:  # never one id twice in an answer (its old row and its new one)
            assert len(np.unique(row[row >= 0])) == (row >= 0).sum() > 500


def test_bad_updates_are_one_line_before_any_change(catalogue, tmp_path, capsys):
    c = catalogue
    out = tmp_path / "index"
    assert main(["index", "build", "--embeddings", c["old"], "--out", str(out)]) == 0
    before = (out / "index.json").read_text()
    other = EmbeddingSet.load(c["new"])
    other.meta = {"model": "runs/other", "model_sha256": "b" * 64}
    _save(other, tmp_path / "emb-other")
    assert main(["index", "add", "--index", str(out), "--embeddings", str(tmp_path / "emb-other")]) == 2
    assert "not comparable" in capsys.readouterr().err
    assert main(["index", "add", "--index", str(out), "--embeddings", c["old"]]) == 2
    err = capsys.readouterr().err
    assert "1200 of its 1200 image ids are already in the index" in err and "--id-offset 3003" in err
    (tmp_path / "bad.txt").write_text("12\nseven\n")
    assert main(["index", "remove", "--index", str(out), "--ids", str(tmp_path / "bad.txt")]) == 2
    assert f"{tmp_path / 'bad.txt'}:2: expected one integer id, got 'seven'" in capsys.readouterr().err
    (tmp_path / "none.txt").write_text("99999\n")
    assert main(["index", "remove", "--index", str(out), "--ids", str(tmp_path / "none.txt")]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["index", "add", "--index", str(tmp_path / "nope"), "--embeddings", c["new"]]) == 2
    assert "not an index folder" in capsys.readouterr().err
    assert (out / "index.json").read_text() == before  # nothing was written
    assert sorted(p.name for p in tmp_path.glob(".index.*")) == [".index.lock"]


def test_a_rebuild_is_advised_past_the_share_and_continues_the_numbering(catalogue, tmp_path):
    c = catalogue
    out = tmp_path / "index"
    assert main(["index", "build", "--embeddings", c["new"], "--out", str(out), "--factory", "IVF8,Flat"]) == 0
    assert main(["index", "add", "--index", str(out), "--embeddings", c["old"]]) == 0  # 1200 rows onto 400
    info = json.loads((out / "index.json").read_text())
    assert info["added_after_training"] == 1200
    assert "added after the quantizer was trained" in info["rebuild_advised"]
    assert main(["index", "build", "--embeddings", c["remain"], "--out", str(out), "--factory", "IVF8,Flat"]) == 0
    info = json.loads((out / "index.json").read_text())
    assert info["version"] == 3 and info["versions"][-1]["change"] == "build" and not info.get("rebuild_advised")
    assert "added_after_training" not in info
