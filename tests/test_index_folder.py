"""The index folder as one unit (issue 29 point 5, issue 30 point 10): written by one build at a time into a new
folder switched in with one rename, and refused on load when its parts disagree, with one line naming the file."""

import json
import os
import stat

import faiss
import numpy as np
import pytest

from retrieval import util
from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.index.folder import IndexFolder
from retrieval.search.searcher import Searcher


def _set(folder, n=300, d=16, seed=0, sha="a" * 64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 30, n)
    meta = {"model": "m.safetensors", "model_sha256": sha}
    EmbeddingSet(x, np.arange(n) * 7, labels, labels // 3, [f"{i}.jpg" for i in range(n)], meta).save(folder)
    return x


def _build(emb, out, *extra):
    return main(["index", "build", "--embeddings", str(emb), "--out", str(out), "--gpu", "none", *extra])


@pytest.fixture
def built(tmp_path):
    _set(tmp_path / "emb")
    assert _build(tmp_path / "emb", tmp_path / "index") == 0
    return tmp_path / "index"


def _refused(folder) -> str:
    with pytest.raises(UserError) as e:
        IndexFolder.load(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_truncated_index_faiss_is_one_clear_line(built):
    data = (built / "index.faiss").read_bytes()
    (built / "index.faiss").write_bytes(data[: len(data) // 2])  # today: faiss' RuntimeError traceback
    msg = _refused(built)
    assert str(built / "index.faiss") in msg and "truncated" in msg


def test_an_index_json_whose_dim_differs_blames_index_json(built):
    info = json.loads((built / "index.json").read_text())
    (built / "index.json").write_text(json.dumps({**info, "dim": 32}))
    msg = _refused(built)
    assert msg.startswith(f"{built / 'index.json'}: dim 32") and "dimension 16" in msg
    (built / "index.json").write_text("{not json")
    assert str(built / "index.json") in _refused(built)


def test_new_vectors_beside_an_old_index_json_are_refused(tmp_path, built):
    """The kill window of the old writer: index.faiss of a new build, index.json and columns of the old one."""
    _set(tmp_path / "emb2", n=400, sha="b" * 64)
    assert _build(tmp_path / "emb2", tmp_path / "index2") == 0
    os.replace(tmp_path / "index2" / "index.faiss", built / "index.faiss")
    assert "count 300, but index.faiss holds 400" in _refused(built)


def test_a_catalogue_with_fewer_rows_than_the_index_is_refused(tmp_path, built):
    """Today such a folder answers with class None and path None."""
    es = EmbeddingSet.load(built, vectors=False)
    short = EmbeddingSet(
        np.zeros((250, 0), np.float32), es.ids[:250], es.labels[:250], es.super_labels[:250], es.paths[:250], es.meta
    )
    short.save(built, vectors=False)
    assert "hold 250 rows, index.faiss 300" in _refused(built)


def test_columns_of_another_build_are_refused(tmp_path, built):
    _set(tmp_path / "emb2", seed=1, sha="b" * 64)  # same count and dim, other model
    assert _build(tmp_path / "emb2", tmp_path / "index2") == 0
    for name in ("ids.npy", "labels.npy", "super_labels.npy", "paths.json", "meta.json"):
        os.replace(tmp_path / "index2" / name, built / name)
    assert "build_id" in _refused(built)


def test_a_rebuild_replaces_the_folder_whole_and_cleans_what_killed_builds_left(tmp_path, built):
    (built / ".index.faiss.dead.tmp").write_bytes(b"x")  # what a killed build of the old writer left inside
    (built / ".auto-best.faiss").write_bytes(b"x")
    (tmp_path / ".index.stage-dead").mkdir()  # and what a killed build of this one leaves beside
    before = json.loads((built / "index.json").read_text())["build_id"]
    assert _build(tmp_path / "emb", built) == 0
    assert json.loads((built / "index.json").read_text())["build_id"] != before
    assert not list(built.glob(".*")) and not list(tmp_path.glob(".index.stage-*"))
    assert IndexFolder.load(built).index.ntotal == 300


def test_a_second_build_into_the_same_folder_is_refused_before_any_work(tmp_path, built, capsys):
    fd = util.lock(util.folder_lock_path(built))  # another build holds it
    try:
        assert _build(tmp_path / "emb", built, "--factory", "auto") == 2
    finally:
        util.unlock(fd)
    assert f"{built} is being written by another `retrieval index build` (pid {os.getpid()})" in capsys.readouterr().err
    assert IndexFolder.load(built).index.ntotal == 300


def test_an_index_build_never_replaces_what_is_no_index_folder(tmp_path, capsys):
    _set(tmp_path / "emb")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train: {}\n")
    assert _build(tmp_path / "emb", tmp_path / "run") == 2
    assert "not an index folder" in capsys.readouterr().err
    assert _build(tmp_path / "emb", tmp_path / "emb" / "index") == 2
    assert "outside --embeddings" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").is_file() and EmbeddingSet.load(tmp_path / "emb")


def test_index_folder_files_follow_the_umask(tmp_path):
    _set(tmp_path / "emb")
    old = os.umask(0o002)  # a team's group-writable setting
    try:
        assert _build(tmp_path / "emb", tmp_path / "index") == 0
    finally:
        os.umask(old)
    out = tmp_path / "index"
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o664}


def test_search_refuses_a_mixed_folder_the_old_writer_could_leave(tmp_path, built):
    """The Searcher loads through the same checks (search and serve)."""
    index = faiss.read_index(str(built / "index.faiss"))
    index.remove_ids(np.arange(0, 70, 7, dtype=np.int64))
    faiss.write_index(index, str(built / "index.faiss"))
    with pytest.raises(UserError, match="count 300, but index.faiss holds 290"):
        Searcher(built)
