"""The search service: an HTTP JSON API over one :class:`~retrieval.search.Searcher` (model and index loaded once).

    app = create_app(Searcher("runs/sop/index"), ServeOptions(max_batch=32, max_wait_ms=5))
    uvicorn.run(app, host="127.0.0.1", port=8080)      # what `retrieval serve` does

``POST /search?k=K`` takes images as multipart files (field ``image``, several allowed), as the raw request body,
or JSON ``{"path": ...}`` / ``{"paths": [...]}`` (optionally ``"k"``), and answers ``{"queries": [{"query",
"results": [{rank, image_id, class_id, super_class_id, path, score}]}]}`` and the index version it came from
(``"index": {version, build_id, count}``). ``GET /healthz`` answers what is loaded, the version included. Bad
input answers 4xx with ``{"detail": "..."}``; the server never dies of a request.

A new version of the index folder (``retrieval index add|remove|build``) is picked up without a restart
(:mod:`retrieval.search.live`): the folder is watched every ``watch_s`` seconds, or ``POST /admin/reload`` (with
``Authorization: Bearer ADMIN_TOKEN``; off without ``--admin-token``) loads it at once. Each batch is answered from
one version, named in every answer; a version built from another model's embeddings is refused and the service
stays on the one it has. ``POST /feedback`` (with ``--feedback-dir``) records users' judgements of results
(:mod:`retrieval.search.serve_feedback`).

Batching: requests are decoded in the thread pool, then queued; one worker takes what has queued up within
``max_wait_ms`` of the first waiting request (up to ``max_batch`` images) and embeds it in one forward pass and one
index search (at the largest k asked; each request gets its own top k back). A lone request waits at most
``max_wait_ms``; under load, throughput comes from the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from retrieval.data.decode import decode_image
from retrieval.errors import UserError
from retrieval.search.feedback import FeedbackLog
from retrieval.search.live import LiveIndex, version_of
from retrieval.search.searcher import Searcher
from retrieval.search.serve_feedback import feedback_route

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("image", "images", "file")


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32  # images per forward pass
    max_wait_ms: float = 5.0  # how long the first queued request waits for company
    max_k: int = 1000
    max_bytes: int = 20 * 2**20  # per request body
    path_root: str | None = None  # JSON path queries must lie under it (None: any path the server can read)
    watch_s: float = 2.0  # how often the index folder is checked for a new version (0: only POST /admin/reload)
    admin_token: str | None = None  # enables POST /admin/reload for requests that carry it (Bearer)
    feedback_dir: str | None = None  # enables POST /feedback: the append-only log's folder
    feedback_max_bytes: int = 2**30  # the log and its photos stay under it (507 past it)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.max_k < 1 or self.watch_s < 0:
            raise UserError(
                f"serve options: expected max_batch >= 1, max_wait_ms >= 0, max_k >= 1, watch_s >= 0, got {self}"
            )


class Batcher:
    """Groups queued queries into one forward pass and one index search."""

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

    async def search(self, images: list[Image.Image], names: list[str], k: int) -> tuple[list[dict], dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, names, k, future))
        return await future

    async def _work(self) -> None:
        while True:
            group = [await self.queue.get()]
            deadline = time.perf_counter() + self.options.max_wait_ms / 1000
            size = len(group[0][0])
            while size < self.options.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(deadline - time.perf_counter(), 0))
                except asyncio.TimeoutError:
                    break
                group.append(item)
                size += len(item[0])
            try:
                answers = await run_in_threadpool(self._run, group)
            except Exception as e:  # one bad batch answers its requests with the error; the worker lives on
                answers = [e] * len(group)
            for (*_, future), answer in zip(group, answers, strict=True):
                if not future.done():
                    (future.set_exception if isinstance(answer, Exception) else future.set_result)(answer)

    def _run(self, group: list[tuple]) -> list[tuple[list[dict], dict]]:
        images = [im for item in group for im in item[0]]
        names = [n for item in group for n in item[1]]
        k = max(item[2] for item in group)
        vectors = self.searcher.embed(images)
        index = self.live.current  # once: every query of the batch is answered from this version
        results = self.searcher.search_vectors(vectors, names, k, index=index)
        version = version_of(index)
        self.batches += 1
        out, start = [], 0
        for item_images, _, item_k, _ in group:
            chunk = results[start : start + len(item_images)]
            out.append(([{**r, "results": r["results"][:item_k]} for r in chunk], version))
            start += len(item_images)
        return out


# ------------------------------------------------------------------------------------------ reading a request


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        return decode_image(data)  # the catalogue's own decoder: a catalogue image finds itself
    except Exception as e:  # PIL raises many types for bad data: all mean "not an image"
        raise HTTPException(415, f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def _open_path(path: str, root: str | None) -> Image.Image:
    resolved = Path(path).resolve()
    if root is not None and not resolved.is_relative_to(Path(root).resolve()):
        raise HTTPException(403, f"path {path!r}: outside the served folder (--path-root)")
    if not resolved.is_file():
        raise HTTPException(404, f"path {path!r}: no such file on the server")
    return _decode(resolved.read_bytes(), f"path {path!r}")


def _k(value: Any, options: ServeOptions) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise HTTPException(422, f"k: expected a positive integer, got {value!r}") from None
    if not 1 <= k <= options.max_k:
        raise HTTPException(422, f"k: expected an integer from 1 to {options.max_k}, got {k}")
    return k


async def _from_json(request: Request, options: ServeOptions) -> tuple[list[Image.Image], list[str], Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"JSON body: not valid JSON ({e})") from None
    if not isinstance(body, dict) or not ("path" in body or "paths" in body):
        raise HTTPException(422, 'JSON body: expected {"path": "..."} or {"paths": ["...", ...]}')
    paths = [body["path"]] if "path" in body else body["paths"]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise HTTPException(422, "JSON body: 'path' must be a string, 'paths' a non-empty list of strings")
    images = [await run_in_threadpool(_open_path, p, options.path_root) for p in paths]
    return images, paths, body.get("k")


async def _from_form(request: Request) -> tuple[list[Image.Image], list[str]]:
    form = await request.form()
    files = [f for field in IMAGE_FIELDS for f in form.getlist(field) if hasattr(f, "read")]
    if not files:
        raise HTTPException(422, f"multipart body: expected one or more files in the field {IMAGE_FIELDS[0]!r}")
    names = [f.filename or f"image {i}" for i, f in enumerate(files)]
    images = [await run_in_threadpool(_decode, await f.read(), n) for f, n in zip(files, names, strict=True)]
    return images, names


async def read_queries(request: Request, options: ServeOptions) -> tuple[list[Image.Image], list[str], int]:
    """(images, names, k) of a search request, or an HTTPException saying what was expected."""
    length = int(request.headers.get("content-length") or 0)
    if length > options.max_bytes:
        raise HTTPException(413, f"request body of {length} bytes: the limit is {options.max_bytes}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    k = request.query_params.get("k")
    if kind == "application/json":
        images, names, json_k = await _from_json(request, options)
        k = json_k if json_k is not None else k
    elif kind == "multipart/form-data":
        images, names = await _from_form(request)
    else:  # the raw body is the image (image/jpeg, application/octet-stream, or no type at all)
        data = await request.body()
        if not data:
            raise HTTPException(400, "empty body: send an image (raw, multipart field 'image') or JSON {'path': ...}")
        images, names = [await run_in_threadpool(_decode, data, "body")], ["body"]
    return images, names, _k(10 if k is None else k, options)


# ------------------------------------------------------------------------------------------------ the app


def create_app(searcher: Searcher, options: ServeOptions | None = None) -> Starlette:
    """The Starlette app: ``POST /search``, ``GET /healthz``, ``POST /admin/reload`` and (with a feedback folder)
    ``POST /feedback``; the batcher and the folder's watch run while the app does."""
    options = options or ServeOptions()
    live = LiveIndex(searcher)
    batcher = Batcher(searcher, options, live)
    feedback = FeedbackLog(options.feedback_dir, options.feedback_max_bytes) if options.feedback_dir else None

    async def search(request: Request) -> JSONResponse:
        images, names, k = await read_queries(request, options)
        try:
            results, version = await batcher.search(images, names, k)
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return JSONResponse({"k": k, "index": version, "queries": results})

    healthz, reload = _healthz(live, batcher, options, feedback), _reload(live, options)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        batcher.start()
        watch = asyncio.get_running_loop().create_task(_watch(live, options.watch_s)) if options.watch_s else None
        yield
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await batcher.stop()
        if feedback is not None:
            feedback.close()

    routes = [Route("/search", search, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])]
    routes.append(Route("/admin/reload", reload, methods=["POST"]))
    if feedback is not None:
        route = feedback_route(live, feedback, options.path_root, options.max_bytes)
        routes.append(Route("/feedback", route, methods=["POST"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def _healthz(live: LiveIndex, batcher: Batcher, options: ServeOptions, feedback: FeedbackLog | None):
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
                "feedback": str(options.feedback_dir) if feedback else None,
                "pid": os.getpid(),
            }
        )

    return healthz


def _reload(live: LiveIndex, options: ServeOptions):
    async def reload(request: Request) -> JSONResponse:
        if not options.admin_token:
            raise HTTPException(404, "POST /admin/reload is off: start the service with --admin-token")
        if request.headers.get("authorization", "") != f"Bearer {options.admin_token}":
            raise HTTPException(401, "POST /admin/reload: expected the header Authorization: Bearer ADMIN_TOKEN")
        try:
            return JSONResponse(await run_in_threadpool(live.reload))
        except UserError as e:
            raise HTTPException(409, str(e)) from None

    return reload


async def _watch(live: LiveIndex, every_s: float) -> None:
    """Reload when the folder was switched to another version; a refused one is not retried until it changes."""
    while True:
        await asyncio.sleep(every_s)
        if live.changed():
            with contextlib.suppress(UserError):  # logged, shown in /healthz; the old version keeps answering
                await run_in_threadpool(live.reload)
