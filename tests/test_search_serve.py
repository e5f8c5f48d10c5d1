"""`retrieval serve`: a real server on a free port answers 50 mixed good and bad requests from concurrent clients;
good ones equal the in-process Searcher, bad ones get a 4xx with a message, the server survives; the batcher
groups concurrent queries into one forward pass. The server runs with a token and small bounds, and each bound
is crossed by a request: body bytes (chunked too) and time, pixels per image and request, images per request,
JSON depth and size, path queries (the slow hostile load is `python -m bench serve-hostile`)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _api_fixture import World, make_world
from _launch import serving
from PIL import Image
from starlette.exceptions import HTTPException

from retrieval.data.input_spec import InputSpec
from retrieval.search.searcher import Searcher
from retrieval.search.serve import Batcher, ServeOptions
from retrieval.search.serve_request import open_checked, read_path

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# small bounds, so that the tests cross each of them with small requests
BOUNDS = ["--max-bytes", "2000000", "--max-images", "4", "--max-pixels", "1000000", "--max-request-pixels", "1500000"]
BOUNDS += ["--body-timeout", "3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def server(world: World):
    """`retrieval serve` in a child process; stopped (SIGTERM, then SIGKILL) whatever the test does."""
    options = ("--max-wait-ms", "20", "--max-batch", "16", "--path-root", str(world.model), *BOUNDS)
    env = {**os.environ, "RETRIEVAL_SERVE_TOKEN": TOKEN}  # the command reads it (not on the command line: ps)
    with serving(world.index, *options, env=env, headers=AUTH) as live:
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
        ("missing file", {"json": {"path": str(world.model / "nope.png")}}, 404, "no such image under the served"),
        ("outside root", {"json": {"path": "/etc/hostname"}}, 404, "no such image under the served"),
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
        return httpx.post(f"{url}/search", timeout=60, **{**kwargs, "headers": {**kwargs.get("headers", {}), **AUTH}})

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
    health = httpx.get(f"{url}/healthz", headers=AUTH, timeout=10).json()
    assert health["status"] == "ok" and health["count"] == len(world.images) and health["dim"] == 64
    assert health["batches"] < 32  # 32 good requests from 8 concurrent clients: some shared a forward pass
    assert httpx.get(f"{url}/nope", headers=AUTH, timeout=10).status_code == 404
    assert proc.poll() is None  # still serving


def _with_batcher(searcher: Searcher, options: ServeOptions, ask) -> tuple:
    """``(await ask(batcher), forward passes)`` with a batcher running in its own event loop."""

    async def main():
        batcher = Batcher(searcher, options)
        batcher.start()
        try:
            answers = await ask(batcher)
        finally:
            await batcher.stop()
        return answers, batcher.batches

    return asyncio.run(main())


def test_batcher_groups_concurrent_queries(world: World) -> None:
    searcher = Searcher(world.index)
    images = [Image.open(p).convert("RGB") for p in world.images[:5]]

    def ask(batcher):
        return asyncio.gather(*(batcher.search([im], [f"q{i}"], i + 1) for i, im in enumerate(images)))

    answers, batches = _with_batcher(searcher, ServeOptions(max_batch=16, max_wait_ms=300), ask)
    assert batches == 1
    expected = searcher.search(images, 5)
    for i, ((answer, version), want) in enumerate(zip(answers, expected, strict=True)):
        assert answer[0]["query"] == f"q{i}" and answer[0]["results"] == want["results"][: i + 1]
        assert version == {"version": 1, "build_id": searcher.index.info["build_id"], "count": len(world.images)}


# ------------------------------------------------------------------------------------ the service's bounds


def _search(url: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/search", timeout=60, **{**kwargs, "headers": {**AUTH, **kwargs.get("headers", {})}})


def _raw_status(url: str, head: bytes, chunks=(), timeout: float = 30) -> int:
    """The status a raw HTTP/1.1 request gets: send ``head``, then ``chunks`` until the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head)
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:  # answered already: stop sending, as a client would
                break
            s.sendall(chunk)
        return int(s.recv(4096).split(b" ", 2)[1])


def _blank_png(width: int, height: int, mode: str = "1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_bearer_token_is_required(server):
    url, _ = server
    files = {"image": ("a.png", _blank_png(40, 40, "RGB"))}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(f"{url}/search", files=files, headers=headers, timeout=30)
        assert r.status_code == 401 and "bearer token" in r.json()["detail"], headers
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 401
    assert _search(url, files=files).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(server):
    """No Content-Length: the limit (2 MB here) is counted as the chunks arrive; 413 long before 20 MB are sent."""
    url, proc = server
    head = b"POST /search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
    head += b"\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (100_000, b"\0" * 100_000)
    assert _raw_status(url, head, [chunk] * 200) == 413  # 20 MB offered
    declared = head.replace(b"Transfer-Encoding: chunked", b"Content-Length: 2000001")
    assert _raw_status(url, declared) == 413  # said in the header: refused before reading
    assert proc.poll() is None


def test_a_client_stalled_after_its_headers_gets_408(server):
    url, _ = server
    head = b"POST /search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
    head += b"\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    start = time.monotonic()
    assert _raw_status(url, head) == 408  # --body-timeout 3
    assert time.monotonic() - start < 20


def test_pixel_budgets_are_checked_from_the_header_before_decoding(server):
    url, _ = server
    big = _search(url, files={"image": ("big.png", _blank_png(1100, 1000))})  # 1-bit: 1.1 M pixels in 2 kB
    assert big.status_code == 413 and "1100 x 1000 = 1100000 pixels; the limit per image is 1000000" in big.text
    pair = [("image", (f"{i}.png", _blank_png(1000, 800))) for i in range(2)]  # 0.8 M each, 1.6 M in all
    r = _search(url, files=pair)
    assert r.status_code == 413 and "the limit per request is 1500000" in r.text


def test_images_per_request_are_capped(server, world: World):
    url, _ = server
    files = [("image", (f"{i}.png", world.images[i].read_bytes())) for i in range(5)]
    r = _search(url, files=files)
    assert r.status_code == 413 and "more than 4 images in one request" in r.text
    r = _search(url, json={"paths": [str(p) for p in world.images[:5]]})
    assert r.status_code == 413 and "5 images in one request; the limit is 4" in r.text


def test_json_bodies_are_bounded_in_depth_and_size(server):
    url, proc = server
    r = _search(url, content=b"[" * 100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.text
    r = _search(url, json={"paths": ["x" * 1000] * 1100})  # 1.1 MB of JSON
    assert r.status_code == 413
    assert proc.poll() is None


def test_path_queries_answer_alike_for_absent_and_outside(server, world: World, tmp_path):
    url, _ = server
    (tmp_path / "outside.png").write_bytes(world.images[0].read_bytes())
    (world.model / "link.png").unlink(missing_ok=True)
    (world.model / "link.png").symlink_to(tmp_path / "outside.png")  # inside the root, pointing out of it
    answers = {}
    for name in (
        "/etc/hostname",
        str(world.model / "absent.png"),
        "../../etc/hostname",
        "link.png",
        "a\x00b",
        "x" * 5000,
    ):
        r = _search(url, json={"path": name})
        answers[name] = (r.status_code, r.json()["detail"].replace(repr(name), "PATH"))
    assert set(answers.values()) == {(404, "path PATH: no such image under the served folder")}, answers


def test_path_queries_are_off_without_a_path_root():
    with pytest.raises(HTTPException) as refused:
        read_path("/etc/hostname", ServeOptions())
    assert refused.value.status_code == 403 and "--path-root" in refused.value.detail


def test_a_request_larger_than_max_batch_is_split(world: World):
    searcher = Searcher(world.index)
    images = [Image.open(p).convert("RGB") for p in world.images[:5]]

    ask = lambda batcher: batcher.search(images, [f"q{i}" for i in range(5)], 3)  # noqa: E731
    (answers, version), batches = _with_batcher(searcher, ServeOptions(max_batch=2, max_wait_ms=50), ask)
    assert batches == 3, "5 images in forward passes of at most 2"
    assert version["version"] == 1  # every part answered from the version the request was pinned to
    for got, want in zip(answers, searcher.search(images, 3), strict=True):
        assert [h["image_id"] for h in got["results"]] == [h["image_id"] for h in want["results"]]
        assert [h["score"] for h in got["results"]] == pytest.approx([h["score"] for h in want["results"]], abs=1e-5)


def test_a_jpeg_over_the_budget_is_decoded_at_reduced_scale_one_within_it_at_full_size():
    """Within --max-pixels a JPEG decodes at full size, as the catalogue's did (a catalogue image finds itself with
    cosine 1, issue 29); over it, at the largest libjpeg scale that fits, instead of a 413 (issue 30)."""
    spec = InputSpec(64, (0.5,) * 3, (0.5,) * 3, 0.875)  # the model resizes the short side to 74
    buf = io.BytesIO()
    Image.new("RGB", (2400, 1600), (200, 30, 30)).save(buf, format="JPEG")
    assert open_checked(buf.getvalue(), "big.jpg", spec, ServeOptions()).size == (2400, 1600)
    image = open_checked(buf.getvalue(), "big.jpg", spec, ServeOptions(max_pixels=1_000_000))
    assert image.size == (1200, 800), "1/2 scale: the first that fits 1 Mpx"
    with pytest.raises(HTTPException, match="limit per image") as over:
        open_checked(buf.getvalue(), "big.jpg", spec, ServeOptions(max_pixels=10_000))  # 1/8 is 300 x 200
    assert over.value.status_code == 413
    png = open_checked(_blank_png(2400, 1600, "RGB"), "big.png", spec, ServeOptions())
    assert png.size == (2400, 1600)
    with pytest.raises(HTTPException, match="1 x 300000 resized for the model") as strip:
        open_checked(_blank_png(1, 300_000), "strip.png", spec, ServeOptions())  # 0.3 M pixels, 22 G once resized
    assert strip.value.status_code == 413


def test_bad_bounds_are_one_line_before_the_model_loads(capsys):
    from retrieval.cli import main

    assert main(["serve", "--index", "/nonexistent", "--max-images", "0", "--body-timeout", "0"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith("expected max_images >= 1 (got 0); body_timeout_s > 0 (got 0.0)")


def test_vector_queries_equal_image_queries_of_the_same_embeddings(world: World) -> None:
    """POST /search {"vectors": [[...]]}: a user's own embeddings search the index as the images they came from."""
    from starlette.testclient import TestClient

    from retrieval.search.serve import create_app

    searcher = Searcher(world.index)
    images = [str(p) for p in world.images[:3]]
    vectors = searcher.embed(images)
    with TestClient(create_app(searcher, ServeOptions(path_root=str(world.model)))) as client:
        got = client.post("/search", json={"vectors": vectors.tolist(), "k": 5})
        assert got.status_code == 200, got.text
        by_image = client.post("/search", json={"paths": images, "k": 5}).json()["queries"]
        for vq, iq in zip(got.json()["queries"], by_image, strict=True):
            assert [h["image_id"] for h in vq["results"]] == [h["image_id"] for h in iq["results"]]
            assert [h["score"] for h in vq["results"]] == pytest.approx([h["score"] for h in iq["results"]], abs=1e-5)
        wrong = client.post("/search", json={"vectors": [[0.5, 0.5]]})
        dim = searcher.index.info["dim"]
        assert wrong.status_code == 422 and f"dimension {dim}, got shape [1, 2]" in wrong.json()["detail"]
        assert client.post("/search", json={"vectors": [["a"] * dim]}).status_code == 422
        nan = json.dumps({"vectors": [[float("nan")] * dim]})  # Python's JSON writes NaN; httpx's json= refuses it
        assert client.post("/search", content=nan, headers={"Content-Type": "application/json"}).status_code == 422
