"""`retrieval search`: a catalogue image finds itself first; results carry ids, classes, paths; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, embed_args

from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def index_dir(synth_shards, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("search")
    emb, index = work / "emb", work / "index"
    assert main(embed_args(TINY, synth_shards, emb, "--num-workers", "0", untrained=True)) == 0
    assert main(["index", "build", "--embeddings", str(emb), "--out", str(index)]) == 0
    return index


def _sop_root(shards: Path) -> Path:
    return shards.parent / "sop"


def test_catalogue_image_finds_itself_first(index_dir, synth_shards, capsys):
    cat = EmbeddingSet.load(index_dir, vectors=False)
    ids, paths, labels = cat.ids, cat.paths, cat.labels
    row = 7
    query = _sop_root(synth_shards) / paths[row]
    assert main(["search", "--index", str(index_dir), "--image", str(query), "--k", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    top = out["results"][0]
    assert top["image_id"] == int(ids[row]) and top["path"] == paths[row] and top["class_id"] == int(labels[row])
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    scores = [h["score"] for h in out["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)


def test_table_output_and_bad_image(index_dir, synth_shards, tmp_path, capsys):
    paths = json.loads((index_dir / "paths.json").read_text())
    assert main(["search", "--index", str(index_dir), "--image", str(_sop_root(synth_shards) / paths[0])]) == 0
    assert "rank" in capsys.readouterr().out
    first = str(_sop_root(synth_shards) / paths[0])
    assert (
        main(["search", "--index", str(index_dir), "--image", first, "--nprobe", "8", "--ef", "64"]) == 0
    )  # no-op on Flat
    assert main(["search", "--index", str(index_dir), "--image", first, "--nprobe", "0"]) == 2
    assert "--nprobe: expected a positive integer" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    assert main(["search", "--index", str(index_dir), "--image", str(bad)]) == 2
    assert "cannot read the image" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path), "--image", str(bad)]) == 2
    assert "retrieval index build" in capsys.readouterr().err
    listed = tmp_path / "queries.txt"
    listed.write_text("image_id class_id super_class_id path\n1 5 1 missing.jpg\n")
    assert main(["search", "--index", str(index_dir), "--queries", str(listed)]) == 2
    assert "missing.jpg: cannot read the image" in capsys.readouterr().err
    listed.write_text("id class path\n")
    assert main(["search", "--index", str(index_dir), "--queries", str(listed)]) == 2
    assert "queries.txt:1: expected the header" in capsys.readouterr().err


def test_search_queries_shows_progress_and_saves_its_summary_for_the_report(index_dir, synth_shards, capsys):
    """Today `search --queries` (199 s for 11k queries) prints nothing while it works, and leaves no summary the
    report could show."""
    queries = _sop_root(synth_shards) / "Ebay_test.txt"
    n = len(queries.read_text().splitlines()) - 1
    assert main(["search", "--index", str(index_dir), "--queries", str(queries), "--k", "5"]) == 0
    captured = capsys.readouterr()
    assert "embed queries" in captured.err and f"{n}/{n}" in captured.err
    saved = json.loads((index_dir / "search-queries.json").read_text())["summary"]
    assert saved["queries"] == n and saved["k"] == 5 and f"{n} queries: the top hit" in captured.out
