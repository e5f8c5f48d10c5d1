"""The index a running service answers from, swapped for a new version of its folder without a restart.

    live = LiveIndex(searcher)              # the version the Searcher loaded
    live.changed()                          # the folder was switched to another version since (its inode moved)
    live.reload()                           # load the folder whole, check it, then swap: {"version", ...}
    index = live.current                    # one version: take it once per batch and answer the batch from it

``retrieval index add|remove|build`` replace the folder with one rename (:func:`retrieval.util.switch_folder`), so
its identity (device, inode) names the version on disk. The service watches it (``--watch-s``) or is told
(``POST /admin/reload``); the new version is loaded and checked beside the old one (twice the index's memory for
the moment), refused if it was built from another model's embeddings (its weights' sha256 is not the service's
model's), and then made current by one reference assignment. A batch takes ``current`` once and answers every one
of its queries from that version, naming it: an answer is never mixed, and no request fails because of a swap. A
version that is refused or unreadable leaves the service on the version it has, with the reason in ``/healthz``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from retrieval import util
from retrieval.errors import UserError
from retrieval.index.folder import IndexFolder
from retrieval.search.searcher import Searcher

log = logging.getLogger(__name__)


def version_of(index: IndexFolder) -> dict[str, Any]:
    """What names a version in answers and ``/healthz``: its number, build id, rows."""
    info = index.info
    return {"version": int(info.get("version", 1)), "build_id": info.get("build_id"), "count": int(info["count"])}


class LiveIndex:
    """The current :class:`IndexFolder` of a service and how it is replaced (module docstring)."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self.folder = Path(searcher.index.path)
        self.current: IndexFolder = searcher.index
        self.model = _model_of(searcher.index)  # what every later version must have been embedded with
        self._seen = util.folder_identity(self.folder)  # the folder as last loaded or last refused
        self._lock = threading.Lock()  # one reload at a time (the watch and the admin endpoint)
        self.last_error: str | None = None
        self.reloads = 0

    def changed(self) -> bool:
        return util.folder_identity(self.folder) != self._seen

    def reload(self) -> dict[str, Any]:
        """Load the folder as it is now and make it current unless refused (:class:`UserError`); returns the version
        now answered from and whether it changed."""
        with self._lock:
            seen = util.folder_identity(self.folder)
            try:
                index = self._checked(IndexFolder.load(self.folder))
            except (UserError, RuntimeError, OSError) as e:  # Faiss raises RuntimeError, a vanished file OSError
                self._seen, self.last_error = seen, f"{time.strftime('%H:%M:%S')} refused: {e}"
                log.error("index %s: new version refused, still answering from version %s: %s",
                          self.folder, version_of(self.current)["version"], e)  # fmt: skip
                raise UserError(str(e)) from None
            self._seen, self.last_error = seen, None
            same = index.info.get("build_id") == self.current.info.get("build_id")
            if not same:
                self.current = index  # one assignment: a batch holds the old version or this one, whole
                self.reloads += 1
                log.info("index %s: now answering from version %s", self.folder, version_of(index))
            return {**version_of(self.current), "changed": not same}

    def _checked(self, index: IndexFolder) -> IndexFolder:
        theirs = _model_of(index)
        if theirs != self.model:
            raise UserError(
                f"{self.folder}/index.json: version {index.info.get('version')} was built from embeddings of another "
                f"model ({index.info.get('model')!r}, weights sha256 {str(theirs[0])[:12]}; the service answers with "
                f"{self.searcher.index.info.get('model')!r}, sha256 {str(self.model[0])[:12]}): restart the service "
                "with that model"
            )
        return index


def _model_of(index: IndexFolder) -> tuple[str | None, str | None]:
    """The weights an index's embeddings came from: their sha256 (the model's path only where none was recorded,
    as for an untrained model's starting weights)."""
    sha = index.info.get("model_sha256")
    return (sha, None) if sha else (None, index.info.get("model"))
