"""Hard negatives: pairs of classes users said are NOT the same product, and how a continued run uses them.

The file (``hard_negatives.tsv``, written by ``retrieval feedback export``, read by ``data.hard_negatives``)::

    # class_a<TAB>class_b<TAB>judgements       (a query of product a was shown product b: "not the same")
    1203	877	2

The P x K planner (:mod:`retrieval.data.pk`) forces them into batches: when a worker's pool of classes
(``data.class_pool``) holds both classes of a pair, a batch that draws one draws the other too, and every batch
holds at least one such pair while the pool has any (at most half of a batch's P classes are forced; the rest stay
random). The loss then sees the confusion the users saw as an in-batch negative pair, mined like any other. A pair
whose classes sit in different workers' shards is not seen together: raise ``data.class_pool`` (or use fewer
shards) so that a worker's pool holds a small training set whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from retrieval.errors import UserError
from retrieval.util import write_atomic

HEADER = "# class_a\tclass_b\tjudgements"


def write_pairs(path: str | Path, pairs: dict[tuple[int, int], int]) -> Path:
    """``{(a, b): judgements}`` to ``path`` (one unordered pair a line, a < b, sorted), atomically."""
    lines = [HEADER] + [f"{a}\t{b}\t{n}" for (a, b), n in sorted(pairs.items())]
    return write_atomic(path, "\n".join(lines) + "\n")


def read_pairs(path: str | Path) -> dict[int, tuple[int, ...]]:
    """Each class of the file -> the classes it must meet in a batch (symmetric); one line naming a bad line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.hard_negatives: {path} not found (written by `retrieval feedback export`)")
    partners: dict[int, set[int]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        try:
            a, b = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            raise UserError(f"{path}:{lineno}: expected two class ids (a pair), got {line.strip()!r}") from None
        if a != b:
            partners.setdefault(a, set()).add(b)
            partners.setdefault(b, set()).add(a)
    return {a: tuple(sorted(b)) for a, b in partners.items()}


def count_pairs(partners: dict[int, Iterable[int]]) -> int:
    return sum(len(tuple(b)) for b in partners.values()) // 2
