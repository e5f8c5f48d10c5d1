"""The search service: an HTTP JSON API over one :class:`~retrieval.search.Searcher` (model and index loaded once).

    app = create_app(Searcher("runs/sop/index"), ServeOptions(max_batch=32, max_wait_ms=5))
    uvicorn.run(app, host="127.0.0.1", port=8080)      # what `retrieval serve` does

``POST /search?k=K`` takes images as multipart files (field ``image``, several allowed), as the raw request body,
or JSON ``{"path": ...}`` / ``{"paths": [...]}`` (optionally ``"k"``; only with ``path_root``), or embeddings made
elsewhere as JSON ``{"vectors": [[...], ...]}`` (the index's dimension, as the index's model makes them: searched as
they are), and answers ``{"queries": [{"query", "results": [{rank, image_id, class_id, super_class_id, path,
score}]}]}``. ``GET /healthz`` answers what is loaded. Bad input answers 4xx with ``{"detail": "..."}``; the server
never dies of a request. Every request is bounded (body bytes and time, images, pixels, JSON, paths:
:mod:`retrieval.search.serve_request`) and, with ``token``, must carry ``Authorization: Bearer <token>`` (401
otherwise).

Batching: requests are decoded in worker threads (``decoders`` at a time) into model inputs, then queued; one
worker takes what has queued up within ``max_wait_ms`` of the first waiting request, up to ``max_batch`` images,
and embeds it in one forward pass and one index search (at the largest k asked; each request gets its own top k
back). A request of more than ``max_batch`` images is queued as several parts, so it never makes a larger forward
pass and other requests are served between its parts. A lone request waits at most ``max_wait_ms``; under load,
throughput comes from the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from retrieval.errors import UserError
from retrieval.search import serve_request as rq
from retrieval.search.searcher import Searcher
from retrieval.search.serve_request import IMAGE_FIELDS, Query, ServeOptions

__all__ = ["IMAGE_FIELDS", "Batcher", "ServeOptions", "create_app", "read_queries"]
log = logging.getLogger(__name__)


class Batcher:
    """Groups queued queries into forward passes of at most ``max_batch`` images and one index search each."""

    def __init__(self, searcher: Searcher, options: ServeOptions) -> None:
        self.searcher, self.options = searcher, options
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = 0  # forward passes so far (healthz shows it: a check that batching happens)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def search(self, images: list, names: list[str], k: int) -> list[dict]:
        """Top-k results per image (PIL images or prepared inputs), queued in parts of at most ``max_batch``."""
        loop, step = asyncio.get_running_loop(), self.options.max_batch
        futures = []
        for start in range(0, len(images), step):
            futures.append(loop.create_future())
            await self.queue.put((images[start : start + step], names[start : start + step], k, futures[-1]))
        return [r for part in await asyncio.gather(*futures) for r in part]

    async def _work(self) -> None:
        carried = None  # a part that did not fit the last forward pass: it opens the next
        while True:
            group = [carried or await self.queue.get()]
            carried, size = None, len(group[0][0])
            deadline = time.perf_counter() + self.options.max_wait_ms / 1000
            while size < self.options.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(deadline - time.perf_counter(), 0))
                except asyncio.TimeoutError:
                    break
                if size + len(item[0]) > self.options.max_batch:
                    carried = item
                    break
                group.append(item)
                size += len(item[0])
            await self._answer(group)

    async def _answer(self, group: list[tuple]) -> None:
        try:
            answers = await anyio.to_thread.run_sync(self._run, group)
        except Exception as e:  # one bad batch answers its requests with the error; the worker lives on
            answers = [e] * len(group)
        for (*_, future), answer in zip(group, answers, strict=True):
            if not future.done():
                (future.set_exception if isinstance(answer, Exception) else future.set_result)(answer)

    def _run(self, group: list[tuple]) -> list[list[dict]]:
        images = [im for item in group for im in item[0]]
        names = [n for item in group for n in item[1]]
        k = max(item[2] for item in group)
        results = self.searcher.search_vectors(self.searcher.embed(images), names, k)
        self.batches += 1
        out, start = [], 0
        for item_images, _, item_k, _ in group:
            chunk = results[start : start + len(item_images)]
            out.append([{**r, "results": r["results"][:item_k]} for r in chunk])
            start += len(item_images)
        return out


# ------------------------------------------------------------------------------------------ reading a request


def _k(value, options: ServeOptions) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise HTTPException(422, f"k: expected a positive integer, got {value!r}") from None
    if not 1 <= k <= options.max_k:
        raise HTTPException(422, f"k: expected an integer from 1 to {options.max_k}, got {k}")
    return k


async def _blobs(request: Request, options: ServeOptions, limiter) -> tuple[list[bytes], list[str], object]:
    """The request's encoded images, their names and the k its body asks for (None: the query string's)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await rq.read_body(request, options)
    if kind == "multipart/form-data":
        return (*await rq.form_files(request, body, options), None)
    if not body:  # the raw body is the image (image/jpeg, application/octet-stream, or no type at all)
        raise HTTPException(400, "empty body: send an image (raw, multipart field 'image') or JSON {'path': ...}")
    return [body], ["body"], None


async def read_queries(request: Request, options: ServeOptions, searcher: Searcher, limiter) -> Query | VectorQuery:
    """The request's images as model inputs, their names and k (or, for ``{"vectors": ...}``, the vectors), or an
    HTTPException saying what was expected."""
    k = request.query_params.get("k", 10)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        body = await rq.read_body(request, options)  # vectors may be long: the body limit, then JSON's below
        query = rq.parse_json(body)
        if isinstance(query, dict) and "vectors" in query:
            return read_vectors(query, options, int(searcher.index.info["dim"]), k)
        if len(body) > options.max_json_bytes:
            raise HTTPException(413, f"JSON body: over {options.max_json_bytes} bytes")
        paths, asked = rq.json_paths(query, options)
        blobs = [await anyio.to_thread.run_sync(rq.read_path, p, options, limiter=limiter) for p in paths]
        names = paths
    else:
        blobs, names, asked = await _blobs(request, options, limiter)
    embedder = searcher.embedder
    inputs = await rq.prepare_all(blobs, names, embedder.spec, embedder.prepare, options, limiter)
    return Query(inputs, names, _k(asked if asked is not None else k, options))


@dataclass(frozen=True)
class VectorQuery:
    array: Any  # N x dim float32
    k: int


def read_vectors(query: dict, options: ServeOptions, dim: int, k: Any) -> VectorQuery:
    """A JSON ``{"vectors": [[...], ...], "k": K}`` query as an N x ``dim`` float32 array (at most ``max_images``)."""
    import numpy as np

    try:
        array = np.asarray(query["vectors"], dtype=np.float32)
    except (TypeError, ValueError):
        raise HTTPException(422, "vectors: expected a list of lists of numbers") from None
    if array.ndim != 2 or not len(array) or array.shape[1] != dim or not np.isfinite(array).all():
        raise HTTPException(
            422,
            f"vectors: expected a non-empty list of finite vectors of dimension {dim}, got shape {list(array.shape)}",
        )
    if len(array) > options.max_images:
        raise HTTPException(
            413, f"{len(array)} vectors in one request; the limit is {options.max_images} (--max-images)"
        )
    return VectorQuery(array, _k(query.get("k", k), options))


# ------------------------------------------------------------------------------------------------ the app


class BearerToken:
    """ASGI middleware: with a token, every HTTP request must carry ``Authorization: Bearer <token>``; 401 before
    any work (the body is not read)."""

    def __init__(self, app, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        given = Request(scope).headers.get("authorization", "").encode() if scope["type"] == "http" else None
        if given is not None and not hmac.compare_digest(given, self.expected):  # constant time: no guessing
            detail = {"detail": "missing or wrong bearer token (send Authorization: Bearer <token>)"}
            await JSONResponse(detail, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(searcher: Searcher, options: ServeOptions | None = None) -> Starlette:
    """The Starlette app: ``POST /search``, ``GET /healthz``; the batcher runs while the app does."""
    options = options or ServeOptions()
    batcher = Batcher(searcher, options)
    limits: dict = {}  # the decoders' limiter, made in the app's event loop

    async def search(request: Request) -> JSONResponse:
        query = await read_queries(request, options, searcher, limits["decoders"])
        if isinstance(query, VectorQuery):  # embeddings made elsewhere: no model, no batching with image queries
            names = [f"vector {i}" for i in range(len(query.array))]
            results = await anyio.to_thread.run_sync(searcher.search_vectors, query.array, names, query.k)
            return JSONResponse({"k": query.k, "queries": results})
        try:
            results = await batcher.search(query.inputs, query.names, query.k)
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return JSONResponse({"k": query.k, "queries": results})

    async def healthz(request: Request) -> JSONResponse:
        info = searcher.index.info
        return JSONResponse(
            {
                "status": "ok",
                "model": str(info.get("model")),
                "index": str(searcher.index.path),
                "count": int(searcher.index.index.ntotal),
                "dim": int(info["dim"]),
                "device": str(searcher.embedder.device),
                "batches": batcher.batches,
                "pid": os.getpid(),
            }
        )

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        limits["decoders"] = anyio.CapacityLimiter(options.decoders)
        batcher.start()
        yield
        await batcher.stop()

    routes = [Route("/search", search, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])]
    guard = [Middleware(BearerToken, token=options.token)] if options.token else []
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan, middleware=guard)
