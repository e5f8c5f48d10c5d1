"""One search request read under the service's bounds (:class:`ServeOptions`), for :mod:`retrieval.search.serve`.

Every bound is checked before the work it protects, and each answers 4xx with ``{"detail": ...}``:

* the body: at most ``max_bytes``, counted while it is read (a chunked body without ``Content-Length`` too: 413)
  and received within ``body_timeout_s`` (a client that stalls after its headers: 408);
* a JSON body: at most ``max_json_bytes`` (413; ``{"vectors": ...}``: ``max_bytes`` and ``max_images`` vectors), nested at
  most as deep as Python's parser allows (400);
* images per request: at most ``max_images`` (413; the batcher then embeds them ``max_batch`` at a time);
* pixels, read from each image's header before it is decoded: ``max_pixels`` per image and
  ``max_request_pixels`` per request, and the image as the model's resize would make it (a 1 x 100000 strip
  is 100 kpx, and 7 Gpx once its short side is resized to the model's input: 413). An image within the budget is
  decoded at full size by the catalogue's own decoder (:mod:`retrieval.data.decode`), so a catalogue image finds
  itself with cosine 1; a JPEG over it is decoded at the largest reduced scale (``Image.draft``: JPEG's DCT
  scaling, 1/2 to 1/8) that fits the budget and still covers the model's resize, instead of being refused;
* path queries (``{"path": ...}``) only under ``path_root``; without it they are off (403), and a path that is
  absent, not a file, or outside the root gets the same 404, so answers do not tell which files exist.

Decoding runs in worker threads, at most ``decoders`` at a time (peak memory: ``decoders`` images at the pixel
budget), and each image becomes the model's input tensor right there: a queued query holds 3 x size x size
floats, never its decoded pixels.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import torch
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import Request

from retrieval.data.decode import to_rgb
from retrieval.data.input_spec import InputSpec
from retrieval.errors import UserError

IMAGE_FIELDS = ("image", "images", "file")


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32  # images per forward pass; a larger request is split
    max_wait_ms: float = 5.0  # how long the first queued request waits for company
    max_k: int = 1000
    max_bytes: int = 20 * 2**20  # per request body, counted while reading
    max_json_bytes: int = 2**20  # a JSON body of paths (and k); vectors are bounded by max_bytes and max_images
    max_images: int = 64  # per request
    max_pixels: int = 4096 * 4096  # per image (width x height read from its header, after JPEG draft)
    max_request_pixels: int = 4 * 4096 * 4096  # summed over a request's images
    body_timeout_s: float = 30.0  # the whole body must arrive within this
    decoders: int = 2  # images decoded at a time (threads); bounds peak memory with max_pixels
    path_root: str | None = None  # JSON path queries read files under it; None: path queries are off
    token: str | None = None  # a bearer token every request must carry (None: open, for 127.0.0.1)
    watch_s: float = 2.0  # how often the index folder is checked for a new version (0: only POST /admin/reload)
    feedback_dir: str | None = None  # enables POST /feedback: the append-only judgement log's folder
    feedback_max_bytes: int = 2**30  # the log and its photos stay under it (507 past it)

    def __post_init__(self) -> None:
        positive = ("max_batch", "max_k", "max_bytes", "max_json_bytes", "max_images", "max_pixels", "decoders")
        positive += ("feedback_max_bytes",)
        rules = {f"{n} >= 1 (got {getattr(self, n)})": getattr(self, n) >= 1 for n in positive}
        rules[f"max_wait_ms >= 0 (got {self.max_wait_ms})"] = self.max_wait_ms >= 0
        rules[f"body_timeout_s > 0 (got {self.body_timeout_s})"] = self.body_timeout_s > 0
        rules[f"watch_s >= 0 (got {self.watch_s})"] = self.watch_s >= 0
        rules[f"max_request_pixels >= max_pixels (got {self.max_request_pixels})"] = (
            self.max_request_pixels >= self.max_pixels
        )
        broken = [rule for rule, holds in rules.items() if not holds]
        if broken:  # the flags are the same names with dashes (--max-batch): one line, before the model loads
            raise UserError(f"serve options: expected {'; '.join(broken)}")


@dataclass
class Query:
    """What a request asks: prepared model inputs (one per image), their names, and k."""

    inputs: list[torch.Tensor]
    names: list[str]
    k: Any


# ------------------------------------------------------------------------------------------------ the body


async def read_body(request: Request, options: ServeOptions, limit: int | None = None) -> bytes:
    """The body, at most ``limit`` bytes (default ``max_bytes``) counted as it arrives, within the deadline."""
    limit = limit or options.max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"request body of {declared} bytes: the limit is {limit} bytes")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    deadline = time.monotonic() + options.body_timeout_s
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - time.monotonic(), 0))
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"request body not received within {options.body_timeout_s:g} s") from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body over {limit} bytes (read so far: {size}): the limit is {limit}")
        chunks.append(chunk)


def replayed(request: Request, body: bytes) -> Request:
    """A request over the same scope whose body is ``body`` (already read and bounded): for the form parser."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


# ------------------------------------------------------------------------------------------------ images


def open_checked(data: bytes, name: str, spec: InputSpec, options: ServeOptions) -> Image.Image:
    """The image's header read (nothing decoded yet) and its pixels checked against the per-image budget; a JPEG
    over the budget set to decode at the largest reduced scale that fits it (module docstring)."""
    try:
        image = Image.open(io.BytesIO(data))
        need = math.ceil(spec.size / spec.crop_pct)  # the eval transform's resize of the short side
        if image.format == "JPEG":
            _draft_to_fit(image, need, options.max_pixels)
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{name}: {e}") from None
    except Exception as e:  # PIL raises many types for bad data: all mean "not an image"
        raise HTTPException(415, f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    width, height = image.size
    if width * height > options.max_pixels:
        raise HTTPException(
            413, f"{name}: {width} x {height} = {width * height} pixels; the limit per image is {options.max_pixels}"
        )
    resized = need * math.ceil(need * max(width, height) / max(min(width, height), 1))
    if resized > options.max_pixels:  # a 1 x 100000 strip is small, and enormous once its short side is `need`
        raise HTTPException(
            413,
            f"{name}: {width} x {height} resized for the model (short side {need}) holds {resized} pixels; "
            f"the limit per image is {options.max_pixels}",
        )
    return image


def _draft_to_fit(image: Image.Image, need: int, max_pixels: int) -> None:
    """Over ``max_pixels`` only: libjpeg's 1/2, 1/4 or 1/8 scale, the first that fits and keeps the short side
    >= ``need``. Within the budget a JPEG decodes at full size, as the catalogue's did (issue 29: a drafted decode
    moves a vector by up to 0.24 of cosine)."""
    width, height = image.size
    if width * height <= max_pixels:
        return
    for scale in (2, 4, 8):
        w, h = -(-width // scale), -(-height // scale)
        if w * h <= max_pixels and min(w, h) >= need:
            image.draft("RGB", (w, h))
            return


def decode(image: Image.Image, name: str, prepare: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Decode one checked image and turn it into the model's input (``Embedder.prepare``) at once."""
    try:
        with image:
            rgb = to_rgb(image)  # the catalogue's decoder: EXIF orientation, RGB
    except Exception as e:  # a header that reads and a body that does not: still "not an image"
        raise HTTPException(415, f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    return prepare(rgb)


async def prepare_all(
    blobs: list[bytes], names: list[str], spec: InputSpec, prepare, options: ServeOptions, limiter
) -> list[torch.Tensor]:
    """Every image's header first (budgets per image and per request), then decode ``decoders`` at a time."""
    images = [open_checked(b, n, spec, options) for b, n in zip(blobs, names, strict=True)]
    total = sum(im.size[0] * im.size[1] for im in images)
    if total > options.max_request_pixels:
        for im in images:
            im.close()
        raise HTTPException(
            413, f"{len(images)} images of {total} pixels in all; the limit per request is {options.max_request_pixels}"
        )
    return [
        await anyio.to_thread.run_sync(decode, im, n, prepare, limiter=limiter)
        for im, n in zip(images, names, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ bodies


def parse_json(body: bytes) -> Any:
    """A JSON body parsed, or a 400 (nesting beyond Python's parser depth included)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise HTTPException(400, 'JSON body: nested too deeply (expected {"path": ...} or {"paths": [...]})') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"JSON body: not valid JSON ({e})") from None


def json_paths(query: Any, options: ServeOptions) -> tuple[list[str], Any]:
    """``(paths, k)`` of a parsed JSON body, or a 4xx saying what was expected."""
    if not isinstance(query, dict) or not ("path" in query or "paths" in query):
        raise HTTPException(422, 'JSON body: expected {"path": "..."}, {"paths": ["...", ...]} or {"vectors": [[...]]}')
    paths = [query["path"]] if "path" in query else query["paths"]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise HTTPException(422, "JSON body: 'path' must be a string, 'paths' a non-empty list of strings")
    if len(paths) > options.max_images:
        raise _too_many(str(len(paths)), options)
    return paths, query.get("k")


def read_path(path: str, options: ServeOptions) -> bytes:
    """The bytes of a path query's file under ``path_root``; absent, not a file and outside answer alike."""
    if options.path_root is None:
        raise HTTPException(403, "path queries are off on this server (start it with --path-root DIR to allow them)")
    absent = HTTPException(404, f"path {path!r}: no such image under the served folder")
    try:
        resolved = Path(options.path_root, path).resolve()  # symlinks followed: a link out of the root is outside
        inside = resolved.is_relative_to(Path(options.path_root).resolve()) and resolved.is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long: no such file either
        inside = False
    if not inside:
        raise absent
    if resolved.stat().st_size > options.max_bytes:
        raise HTTPException(413, f"path {path!r}: over {options.max_bytes} bytes (the request body limit)")
    return resolved.read_bytes()


async def form_files(request: Request, body: bytes, options: ServeOptions) -> tuple[list[bytes], list[str]]:
    """The image files of a multipart body (at most ``max_images``), with their names."""
    try:
        form = await replayed(request, body).form(max_files=options.max_images, max_fields=16)
    except HTTPException as e:
        if "Too many files" in str(e.detail):  # starlette stops parsing there: no image was kept
            raise _too_many(f"more than {options.max_images}", options) from None
        raise HTTPException(400, f"multipart body: {e.detail}") from None
    files = [f for field in IMAGE_FIELDS for f in form.getlist(field) if hasattr(f, "read")]
    if not files:
        raise HTTPException(422, f"multipart body: expected one or more files in the field {IMAGE_FIELDS[0]!r}")
    names = [f.filename or f"image {i}" for i, f in enumerate(files)]
    blobs = [await f.read() for f in files]
    await form.close()
    return blobs, names


def _too_many(count: str, options: ServeOptions) -> HTTPException:
    return HTTPException(413, f"{count} images in one request; the limit is {options.max_images} (--max-images)")
