"""`retrieval serve` swaps index versions live (issue 25's acceptance): 8 concurrent clients query a real service
while the index is updated twice (`index add`, `index remove`); zero failed requests, every answer is exactly one
version's rows and names it, /healthz shows the new version afterwards; a version of another model is refused."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from _api_fixture import export_tiny, write_images
from _launch import serving

from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.index.folder import IndexFolder

K = 100  # more than any version's rows: a Flat answer holds every row of its version


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("live")
    model = export_tiny(root / "model")
    for name in ("old", "new"):
        for group in ("a", "b"):
            write_images(root / name / f"{name}-{group}")
    embed = ["embed", "--model", str(model), "--image-folder"]
    assert main([*embed, str(root / "old"), "--out", str(root / "emb-old")]) == 0
    assert main([*embed, str(root / "new"), "--out", str(root / "emb-new"), "--id-offset", "1000", "--class-offset", "10"]) == 0  # fmt: skip
    assert main(["index", "build", "--embeddings", str(root / "emb-old"), "--out", str(root / "index")]) == 0
    (root / "gone.txt").write_text("1\n11\n")  # one old product, one new one
    other = export_tiny(root / "other", seed=1)
    assert main(["embed", "--model", str(other), "--image-folder", str(root / "old"), "--out", str(root / "emb-other")]) == 0  # fmt: skip
    return {"root": root, "model": model, "photo": sorted((root / "new").rglob("*.png"))[0].read_bytes()}


def _ids(folder: Path) -> set[int]:
    return set(EmbeddingSet.load(folder, vectors=False).ids.tolist())


def _wait_version(url: str, version: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        if health["version"] == version or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_eight_clients_while_the_index_is_updated_twice(catalogue):
    c, root = catalogue, catalogue["root"]
    index = root / "index"
    versions = {1: _ids(index)}
    answers, stop = [], threading.Event()

    def client(n: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                r = http.post(
                    f"{url}/search", params={"k": K}, content=c["photo"], headers={"Content-Type": "image/png"}
                )
                body = r.json()
                ids = {h["image_id"] for q in body.get("queries", []) for h in q["results"]}
                answers.append((r.status_code, body.get("index", {}).get("version"), ids))

    with serving(index, "--watch-s", "0.2", "--max-wait-ms", "10") as (url, proc):
        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert main(["index", "add", "--index", str(index), "--embeddings", str(root / "emb-new")]) == 0
        versions[2] = _ids(index)
        assert _wait_version(url, 2)["version"] == 2  # picked up by the watch, no restart
        time.sleep(1.0)
        assert main(["index", "remove", "--index", str(index), "--classes", str(root / "gone.txt")]) == 0
        versions[3] = _ids(index)
        assert _wait_version(url, 3)["version"] == 3
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        assert (health["version"], health["count"], health["reloads"]) == (3, len(versions[3]), 2)
        assert health["build_id"] == IndexFolder.load(index).info["build_id"] and health["pid"] == proc.pid

        # a version built from another model's embeddings is refused; the service stays on version 3
        assert main(["index", "build", "--embeddings", str(root / "emb-other"), "--out", str(index)]) == 0
        health = _wait_version(url, 4, timeout=3)
        assert health["version"] == 3 and "another model" in health["reload_error"]
        reload = httpx.post(f"{url}/admin/reload", timeout=30)  # behind --token when the service has one
        assert reload.status_code == 409 and "another model" in reload.json()["detail"]
        r = httpx.post(f"{url}/search", params={"k": K}, content=c["photo"], headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["index"]["version"] == 3

    assert len(answers) > 50 and {status for status, _, _ in answers} == {200}  # zero failed requests
    seen = {v for _, v, _ in answers}
    assert seen == {1, 2, 3}, seen
    mixed = [(v, ids) for _, v, ids in answers if ids != versions[v]]
    assert not mixed, f"{len(mixed)} answers hold rows of another version than they name"
    assert versions[1] < versions[2] and versions[3] < versions[2]
    assert not np.isin(sorted(versions[2] - versions[3]), sorted(versions[3])).any()


def test_admin_reload_is_behind_the_token_and_loads_a_new_version(catalogue, tmp_path):
    """In process: POST /admin/reload needs the service's bearer token like every route, and makes a version current
    at once (no watch)."""
    from starlette.testclient import TestClient

    from retrieval.search.searcher import Searcher
    from retrieval.search.serve import ServeOptions, create_app

    root = catalogue["root"]
    index = tmp_path / "index"
    assert main(["index", "build", "--embeddings", str(root / "emb-old"), "--out", str(index)]) == 0
    app = create_app(Searcher(index), ServeOptions(token="t0ken", watch_s=0))
    auth = {"Authorization": "Bearer t0ken"}
    with TestClient(app) as client:
        assert client.post("/admin/reload").status_code == 401
        same = client.post("/admin/reload", headers=auth).json()
        assert (same["version"], same["changed"], same["count"]) == (1, False, 36)
        assert main(["index", "add", "--index", str(index), "--embeddings", str(root / "emb-new")]) == 0
        assert client.get("/healthz", headers=auth).json()["version"] == 1  # no watch: still version 1
        answer = client.post("/admin/reload", headers=auth).json()
        assert answer["version"] == 2 and answer["changed"] and answer["count"] == 72
        assert client.get("/healthz", headers=auth).json()["version"] == 2
