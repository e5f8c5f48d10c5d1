"""The Python API: `from retrieval import Embedder, Index, Searcher` (lazy), the README's block runs, embeddings
agree across paths / PIL images / tensors and with the in-process Searcher, clear errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _api_fixture import World, make_world
from PIL import Image

from retrieval.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("api") / "runs" / "tiny")


def test_import_retrieval_stays_light() -> None:
    code = "import sys, retrieval; assert retrieval.__version__; print(sorted(m for m in ('torch', 'timm', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
    import retrieval
    from retrieval.index.folder import IndexFolder

    assert retrieval.Index is IndexFolder and {"Embedder", "Index", "Searcher"} <= set(dir(retrieval))
    with pytest.raises(AttributeError):
        retrieval.Nope  # noqa: B018


def _readme_block() -> str:
    blocks = re.findall(r"<!-- python-api -->\s*```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, "README.md needs exactly one block marked <!-- python-api -->"
    return blocks[0]


def test_readme_python_block_runs(world: World, tmp_path: Path, capsys, monkeypatch) -> None:
    block = _readme_block()
    assert 8 <= len([line for line in block.splitlines() if line.strip()]) <= 14  # "about ten lines"
    work = world.model.parents[1]  # the folder holding runs/tiny
    shutil.copy(world.images[4], work / "query.jpg")
    monkeypatch.chdir(work)
    scope: dict = {}
    exec(compile(block, "README.md:python-api", "exec"), scope)
    vectors, ids, scores = scope["vectors"], scope["ids"], scope["scores"]
    assert vectors.shape == (1, 64) and vectors.dtype == np.float32
    assert ids[0, 0] == 50 and scores[0, 0] == pytest.approx(1.0, abs=1e-4)  # the image finds itself
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("1 50 101 ")


def test_images_as_paths_pil_and_tensors_agree(world: World) -> None:
    from retrieval import Embedder

    embedder = Embedder.load(world.model, batch_size=4)
    by_path = embedder.embed(world.images)  # 18 images in batches of 4 (the last one short)
    pil = [Image.open(p) for p in world.images[:3]]
    tensors = torch.stack([embedder.prepare(p) for p in world.images[:3]])
    np.testing.assert_allclose(embedder.embed(pil), by_path[:3], atol=1e-5)
    np.testing.assert_allclose(embedder.embed(tensors), by_path[:3], atol=1e-5)
    np.testing.assert_allclose(embedder.embed(str(world.images[0])), by_path[:1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(by_path, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 64)


def test_searcher_names_ids_classes_paths(world: World) -> None:
    from retrieval import Searcher

    searcher = Searcher(world.index, batch_size=5)
    results = searcher.search([world.images[7], Image.open(world.images[7])], k=3)
    assert results[0]["query"] == str(world.images[7]) and results[1]["query"].startswith("<")
    for res in results:
        top = res["results"][0]
        assert top["image_id"] == 80 and top["class_id"] == world.labels[7] and top["path"] == str(world.images[7])
        assert top["super_class_id"] == world.labels[7] - 100 and len(res["results"]) == 3


def test_clear_errors(world: World, tmp_path: Path) -> None:
    from retrieval import Embedder, Searcher

    embedder = Embedder.load(world.model)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.jpg: cannot read the image"):
        embedder.embed([bad])
    with pytest.raises(UserError, match=r"expected a prepared input of shape \(3, 64, 64\)"):
        embedder.embed(torch.zeros(2, 3, 32, 32))
    with pytest.raises(UserError, match="expected a path, a PIL image or a tensor"):
        embedder.embed([1.5])
    with pytest.raises(UserError, match="k: expected a positive integer"):
        Searcher(world.index).search([world.images[0]], k=0)
    with pytest.raises(UserError, match="does not exist"):
        Embedder.load(os.fspath(tmp_path / "nope"))
