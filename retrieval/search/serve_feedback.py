"""``POST /feedback`` of the service: a user's judgement of one result, recorded in the feedback log.

    curl -F image=@query.jpg -F result_id=17 -F same=false http://127.0.0.1:8080/feedback
    curl -H 'Content-Type: application/json' -d '{"path": "/data/q.jpg", "result_id": 17, "same": true}' \
        http://127.0.0.1:8080/feedback

The query photo comes as a multipart file (field ``image``) or a JSON ``path`` on the server (under
``--path-root``, as for ``/search``); ``result_id`` must be an image id of the index version answered from now,
``same`` a boolean (multipart: true/false, 1/0, yes/no). The request is read under the service's bounds (body bytes
and time, JSON size, the photo's pixels from its header: :mod:`retrieval.search.serve_request`). The judged image's
product (``result_class``) and the index version are recorded with it, so the export does not depend on later
versions. Answers 201 with the entry; a malformed judgement 4xx naming the field (415: not an image, 404: an id the
index does not hold), a full log 507.
"""

from __future__ import annotations

from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from retrieval.search import serve_request as rq
from retrieval.search.feedback import FeedbackLog, LogFull
from retrieval.search.live import LiveIndex, version_of
from retrieval.search.serve_request import ServeOptions

TRUE, FALSE = ("true", "1", "yes", "same"), ("false", "0", "no", "not the same")


def _format(data: bytes, name: str, spec, options: ServeOptions) -> str:
    """The photo's format, its header read and its pixels checked (the search bounds), then decoded whole: or 4xx."""
    image = rq.open_checked(data, name, spec, options)
    try:
        with image:
            image.load()
            return str(image.format or "img")
    except Exception as e:  # a header that reads and a body that does not: still "not an image"
        raise HTTPException(415, f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def _same(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise HTTPException(422, f"same: expected true or false, got {value!r}")


def _result_id(value: Any) -> int:
    try:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise HTTPException(422, f"result_id: expected an integer image id, got {value!r}") from None


async def _read(request: Request, options: ServeOptions, limiter) -> tuple[bytes, str, Any, Any]:
    """(photo bytes, its name, result_id, same) of a JSON or multipart judgement."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        body = rq.parse_json(await rq.read_body(request, options, options.max_json_bytes))
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise HTTPException(422, 'JSON body: expected {"path": "...", "result_id": ID, "same": true|false}')
        photo = await anyio.to_thread.run_sync(rq.read_path, body["path"], options, limiter=limiter)
        return photo, body["path"], body.get("result_id"), body.get("same")
    if kind != "multipart/form-data":
        raise HTTPException(415, "expected multipart (image, result_id, same) or JSON (path, result_id, same)")
    body = await rq.read_body(request, options)
    try:
        form = await rq.replayed(request, body).form(max_files=1, max_fields=8)
    except HTTPException as e:
        raise HTTPException(400, f"multipart body: {e.detail}") from None
    image = form.get("image")
    if image is None or not hasattr(image, "read"):
        raise HTTPException(422, "multipart body: expected the query photo in the field 'image'")
    photo = await image.read()
    fields = form.get("result_id"), form.get("same")
    await form.close()
    return photo, image.filename or "image", *fields


def feedback_route(live: LiveIndex, log: FeedbackLog, options: ServeOptions, limits: dict):
    """The handler of ``POST /feedback`` over the service's live index and its feedback log (``limits``: the
    service's decoder limiter, made when it starts)."""

    async def feedback(request: Request) -> JSONResponse:
        photo, name, result_id, same = await _read(request, options, limits["decoders"])
        result_id, same = _result_id(result_id), _same(same)
        spec = live.searcher.embedder.spec
        image_format = await anyio.to_thread.run_sync(_format, photo, name, spec, options, limiter=limits["decoders"])
        index = live.current  # the version judged: the result's product as this version has it
        row = int(index.rows([result_id])[0])
        if row < 0:
            raise HTTPException(404, f"result_id {result_id}: not an image of the index (version {version_of(index)})")
        cat = index.catalogue
        fields = {"query_name": name, "result_id": result_id, "same": same, "result_class": int(cat.labels[row])}
        fields.update(result_super=int(cat.super_labels[row]), index_version=version_of(index)["version"])
        fields["index_build_id"] = index.info.get("build_id")
        try:
            entry = await anyio.to_thread.run_sync(log.record, photo, image_format, fields)
        except LogFull as e:
            raise HTTPException(507, f"feedback log full: {e}") from None
        return JSONResponse({"recorded": entry}, status_code=201)

    return feedback
