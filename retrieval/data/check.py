"""The shards on disk against what ``stats.json``/``sizes.json`` say they are: no silent partial data.

A missing shard, a shard that is not listed, or one whose size differs from the builder's record (truncated,
replaced, still being copied) would otherwise train or validate on part of a split without a word. Checked before
training, validation and ``embed`` start; ``data.allow_incomplete=true`` turns the error into a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from retrieval.errors import UserError

log = logging.getLogger(__name__)


def split_problems(shards_dir: str | Path, split: str, stats: dict) -> list[str]:
    """What is wrong with ``split``'s shards compared with ``stats.json`` (empty: complete)."""
    root = Path(shards_dir)
    entry = stats.get(split)
    if not isinstance(entry, dict):
        return [f"stats.json has no split {split!r} (found {sorted(k for k in stats if k != 'config')})"]
    if entry.get("urls"):  # `retrieval shards index` of a corpus kept elsewhere: its shards are its URLs
        return _url_problems(list(entry["urls"]))
    if not root.is_dir():  # a URL prefix, brace list or pipe: source: reads retry, and the counts are checked
        return []
    expected = dict(entry.get("shard_samples") or {})
    on_disk = {p.name: p for p in root.glob(f"{split}-*.tar")}
    problems = []
    missing = sorted(set(expected) - set(on_disk))
    if missing:
        problems.append(f"{len(missing)} shard(s) listed in stats.json are missing ({_few(missing)})")
    extra = sorted(set(on_disk) - set(expected)) if expected else []
    if extra:
        problems.append(f"{len(extra)} shard(s) are not listed in stats.json ({_few(extra)})")
    per_shard = entry.get("shard_bytes") or {}
    wrong = [n for n, size in sorted(per_shard.items()) if n in on_disk and on_disk[n].stat().st_size != size]
    if wrong:
        problems.append(f"{len(wrong)} shard(s) differ in size from the builder's record ({_few(wrong)})")
    elif not per_shard and not missing and not extra and "bytes" in entry:
        total = sum(p.stat().st_size for p in on_disk.values())
        if total != int(entry["bytes"]):
            problems.append(
                f"the shards hold {total} bytes, stats.json records {entry['bytes']} (truncated or replaced)"
            )
    return problems


def _url_problems(urls: list[str]) -> list[str]:
    """Local shard files an index lists that are gone (remote URLs are checked when read, with retries)."""
    local = [u.removeprefix("file://") for u in urls if "://" not in u.removeprefix("file://") and ":" not in u[:6]]
    missing = [u for u in local if not Path(u).is_file()]
    return [f"{len(missing)} shard(s) listed in stats.json are missing ({_few(missing)})"] if missing else []


def check_split(shards_dir: str | Path, split: str, stats: dict, allow_incomplete: bool = False) -> None:
    """Raise a one-line :class:`UserError` if ``split`` is incomplete (a warning with ``allow_incomplete``)."""
    problems = split_problems(shards_dir, split, stats)
    if not problems:
        return
    message = f"{shards_dir}: split {split!r} is incomplete: {'; '.join(problems)}"
    if allow_incomplete:
        log.warning("%s (data.allow_incomplete=true: using what is there)", message)
        return
    raise UserError(f"{message}; rebuild the shards (`retrieval shards build`) or set data.allow_incomplete=true")


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")
