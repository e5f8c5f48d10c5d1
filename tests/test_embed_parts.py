"""The parted embeddings layout without a model: writers of several ranks, the manifest, memory-mapped reading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError


def _write_parts(folder, n=500, d=8, world=2, rows_per_part=37, dtype="float32"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = rng.permutation(np.arange(100, 100 + 2 * n, 2))
    labels = ids % 7
    for rank in range(world):  # each rank gets every world-th row, in batches of 13 (unsorted ids)
        mine = np.arange(rank, n, world)
        w = EmbeddingSet.writer(folder, rank, rows_per_part, dtype)
        for b in range(0, len(mine), 13):
            r = mine[b : b + 13]
            cols = {"ids": ids[r], "labels": labels[r], "super_labels": labels[r] // 2}
            w.add(x[r], cols, [f"p{i}" for i in ids[r]])
        w.close({"skipped": rank, "seconds": 1.0 + rank})
    summary = EmbeddingSet.finish_parts(folder, world, d, dtype)
    EmbeddingSet.write_meta(folder, {"model": "m"}, summary["count"], d, dtype)
    return x, ids, labels, summary


def test_parts_read_back_sorted_by_id(tmp_path):
    x, ids, labels, summary = _write_parts(tmp_path)
    assert summary == {"count": 500, "skipped": 1, "seconds": 2.0}
    es = EmbeddingSet.load(tmp_path)
    order = np.argsort(ids)
    assert np.array_equal(es.ids, ids[order]) and np.array_equal(es.labels, labels[order])
    assert es.paths == [f"p{i}" for i in ids[order]] and es.dim == 8 and len(es) == 500
    np.testing.assert_array_equal(es.vectors32(), x[order])
    np.testing.assert_array_equal(es.embeddings[[3, 499, 0]], x[order][[3, 499, 0]])
    np.testing.assert_array_equal(es.embeddings[10:20], x[order][10:20])
    np.testing.assert_array_equal(es.embeddings[7], x[order][7])
    seen = np.concatenate([b_ids for b_ids, _ in es.blocks(rows=50)])
    assert sorted(seen.tolist()) == sorted(ids.tolist())
    for b_ids, block in es.blocks(rows=50):
        rows = np.searchsorted(es.ids, b_ids)
        np.testing.assert_array_equal(block, x[order][rows])
    merged = EmbeddingSet.load(es.save(tmp_path / "merged"))
    np.testing.assert_array_equal(merged.embeddings, es.vectors32())


def test_rerun_with_fewer_ranks_leaves_one_set(tmp_path):
    _write_parts(tmp_path, world=3)
    x, ids, _, _ = _write_parts(tmp_path, n=100, world=1)
    es = EmbeddingSet.load(tmp_path)
    assert len(es) == 100 and not any(p.name.startswith("r00002") for p in (tmp_path / "parts").iterdir())
    np.testing.assert_array_equal(es.vectors32(), x[np.argsort(ids)])


@pytest.mark.parametrize(
    "breakage,message",
    [
        (lambda d: json.loads((d / "parts.json").read_text()), None),
        (lambda d: __import__("shutil").rmtree(d / "parts" / "r00001-p00000"), "r00001-p00000/meta.json: not found"),
        (lambda d: np.save(d / "parts" / "r00000-p00001" / "ids.npy", np.arange(3)), "expected 3 integers"),
        (lambda d: (d / "meta.json").unlink(), "meta.json: not found"),
    ],
)
def test_incomplete_parts_are_refused(tmp_path, breakage, message):
    _write_parts(tmp_path)
    breakage(tmp_path)
    if message is None:
        assert len(EmbeddingSet.load(tmp_path)) == 500
        return
    with pytest.raises(UserError, match=message):
        EmbeddingSet.load(tmp_path)
