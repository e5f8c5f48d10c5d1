"""The search service: an HTTP JSON API over one :class:`~retrieval.search.Searcher` (model and index loaded once).

    app = create_app(Searcher("runs/sop/index"), ServeOptions(max_batch=32, max_wait_ms=5))
    uvicorn.run(app, host="127.0.0.1", port=8080)      # what `retrieval serve` does

``POST /search?k=K`` takes images as multipart files (field ``image``, several allowed), as the raw request body,
or JSON ``{"path": ...}`` / ``{"paths": [...]}`` (optionally ``"k"``; only with ``path_root``), or embeddings made
elsewhere as JSON ``{"vectors": [[...], ...]}`` (the index's dimension, as the index's model makes them: searched as
they are), and answers ``{"queries": [{"query", "results": [{rank, image_id, class_id, super_class_id, path,
score}]}]}`` with the index version it came from (``"index": {version, build_id, count}``). ``GET /healthz``
answers what is loaded, the version included. Bad input answers 4xx with ``{"detail": "..."}``; the server
never dies of a request. Every request is bounded (body bytes and time, images, pixels, JSON, paths:
:mod:`retrieval.search.serve_request`) and, with ``token``, must carry ``Authorization: Bearer <token>`` (401
otherwise).

Batching: requests are decoded in worker threads (``decoders`` at a time) into model inputs, then queued; one
worker takes what has queued up within ``max_wait_ms`` of the first waiting request, up to ``max_batch`` images,
and embeds it in one forward pass and one index search (at the largest k asked; each request gets its own top k
back). A request of more than ``max_batch`` images is queued as several parts, so it never makes a larger forward
pass and other requests are served between its parts. A lone request waits at most ``max_wait_ms``; under load,
throughput comes from the batch.

A new version of the index folder (``retrieval index add|remove|build``) is picked up without a restart
(:mod:`retrieval.search.live`): the folder is checked every ``watch_s`` seconds, and ``POST /admin/reload`` loads it
at once (behind the token like every route). A request is pinned to the version current when it was queued (all its
parts too) and answered from it whole, naming it; a version built from another model's embeddings is refused and
the service stays on the one it has. ``POST /feedback`` (with ``feedback_dir``) records users' judgements of results
(:mod:`retrieval.search.serve_feedback`).
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
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from retrieval.errors import UserError
from retrieval.search import serve_request as rq
from retrieval.search.feedback import FeedbackLog
from retrieval.search.live import LiveIndex, version_of
from retrieval.search.searcher import Searcher
from retrieval.search.serve_feedback import feedback_route
from retrieval.search.serve_request import IMAGE_FIELDS, Query, ServeOptions

__all__ = ["IMAGE_FIELDS", "Batcher", "ServeOptions", "create_app", "read_queries"]
log = logging.getLogger(__name__)


class Batcher:
    """Groups queued queries into forward passes of at most ``max_batch`` images and one index search each."""

    def __init__(self, searcher: Searcher, options: ServeOptions, live: LiveIndex | None = None) -> None:
        self.searcher, self.options, self.live = searcher, options, live or LiveIndex(searcher)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = 0  # forward passes so far (healthz shows it: a check that batching happens)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def search(self, images: list, names: list[str], k: int) -> tuple[list[dict], dict]:
        """Top-k results per image (PIL images or prepared inputs), queued in parts of at most ``max_batch``, all
        answered from the index version current now; returns them and that version."""
        loop, step = asyncio.get_running_loop(), self.options.max_batch
        index, futures = self.live.current, []  # the version this request is answered from, every part of it
        for start in range(0, len(images), step):
            futures.append(loop.create_future())
            await self.queue.put((images[start : start + step], names[start : start + step], k, index, futures[-1]))
        return [r for part in await asyncio.gather(*futures) for r in part], version_of(index)

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
        """One forward pass for the group, one index search per version its requests are pinned to (one but
        during a swap), at the largest k asked of it; each request gets its own top k back."""
        vectors = self.searcher.embed([im for item in group for im in item[0]])
        self.batches += 1
        bounds = np.cumsum([0] + [len(item[0]) for item in group])
        out: list = [None] * len(group)
        for index in {id(item[3]): item[3] for item in group}.values():
            mine = [i for i, item in enumerate(group) if item[3] is index]
            rows = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in mine])
            names = [n for i in mine for n in group[i][1]]
            results = self.searcher.search_vectors(vectors[rows], names, max(group[i][2] for i in mine), index=index)
            for i in mine:
                chunk, results = results[: len(group[i][0])], results[len(group[i][0]) :]
                out[i] = [{**r, "results": r["results"][: group[i][2]]} for r in chunk]
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
    """The Starlette app: ``POST /search``, ``GET /healthz``, ``POST /admin/reload`` and (with a feedback folder)
    ``POST /feedback``; the batcher and the index folder's watch run while the app does."""
    options = options or ServeOptions()
    live = LiveIndex(searcher)
    batcher = Batcher(searcher, options, live)
    feedback = FeedbackLog(options.feedback_dir, options.feedback_max_bytes) if options.feedback_dir else None
    limits: dict = {}  # the decoders' limiter, made in the app's event loop

    async def search(request: Request) -> JSONResponse:
        query = await read_queries(request, options, searcher, limits["decoders"])
        if isinstance(query, VectorQuery):  # embeddings made elsewhere: no model, no batching with image queries
            names, index = [f"vector {i}" for i in range(len(query.array))], live.current
            results = await anyio.to_thread.run_sync(searcher.search_vectors, query.array, names, query.k, index)
            return JSONResponse({"k": query.k, "index": version_of(index), "queries": results})
        try:
            results, version = await batcher.search(query.inputs, query.names, query.k)
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return JSONResponse({"k": query.k, "index": version, "queries": results})

    async def reload(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await anyio.to_thread.run_sync(live.reload))
        except UserError as e:
            raise HTTPException(409, str(e)) from None

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        limits["decoders"] = anyio.CapacityLimiter(options.decoders)
        batcher.start()
        watch = asyncio.get_running_loop().create_task(_watch(live, options.watch_s)) if options.watch_s else None
        yield
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await batcher.stop()
        if feedback is not None:
            feedback.close()

    routes = [Route("/search", search, methods=["POST"]), Route("/admin/reload", reload, methods=["POST"])]
    routes.append(Route("/healthz", _healthz(live, batcher, feedback), methods=["GET"]))
    if feedback is not None:
        routes.append(Route("/feedback", feedback_route(live, feedback, options, limits), methods=["POST"]))
    guard = [Middleware(BearerToken, token=options.token)] if options.token else []
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan, middleware=guard)


def _healthz(live: LiveIndex, batcher: Batcher, feedback: FeedbackLog | None):
    async def healthz(request: Request) -> JSONResponse:
        index = live.current
        return JSONResponse(
            {
                "status": "ok",
                "model": str(index.info.get("model")),
                "index": str(index.path),
                **version_of(index),
                "reloads": live.reloads,
                "reload_error": live.last_error,
                "dim": int(index.info["dim"]),
                "device": str(batcher.searcher.embedder.device),
                "batches": batcher.batches,
                "feedback": str(feedback.folder) if feedback else None,
                "pid": os.getpid(),
            }
        )

    return healthz


async def _watch(live: LiveIndex, every_s: float) -> None:
    """Reload when the folder was switched to another version; a refused one is not retried until it changes."""
    while True:
        await asyncio.sleep(every_s)
        if live.changed():
            with contextlib.suppress(UserError):  # logged and shown in /healthz; the old version keeps answering
                await anyio.to_thread.run_sync(live.reload)
