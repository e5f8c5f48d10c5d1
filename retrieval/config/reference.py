"""The configuration reference, generated from the dataclasses of :mod:`retrieval.config` (the README's table;
``tests/test_readme.py`` keeps the two equal)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import fields
from typing import Any

from retrieval.config.schema import Config


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comment`` of each field in the class source: the one place the fields are documented."""
    comments: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        more = re.match(r"\s+#\s*(.*)$", line)
        if m:
            last = m.group(1)
            comments[last] = m.group(2).strip()
        elif more and last:  # a comment-only line right after a field continues its comment
            comments[last] += " " + more.group(1).strip()
        else:
            last = None
    return comments


def field_docs() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, comment) for every leaf field; the README's reference is generated from it."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(cls: type, obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        notes = _field_comments(cls)
        for f in fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], value, f"{prefix}{f.name}.")
            else:
                type_name = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
                rows.append((f"{prefix}{f.name}", type_name, repr(value), notes.get(f.name, "")))

    walk(Config, Config(), "")
    return rows


def reference_markdown() -> str:
    """The README's configuration reference table (a test keeps the README equal to this)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, note in field_docs():
        lines.append(f"| `{key}` | {tp.replace('|', 'or')} | `{default}` | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
