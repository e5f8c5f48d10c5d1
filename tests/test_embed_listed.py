"""`retrieval embed --manifest | --image-folder`: new product photos to an embeddings set without shards, through the
model loader, the decoder and the input spec that search uses; then the living catalogue end to end with the tiny
model: 300 products indexed, 100 new ones added, 50 removed, equal to a fresh build over the same rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _api_fixture import export_tiny, write_images

from retrieval.cli import main
from retrieval.data.sop import read_sop_file
from retrieval.embed.embedder import Embedder
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.index.folder import build_folder
from retrieval.model.loading import file_sha256
from retrieval.search.searcher import Searcher


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("model") / "export")


def _manifest(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group"), *rows])
    return path


def test_a_manifest_embeds_as_search_embeds(model, tmp_path):
    paths, labels = write_images(tmp_path / "photos")
    manifest = _manifest(tmp_path / "new.csv", [(f"photos/{p.name}", c, 3) for p, c in zip(paths, labels, strict=True)])
    out = tmp_path / "emb-new"
    argv = ["embed", "--model", str(model), "--manifest", str(manifest), "--out", str(out), "--batch-size", "4"]
    assert main([*argv, "--id-offset", "5000", "--class-offset", "900"]) == 0
    es = EmbeddingSet.load(out)
    assert len(es) == len(paths) and es.ids.tolist() == list(range(5001, 5001 + len(paths)))
    assert es.labels.tolist() == [c + 900 for c in labels] and set(es.super_labels.tolist()) == {3}
    assert es.paths == [str(p.resolve()) for p in paths]
    assert es.meta["model_sha256"] == file_sha256(model / "model.safetensors") and es.meta["split"] == "listed"
    assert es.meta["source"] == {"kind": "manifest", "path": str(manifest)} and es.meta["skipped"] == 0
    searched = Embedder.load(model).embed([str(p) for p in paths])  # what `retrieval search` makes of each photo
    np.testing.assert_allclose(es.embeddings, searched, atol=1e-5)


def test_an_image_folder_a_bad_image_and_a_missing_file(model, tmp_path, capsys):
    folder = tmp_path / "new"
    for c in ("chair", "lamp"):
        write_images(folder / c)
    (folder / "lamp" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "emb"
    assert main(["embed", "--model", str(model), "--image-folder", str(folder), "--out", str(out)]) == 0
    es = EmbeddingSet.load(out)
    assert sorted(set(es.labels.tolist())) == [1, 2] and len(es) == 36  # classes: the sorted subfolders
    assert es.meta["skipped"] == 1 and es.meta["skipped_paths"] == [str(folder / "lamp" / "broken.png")]
    manifest = _manifest(tmp_path / "m.csv", [("new/chair/c0_0.png", 1, 1), ("new/gone.png", 1, 1)])
    assert main(["embed", "--model", str(model), "--manifest", str(manifest), "--out", str(tmp_path / "e2")]) == 2
    assert "new/gone.png: image file not found" in capsys.readouterr().err and not (tmp_path / "e2").exists()
    argv = ["embed", "--model", str(model), "--manifest", str(manifest), "--out", str(tmp_path / "e2")]
    with pytest.raises(SystemExit):  # one source only (argparse)
        main([*argv, "--shards", str(tmp_path)])
    assert main([*argv, "--on-missing", "skip", "--id-offset", "-1"]) == 2
    assert "--id-offset" in capsys.readouterr().err


def test_living_catalogue_with_the_tiny_model(model, tmp_path):
    """Point 1's acceptance with real images and the tiny model: every search after add + remove equals a fresh
    Flat build over the same rows (ids and scores), and no removed product comes back."""
    sop = tmp_path / "sop"
    assert main(["synth-sop", str(sop), "--classes", "400", "--images-per-class", "2-3", "--size", "64"]) == 0
    records = read_sop_file(sop / "Ebay_train.txt") + read_sop_file(sop / "Ebay_test.txt")
    rows = [(r.path, r.class_id, r.super_class_id) for r in records]
    old = _manifest(sop / "old.csv", [r for r in rows if r[1] <= 300])
    new = _manifest(sop / "new.csv", [r for r in rows if r[1] > 300])
    embed = ["embed", "--model", str(model), "--batch-size", "128"]
    assert main([*embed, "--manifest", str(old), "--out", str(tmp_path / "emb-old")]) == 0
    assert main([*embed, "--manifest", str(new), "--out", str(tmp_path / "emb-new"), "--id-offset", "100000"]) == 0
    index = tmp_path / "index"
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb-old"), "--out", str(index)]) == 0
    assert main(["index", "add", "--index", str(index), "--embeddings", str(tmp_path / "emb-new")]) == 0
    gone = np.random.default_rng(0).choice(np.arange(1, 401), 50, replace=False)
    (tmp_path / "gone.txt").write_text("\n".join(map(str, gone)))
    assert main(["index", "remove", "--index", str(index), "--classes", str(tmp_path / "gone.txt")]) == 0
    both = EmbeddingSet.merge([EmbeddingSet.load(tmp_path / e) for e in ("emb-old", "emb-new")])
    keep = ~np.isin(both.labels, gone)
    remain = EmbeddingSet(both.embeddings[keep], both.ids[keep], both.labels[keep], both.super_labels[keep],
                          [p for p, k in zip(both.paths, keep, strict=True) if k], {"model": str(model)})  # fmt: skip
    remain.save(tmp_path / "emb-remain")
    build_folder(tmp_path / "emb-remain", tmp_path / "fresh")
    searcher, fresh = Searcher(index), Searcher(tmp_path / "fresh", model_path=str(model), force=True)
    photos = [str(sop / r.path) for r in records[::5]]  # old, new and removed products' photos as queries
    vectors = searcher.embed(photos)
    a, b = searcher.index.search(vectors, 20), fresh.index.search(vectors, 20)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    hits = searcher.search_vectors(vectors, photos, 20)
    assert not {h["class_id"] for q in hits for h in q["results"]} & set(gone.tolist())
    info = json.loads((index / "index.json").read_text())
    assert [v["change"] for v in info["versions"]] == ["build", "add", "remove"] and info["count"] == keep.sum()
