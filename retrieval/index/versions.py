"""The versions of an index folder, as ``index.json`` records them: a number that only grows, and what each changed.

Every write of an index folder (``index build``, ``index add``, ``index remove``) is a new version: the previous
versions' records are kept and one is appended ``{version, change, created, count, build_id, ...}`` (a build names
its embeddings, an add its embeddings and how many rows it added or replaced, a remove how many rows it took out).
A rebuild into the same folder continues the numbering, so a service can tell a newer index from an older one.

What the updates cost in recall is recorded here too (:func:`drift`): rows added after an IVF/PQ quantizer was
trained go to the lists trained on the build's sample, removals from an HNSW graph are tombstones (Faiss cannot
delete from it), and ``--factory auto`` tuned nprobe/efSearch at the build's size. Past :data:`REBUILD_SHARE` of the
rows, ``index.json`` says that a rebuild restores the tuned recall.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INFO_FILE = "index.json"
# rows changed since the build (added after training, tombstoned, or either against auto's tuning), as a share of
# the index's rows, past which index.json advises a rebuild
REBUILD_SHARE = 0.3


def previous_versions(folder: Path) -> list[dict[str, Any]]:
    """The version records of the index now in ``folder`` ([] when there is none, or it predates versions)."""
    try:
        info = json.loads((Path(folder) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return []
    versions = info.get("versions") if isinstance(info, dict) else None
    if isinstance(versions, list) and versions:
        return versions
    return [{"version": 1, "change": "build", "build_id": info.get("build_id")}] if isinstance(info, dict) else []


def append_version(info: dict[str, Any], previous: list[dict], change: dict[str, Any]) -> dict[str, Any]:
    """``info`` with ``version`` (one past the last) and ``versions`` (the previous ones and ``change``) set."""
    number = int(previous[-1].get("version", len(previous))) + 1 if previous else 1
    record = {"version": number, **change, "count": info["count"], "created": info["created"]}
    record["build_id"] = info["build_id"]
    return {**info, "version": number, "versions": [*previous, record]}


def drift(info: dict[str, Any]) -> str | None:
    """Why a rebuild would restore the tuned recall, or None: the rows added since the quantizer was trained, the
    tombstones, or (auto) the rows changed since the tuning, past :data:`REBUILD_SHARE` of the index's rows."""
    count = max(int(info.get("count", 0)), 1)
    since = info.get("since_build", {})
    changed = int(since.get("added", 0)) + int(since.get("removed", 0))
    reasons = [
        (int(info.get("added_after_training", 0)), "rows were added after the quantizer was trained"),
        (int(info.get("tombstones", 0)), "rows are removed but still in the HNSW graph (filtered at search time)"),
        (changed if info.get("auto") else 0, "rows changed since nprobe/efSearch were tuned (--factory auto)"),
    ]
    for n, what in reasons:
        if n / count > REBUILD_SHARE:
            return (
                f"{n} {what}: {n / count:.0%} of {count} rows, past {REBUILD_SHARE:.0%}; "
                "`retrieval index build` over the current rows restores the tuned recall"
            )
    return None
