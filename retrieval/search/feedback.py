"""User feedback on search results: the append-only log that ``retrieval serve --feedback-dir`` writes.

    log = FeedbackLog("feedback/", max_bytes=2**30)   # the service's one writer (the folder's lock)
    entry = log.record(photo_bytes, "jpeg", {"result_id": 17, "same": False, ...})
    entries, problems = FeedbackLog.read("feedback/")  # `retrieval feedback export`

The folder::

    feedback.jsonl       one judgement a line: time, query (the photo's file), query_name, result_id, same,
                         result_class / result_super (the judged image's product, as the index had it),
                         index_version, index_build_id, crc32 (of the line's other fields)
    images/SHA256.EXT    the query photos, content-addressed (a photo judged twice is stored once)
    .lock                one writer at a time

Never corrupted by a kill: a photo is written atomically (:func:`retrieval.util.write_atomic`) before the line that
names it, and a line is one ``write`` to a file opened ``O_APPEND``, synced. A kill can leave at most a torn last line
(no newline, or a checksum that does not match); the reader skips it and the next writer cuts it off before
appending, so every complete judgement survives and no line is ever half read. Bounded: the log and its photos
together stay under ``max_bytes``; past it a judgement is refused (:class:`LogFull`, the service answers 507) until
the log is exported and a new folder given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import zlib
from pathlib import Path
from typing import Any

from retrieval import util
from retrieval.errors import UserError

LOG, IMAGES, LOCK = "feedback.jsonl", "images", ".lock"
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}


class LogFull(Exception):
    """The log and its photos would pass the folder's bound."""


def _crc(fields: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(fields, sort_keys=True).encode())


class FeedbackLog:
    """The writer: holds the folder's lock for its life (a second service on the folder is refused)."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = Path(folder), max_bytes
        (self.folder / IMAGES).mkdir(parents=True, exist_ok=True)
        try:
            self._lock = util.lock(self.folder / LOCK)
        except util.Busy as e:
            raise UserError(f"--feedback-dir {self.folder}: in use by another service (pid {e.holder})") from None
        self._cut_torn_tail()
        self._fd = os.open(self.folder / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, util.file_mode())
        self._mutex = threading.Lock()  # the service records from its thread pool
        self.size = sum(p.stat().st_size for p in (self.folder / IMAGES).iterdir()) + os.fstat(self._fd).st_size

    def _cut_torn_tail(self) -> None:
        """A kill mid-append left a last line without its newline: cut it, so the next line starts clean."""
        path = self.folder / LOG
        if not path.is_file() or not path.stat().st_size:
            return
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)

    def close(self) -> None:
        os.close(self._fd)
        util.unlock(self._lock)

    def record(self, photo: bytes, image_format: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Store ``photo`` (once per content) and append one judgement naming it; returns the line's fields."""
        digest = hashlib.sha256(photo).hexdigest()
        name = f"{IMAGES}/{digest}.{EXTENSIONS.get(image_format.upper(), 'img')}"
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        entry = {"time": now, "query": name, **fields}
        line = (json.dumps({**entry, "crc32": _crc(entry)}) + "\n").encode()
        with self._mutex:
            new_photo = not (self.folder / name).is_file()
            grow = len(line) + (len(photo) if new_photo else 0)
            if self.size + grow > self.max_bytes:
                raise LogFull(f"{self.folder}: {self.size} of {self.max_bytes} bytes used; export it, start a new one")
            if new_photo:
                util.write_atomic(self.folder / name, photo)  # before the line that names it
            os.write(self._fd, line)  # one write of a whole line, O_APPEND: never interleaved, never half a line
            os.fsync(self._fd)
            self.size += grow
        return entry

    @staticmethod
    def read(folder: str | Path) -> tuple[list[dict[str, Any]], int]:
        """The complete judgements of a log folder, in order, and how many lines were torn or corrupt (skipped)."""
        path = Path(folder) / LOG
        if not path.is_file():
            raise UserError(f"{folder}: no {LOG} (expected a folder given to `retrieval serve --feedback-dir`)")
        entries, bad = [], 0
        for line in path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                crc = record.pop("crc32")
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
                continue
            if crc != _crc(record) or not (Path(folder) / str(record.get("query"))).is_file():
                bad += 1
                continue
            entries.append(record)
        return entries, bad
