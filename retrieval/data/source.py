"""Where shards come from: ``data.shards`` / ``--shards`` as a local folder, a URL prefix, or WebDataset URLs.

Accepted sources (the same for train, validation and ``embed``):

* a local folder ``DIR``: ``DIR/{split}-*.tar`` (the builder's layout), or the URLs a ``stats.json``
  written by ``retrieval shards index`` lists for the split (the folder is then only an index);
* a URL prefix ending in ``/`` (``https://host/sop/``): shard names from ``PREFIX/stats.json``;
* WebDataset URLs: one brace pattern or several joined by ``::``, each a local path, an ``http(s)://``
  URL or a ``pipe:`` command (webdataset's convention for S3/GCS:
  ``pipe:aws s3 cp s3://bucket/sop/train-{000000..000099}.tar -``). A split takes the URLs whose tar
  name starts with ``{split}-``; ``stats.json``/``sizes.json`` are read from the same prefix (the
  first URL with its tar name replaced) when present.

``stats.json`` per split: ``samples``, ``classes``, ``shard_samples`` (name -> count); an index adds
``urls`` (the split's shards), ``label_key`` and ``grouped`` (whether every class is one contiguous
run in one shard, as the builder writes them; when not, the P×K planner buffers classes).

Trust: a ``pipe:`` URL runs a shell command, and webdataset's other schemes (``gs://``, ``s3://``, ``hf://``,
``ais://``, ...) run a program. Only what the user typed (``--shards``, ``data.shards``) may be such a URL. URLs
read from a data file (the ``urls`` of a ``stats.json``, the shard names of a remote prefix's ``stats.json``) are
resolved against where that file was read and must be local paths or ``http(s)`` URLs (from a remote
``stats.json``: ``http(s)`` only); anything else is a :class:`UserError` unless the user opts in
(``data.allow_listed_commands``, ``embed --allow-listed-commands``) for an index they wrote themselves.

Remote shards (anything but a local path) are read whole into memory with retries and exponential
backoff (``RETRIEVAL_FETCH_ATTEMPTS``, default 5; 0.5 s doubling to 8 s); a URL that stays unreachable
is a :class:`UserError` naming it, never a silently smaller epoch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from braceexpand import braceexpand

from retrieval.errors import UserError

log = logging.getLogger(__name__)

_TAR_NAME = re.compile(r"([^/\s'\"]+\.tar)")
FETCH_TIMEOUT_S = 120


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url and not url.startswith("file://")


def runs_program(url: str) -> bool:
    """Whether reading ``url`` runs a command: ``pipe:`` (a shell) or a scheme webdataset opens with a tool."""
    return url.startswith("pipe:") or is_remote(url) and not url.startswith(("http://", "https://"))


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def tar_name(url: str) -> str:
    """The shard's file name inside a path, URL or ``pipe:`` command (the last ``*.tar`` token)."""
    found = _TAR_NAME.findall(url)
    if not found:
        raise UserError(f"{url!r}: no '*.tar' name in this shard URL")
    return found[-1]


def expand(patterns: str) -> list[str]:
    """``a-{000..002}.tar::b.tar`` -> the URLs, in order (webdataset's brace and ``::`` conventions)."""
    return [u for p in patterns.split("::") if p.strip() for u in braceexpand(p.strip())]


def _kind(source: str) -> str:
    source = str(source)
    if not is_remote(source) and ".tar" not in source:
        return "folder"
    if not source.startswith("pipe:") and source.endswith("/"):
        return "prefix"
    return "urls"


def _sibling(source: str, name: str) -> str:
    """The URL of file ``name`` beside the source's shards (same folder, prefix or command)."""
    kind = _kind(source)
    if kind == "folder":
        return str(Path(source) / name)
    if kind == "prefix":
        return source + name
    first = expand(source)[0]
    i = first.rindex(tar_name(first))
    return first[:i] + name + first[i + len(tar_name(first)) :]


# ------------------------------------------------------------------------------------------ reading bytes


def _fetch_once(url: str) -> bytes:
    if url.startswith("pipe:"):
        proc = subprocess.run(url[5:], shell=True, capture_output=True, timeout=FETCH_TIMEOUT_S)
        if proc.returncode != 0:
            raise OSError(f"command exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:].strip()}")
        return proc.stdout
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as r:
            return r.read()
    import webdataset as wds  # other schemes (gs://, hf://, ais://) through webdataset's own openers

    with wds.gopen(url) as f:
        return f.read()


def fetch(url: str, attempts: int | None = None) -> bytes:
    """All bytes of a remote URL, retried with exponential backoff; a UserError when it stays unreachable."""
    attempts = attempts or int(os.environ.get("RETRIEVAL_FETCH_ATTEMPTS", "5"))
    delay, last = 0.5, None
    for attempt in range(1, attempts + 1):
        try:
            return _fetch_once(url)
        except (OSError, ValueError, subprocess.SubprocessError) as e:  # URLError and HTTPError are OSErrors
            last = e
            if attempt < attempts:
                log.warning("%s: attempt %d/%d failed (%s); retrying in %.1f s", url, attempt, attempts, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
    raise UserError(f"{url}: unreachable after {attempts} attempts ({last}); check the URL, network and credentials")


def open_shard(url: str) -> IO[bytes]:
    """A readable binary stream of one shard: a local file, or the remote bytes fetched (with retries)."""
    if is_remote(url):
        return io.BytesIO(fetch(url))
    return open(_local(url), "rb")


# ------------------------------------------------------------------------------------------ stats and urls


def _read_optional(url: str) -> bytes | None:
    if not is_remote(url):
        path = Path(_local(url))
        return path.read_bytes() if path.is_file() else None
    try:
        return _fetch_once(url)  # absent is an answer here, not a failure to retry
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def find_stats(source: str | Path) -> dict | None:
    """The source's ``stats.json`` as a dict, or None when there is none."""
    url = _sibling(str(source), "stats.json")
    raw = _read_optional(url)
    if raw is None:
        return None
    try:
        stats = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{url}: not valid JSON ({e}); rebuild the shards or rerun `retrieval shards index`") from None
    if not isinstance(stats, dict):
        raise UserError(f"{url}: expected a JSON object with per-split entries, got {type(stats).__name__}")
    return stats


def read_stats(source: str | Path) -> dict:
    """``stats.json`` of the source (``retrieval shards build`` or ``retrieval shards index`` wrote it)."""
    kind = _kind(str(source))
    if kind == "folder" and not Path(source).is_dir():
        raise UserError(
            f"shards folder {str(source)!r} does not exist (no stats.json); build it with `retrieval shards build`"
        )
    stats = find_stats(source)
    if stats is None:
        raise UserError(
            f"{_sibling(str(source), 'stats.json')}: not found; build shards first (`retrieval shards build ... "
            f"--out DIR`) or index these shards once (`retrieval shards index SOURCE --out DIR`, then --shards DIR)"
        )
    return stats


def split_entry(source: str | Path, split: str) -> dict:
    """The split's stats entry, or {} when the source has no stats.json (or no such split in it)."""
    entry = (find_stats(source) or {}).get(split, {})
    return entry if isinstance(entry, dict) else {}


def shard_urls(source: str | Path, split: str, entry: dict | None = None, allow_commands: bool = False) -> list[str]:
    """The split's shard URLs, in a fixed order (see the module docstring for the accepted sources).

    ``allow_commands``: let the URLs a ``stats.json`` lists run programs (``pipe:``, ``gs://``, ...): the user's
    explicit opt-in (``data.allow_listed_commands``); without it they are refused (the module's "Trust")."""
    source = str(source)
    kind = _kind(source)
    if kind == "folder" and not Path(source).is_dir():
        raise UserError(f"shards folder {source!r} does not exist; build it with `retrieval shards build`")
    entry = split_entry(source, split) if entry is None else entry
    if entry.get("urls"):
        stats_url = _sibling(source, "stats.json")
        return [_listed(u, stats_url, split, allow_commands) for u in entry["urls"]]
    if kind == "folder":
        urls = sorted(str(p) for p in Path(source).glob(f"{split}-*.tar"))
    elif kind == "prefix":
        urls = [source + _plain_name(name, source) for name in sorted(entry.get("shard_samples", {}))]
    else:
        urls = [u for u in expand(source) if tar_name(u).startswith(f"{split}-")]
    if not urls:
        raise UserError(f"{source}: no shards for split {split!r} (expected {split}-000000.tar, ...)")
    return urls


def _listed(url: object, stats_url: str, split: str, allow_commands: bool) -> str:
    """One URL a ``stats.json`` lists, resolved against where that file was read; refused when it would run a
    program (unless ``allow_commands``) or, listed by a remote file, when it is not ``http(s)``."""
    if not isinstance(url, str) or not url:
        raise UserError(f"{stats_url}: split {split!r} lists {url!r} as a shard URL; expected a path or URL string")
    if stats_url.startswith(("http://", "https://")):
        url = urllib.parse.urljoin(stats_url, url)  # relative names are the server's, never this machine's files
    elif not is_remote(url) and not is_remote(stats_url) and not Path(_local(url)).is_absolute():
        url = str(Path(_local(stats_url)).parent / _local(url))
    if runs_program(url) and not allow_commands:
        raise UserError(
            f"{stats_url}: split {split!r} lists the shard URL {url[:120]!r}, which runs a program when read; a URL "
            "read from a data file may only be a local path or an http(s) URL. If you wrote this index yourself, "
            "allow it with data.allow_listed_commands=true (`retrieval embed --allow-listed-commands`)"
        )
    if is_remote(stats_url) and not is_remote(url) and not allow_commands:
        raise UserError(
            f"{stats_url}: split {split!r} lists {url[:120]!r}, a path on this machine; a remote stats.json may "
            "only list http(s) URLs"
        )
    return url


def _plain_name(name: str, source: str) -> str:
    """A shard name a remote prefix's ``stats.json`` lists: appended to the prefix, so a plain file name only."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UserError(
            f"{source}stats.json: shard name {name[:120]!r} is not a plain file name (letters, digits, _.-)"
        )
    return name
