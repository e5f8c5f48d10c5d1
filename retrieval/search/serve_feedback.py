"""``POST /feedback`` of the service: a user's judgement of one result, recorded in the feedback log.

    curl -F image=@query.jpg -F result_id=17 -F same=false http://127.0.0.1:8080/feedback
    curl -H 'Content-Type: application/json' -d '{"path": "/data/q.jpg", "result_id": 17, "same": true}' \
        http://127.0.0.1:8080/feedback

The query photo comes as a multipart file (field ``image``) or a JSON ``path`` on the server (under
``--path-root``, as for ``/search``); ``result_id`` must be an image id of the index version answered from now,
``same`` a boolean (multipart: true/false, 1/0, yes/no). The judged image's product (``result_class``) and the index
version are recorded with it, so the export does not depend on later versions. Answers 201 with the entry; a
malformed judgement 4xx naming the field (415: not an image, 404: an id the index does not hold), a full log 507.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from retrieval.search.feedback import FeedbackLog, LogFull
from retrieval.search.live import LiveIndex, version_of

TRUE, FALSE = ("true", "1", "yes", "same"), ("false", "0", "no", "not the same")


def _format(data: bytes, name: str) -> str:
    """The image format of ``data`` (checked by decoding it whole), or 415."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return str(im.format or "img")
    except Exception as e:  # PIL raises many types for bad data: all mean "not an image"
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


async def _read(request: Request, path_root: str | None) -> tuple[bytes, str, Any, Any]:
    """(photo bytes, its name, result_id, same) of a JSON or multipart judgement."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPException(400, f"JSON body: not valid JSON ({e})") from None
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise HTTPException(422, 'JSON body: expected {"path": "...", "result_id": ID, "same": true|false}')
        photo = await run_in_threadpool(_read_path, body["path"], path_root)
        return photo, body["path"], body.get("result_id"), body.get("same")
    if kind != "multipart/form-data":
        raise HTTPException(415, "expected multipart (image, result_id, same) or JSON (path, result_id, same)")
    form = await request.form()
    image = form.get("image")
    if image is None or not hasattr(image, "read"):
        raise HTTPException(422, "multipart body: expected the query photo in the field 'image'")
    return await image.read(), image.filename or "image", form.get("result_id"), form.get("same")


def _read_path(path: str, root: str | None) -> bytes:
    resolved = Path(path).resolve()
    if root is not None and not resolved.is_relative_to(Path(root).resolve()):
        raise HTTPException(403, f"path {path!r}: outside the served folder (--path-root)")
    if not resolved.is_file():
        raise HTTPException(404, f"path {path!r}: no such file on the server")
    return resolved.read_bytes()


def feedback_route(live: LiveIndex, log: FeedbackLog, path_root: str | None, max_bytes: int):
    """The handler of ``POST /feedback`` over the service's live index and its feedback log."""

    async def feedback(request: Request) -> JSONResponse:
        length = int(request.headers.get("content-length") or 0)
        if length > max_bytes:
            raise HTTPException(413, f"request body of {length} bytes: the limit is {max_bytes}")
        photo, name, result_id, same = await _read(request, path_root)
        result_id, same = _result_id(result_id), _same(same)
        image_format = await run_in_threadpool(_format, photo, name)
        index = live.current  # the version judged: the result's product as this version has it
        row = int(index.rows([result_id])[0])
        if row < 0:
            raise HTTPException(404, f"result_id {result_id}: not an image of the index (version {version_of(index)})")
        cat = index.catalogue
        fields = {"query_name": name, "result_id": result_id, "same": same, "result_class": int(cat.labels[row])}
        fields.update(result_super=int(cat.super_labels[row]), index_version=version_of(index)["version"])
        fields["index_build_id"] = index.info.get("build_id")
        try:
            entry = await run_in_threadpool(log.record, photo, image_format, fields)
        except LogFull as e:
            raise HTTPException(507, f"feedback log full: {e}") from None
        return JSONResponse({"recorded": entry}, status_code=201)

    return feedback
