"""User feedback to training input: ``retrieval feedback export``.

    export_feedback(Path("feedback/"), Path("fb/"), index=IndexFolder.load("runs/sop/index"), images_root=Path("/data/sop"))

Reads the log (:class:`retrieval.search.feedback.FeedbackLog`; torn or corrupt lines skipped and counted) and writes
the folder ``out`` (as one unit) with:

- ``feedback.csv``: a manifest (``path,label,group``, absolute paths) that ``retrieval shards mix --new`` takes.
  A query photo judged "the same" as a result is added to that result's product (``result_class`` as the index had it
  when judged). With ``index`` (and ``images_root`` for catalogue paths that are relative, as shards record them), the
  catalogue photos of every judged product come too, so each product is a class of several images to train on.
- ``hard_negatives.tsv``: for a query with a confirmed product ``a``, each result of another product ``b`` judged "not
  the same" is the pair ``(a, b)``; ``data.hard_negatives`` of the next continued run forces such pairs into its
  P x K batches (:mod:`retrieval.data.negatives`).
- ``summary.json``: the counts, including what could not be used: judgements of a query with no confirmed product
  (its product is unknown: no class to train it as), queries confirmed as two products (conflicts, left out), catalogue
  photos not found.

The latest judgement of a (query photo, result) pair wins: a user may correct a click.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from retrieval import util
from retrieval.data.negatives import write_pairs
from retrieval.errors import UserError
from retrieval.index.folder import IndexFolder
from retrieval.search.feedback import FeedbackLog

log = logging.getLogger(__name__)

MANIFEST, NEGATIVES, SUMMARY = "feedback.csv", "hard_negatives.tsv", "summary.json"


def judged(entries: list[dict]) -> dict[str, list[dict]]:
    """Query photo -> its judgements, the latest per result."""
    latest: dict[tuple[str, int], dict] = {}
    for e in entries:
        latest[(e["query"], int(e["result_id"]))] = e
    per_query: dict[str, list[dict]] = defaultdict(list)
    for (query, _), e in latest.items():
        per_query[query].append(e)
    return per_query


def resolve(per_query: dict[str, list[dict]]) -> tuple[dict[str, tuple[int, int]], Counter, dict[str, int]]:
    """(query -> its confirmed (class, super class), hard-negative pair counts, what could not be used)."""
    confirmed, pairs = {}, Counter()
    counts = {"unconfirmed_negatives": 0, "conflicts": 0}
    for query, judgements in per_query.items():
        same = {(int(e["result_class"]), int(e.get("result_super", 0))) for e in judgements if e["same"]}
        if len(same) > 1:
            counts["conflicts"] += 1
            continue
        if not same:
            counts["unconfirmed_negatives"] += len(judgements)
            continue
        (cls, sup) = confirmed[query] = same.pop()
        for e in judgements:
            other = int(e["result_class"])
            if not e["same"] and other != cls:
                pairs[(min(cls, other), max(cls, other))] += 1
    return confirmed, pairs, counts


def catalogue_photos(index: IndexFolder, classes: set[int], images_root: Path | None) -> tuple[list[tuple], int]:
    """(path, class, super class) of the catalogue photos of ``classes`` that exist here, and how many do not."""
    cat, rows, missing = index.catalogue, [], 0
    if not cat.paths:
        return [], 0
    for i in (i for i, c in enumerate(cat.labels.tolist()) if c in classes):
        path = Path(cat.paths[i])
        if not path.is_absolute() and images_root is not None:
            path = images_root / path
        if path.is_absolute() and path.is_file():
            rows.append((str(path), int(cat.labels[i]), int(cat.super_labels[i])))
        else:
            missing += 1
    return rows, missing


def export_feedback(
    log_dir: Path, out: Path, index: IndexFolder | None = None, images_root: Path | None = None
) -> dict[str, Any]:
    """Write ``out`` (module docstring); returns the summary."""
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY).is_file():
        raise UserError(f"--out {out}: a folder that is no feedback export (no {SUMMARY}); it would be replaced whole")
    entries, bad = FeedbackLog.read(log_dir)
    if not entries:
        raise UserError(f"{log_dir}: the log holds no complete judgement ({bad} torn or corrupt lines)")
    confirmed, pairs, counts = resolve(judged(entries))
    rows = [(str((log_dir / q).resolve()), c, s) for q, (c, s) in confirmed.items()]
    classes = {c for c, _ in confirmed.values()} | {c for pair in pairs for c in pair}
    photos, missing = catalogue_photos(index, classes, images_root) if index is not None else ([], 0)
    summary = {
        "judgements": len(entries),
        "skipped_lines": bad,
        "confirmed_queries": len(confirmed),
        "products": len(classes),
        "hard_negative_pairs": len(pairs),
        "catalogue_photos": len(photos),
        "catalogue_photos_missing": missing,
        **counts,
    }
    buffer = io.StringIO()
    csv.writer(buffer).writerows([("path", "label", "group"), *rows, *photos])
    try:
        with util.new_version(out) as stage:
            util.write_atomic(stage / MANIFEST, buffer.getvalue())
            write_pairs(stage / NEGATIVES, dict(pairs))
            util.write_atomic(stage / SUMMARY, json.dumps(summary, indent=1) + "\n")
    except util.Busy as e:
        raise UserError(f"{out} is being written by another export (pid {e.holder})") from None
    log.info("feedback export: %s", summary)
    return summary
