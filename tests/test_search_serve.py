"""`retrieval serve`: a real server on a free port answers 50 mixed good and bad requests from concurrent clients;
good ones equal the in-process Searcher, bad ones get a 4xx with a message, the server survives; the batcher
groups concurrent queries into one forward pass."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _api_fixture import World, make_world
from _launch import serving
from PIL import Image

from retrieval.search.searcher import Searcher
from retrieval.search.serve import Batcher, ServeOptions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def server(world: World):
    """`retrieval serve` in a child process; stopped (SIGTERM, then SIGKILL) whatever the test does."""
    with serving(world.index, "--max-wait-ms", "20", "--max-batch", "16", "--path-root", str(world.model)) as live:
        yield live


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _requests(world: World) -> list[tuple[str, dict, int, list[str] | None, int]]:
    """(name, httpx kwargs, expected status, query images (good requests), k) — 50 in all, good and bad mixed."""
    imgs = world.images
    good = []
    for i in range(8):
        multipart = {"files": {"image": (imgs[i].name, _png(imgs[i]), "image/png")}, "params": {"k": 5}}
        good.append(("multipart", multipart, [i], 5))
        raw = {"content": _png(imgs[i + 8]), "headers": {"Content-Type": "image/png"}, "params": {"k": 3}}
        good.append(("raw", raw, [i + 8], 3))
        good.append(("json path", {"json": {"path": str(imgs[i + 1]), "k": 4}}, [i + 1], 4))
    for i in range(4):
        files = [("image", (imgs[i].name, _png(imgs[i]), "image/png")), ("image", ("b.png", _png(imgs[i + 9])))]
        good.append(("multipart x2", {"files": files, "params": {"k": 2}}, [i, i + 9], 2))
        good.append(("json paths", {"json": {"paths": [str(imgs[i + 2]), str(imgs[i + 3])]}}, [i + 2, i + 3], 10))
    bad = [
        (
            "not an image",
            {"content": b"GIF89a nope", "headers": {"Content-Type": "image/gif"}},
            415,
            "not a readable image",
        ),
        ("not an image (multipart)", {"files": {"image": ("x.jpg", b"\xff\xd8 broken")}}, 415, "x.jpg: not a readable"),
        ("missing field", {"files": {"picture": ("a.png", _png(imgs[0]))}}, 422, "field 'image'"),
        ("json without path", {"json": {"k": 3}}, 422, 'expected {"path"'),
        ("json paths not a list", {"json": {"paths": "a.png"}}, 422, "non-empty list"),
        ("bad json", {"content": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ("missing file", {"json": {"path": str(world.model / "nope.png")}}, 404, "no such file"),
        ("outside root", {"json": {"path": "/etc/hostname"}}, 403, "outside the served folder"),
        ("empty body", {"content": b""}, 400, "empty body"),
    ]
    out = [(n, kw, 200, q, k) for n, kw, q, k in good]
    for i, (name, kw, status, _) in enumerate(bad):
        out.append((name, kw, status, None, 0))
        if i < 5:  # the same bad bodies with a bad k too: the body's problem is reported
            out.append((f"{name}, k=0", {**kw, "params": {"k": 0}}, status, None, 0))
    for k in ("0", "-3", "abc", "100000"):
        out.append((f"k={k}", {"files": {"image": ("a.png", _png(imgs[0]))}, "params": {"k": k}}, 422, None, 0))
    return out


def test_fifty_mixed_requests_from_concurrent_clients(server, world: World) -> None:
    url, proc = server
    requests = _requests(world)
    assert len(requests) == 50 and sum(r[2] == 200 for r in requests) == 32

    def send(item):
        name, kwargs, *_ = item
        return httpx.post(f"{url}/search", timeout=60, **kwargs)

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, requests))
    assert time.monotonic() - start < 120

    searcher = Searcher(world.index)
    for (name, _, status, queries, k), response in zip(requests, responses, strict=True):
        assert response.status_code == status, (name, response.text)
        body = response.json()
        if status != 200:
            assert isinstance(body["detail"], str) and body["detail"], name
            continue
        expected = searcher.search([world.images[q] for q in queries], k)
        assert body["k"] == k and len(body["queries"]) == len(queries)
        for got, want in zip(body["queries"], expected, strict=True):
            assert [h["image_id"] for h in got["results"]] == [h["image_id"] for h in want["results"]], name
            for g, w in zip(got["results"], want["results"], strict=True):
                assert g["score"] == pytest.approx(w["score"], abs=1e-5)
                assert (g["class_id"], g["super_class_id"], g["path"]) == (
                    w["class_id"],
                    w["super_class_id"],
                    w["path"],
                )
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["count"] == len(world.images) and health["dim"] == 64
    assert health["batches"] < 32  # 32 good requests from 8 concurrent clients: some shared a forward pass
    assert httpx.get(f"{url}/nope", timeout=10).status_code == 404
    assert proc.poll() is None  # still serving


def test_batcher_groups_concurrent_queries(world: World) -> None:
    searcher = Searcher(world.index)
    images = [Image.open(p).convert("RGB") for p in world.images[:5]]

    async def main():
        batcher = Batcher(searcher, ServeOptions(max_batch=16, max_wait_ms=300))
        batcher.start()
        try:
            answers = await asyncio.gather(*(batcher.search([im], [f"q{i}"], i + 1) for i, im in enumerate(images)))
        finally:
            await batcher.stop()
        return answers, batcher.batches

    answers, batches = asyncio.run(main())
    assert batches == 1
    expected = searcher.search(images, 5)
    for i, ((answer, version), want) in enumerate(zip(answers, expected, strict=True)):
        assert answer[0]["query"] == f"q{i}" and answer[0]["results"] == want["results"][: i + 1]
        assert version == {"version": 1, "build_id": searcher.index.info["build_id"], "count": len(world.images)}
