"""``retrieval shards index``: scan a foreign WebDataset corpus once and write its ``stats.json``/``sizes.json``.

    retrieval shards index /data/img2ds/train --split train --label-key json:product_id --out idx/
    retrieval shards index 'pipe:aws s3 cp s3://b/c/{00000..00099}.tar -' --split train --label-key txt --out idx/
    retrieval train ... --shards idx/        # idx/stats.json lists the shards' URLs per split
    retrieval train ... --shards idx/ data.allow_listed_commands=true   # when it lists pipe: (or gs://...) URLs

URLs listed in a ``stats.json`` that run a program when read (``pipe:``, ``gs://``, ...) are refused unless the
user opts in (``data.allow_listed_commands``, ``embed --allow-listed-commands``): the index is a data file, and
anyone who can write it could otherwise make the trainer run a command (:mod:`retrieval.data.source`).

The loader needs per split the number of samples (equal steps per rank, the schedule) and the embed command
needs it to check completeness; foreign corpora (img2dataset, other tools' shards) lack both. The index
holds for each split: ``samples``, ``classes``, ``shards``, ``shard_samples`` and ``sizes.json`` (URL ->
samples), ``urls`` (what the loader reads), ``label_key``, ``grouped`` (every class one contiguous run in
one shard, as ``retrieval shards build`` writes them; otherwise the P×K planner buffers classes) and
``skipped`` (samples without an image or label: the loader skips them too). Indexing several splits into
one ``--out`` merges them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from retrieval.data.samples import SkipCounter, read_samples
from retrieval.data.source import expand, is_remote
from retrieval.errors import UserError
from retrieval.util import write_atomic

log = logging.getLogger(__name__)


def corpus_urls(source: str, split: str) -> list[str]:
    """The shards of a corpus: a folder's ``{split}-*.tar`` (else all its ``*.tar``), or brace/``::`` URLs."""
    if not is_remote(source) and ".tar" not in source:
        root = Path(source)
        if not root.is_dir():
            raise UserError(f"{source}: not a folder and not a shard URL pattern")
        urls = sorted(str(p) for p in root.glob(f"{split}-*.tar")) or sorted(str(p) for p in root.glob("*.tar"))
    else:
        urls = expand(source)
    if not urls:
        raise UserError(f"{source}: no .tar shards found")
    return urls


def scan(urls: list[str], label_key: str) -> dict:
    """One split's stats entry from reading every sample's metadata (images are not decoded)."""
    counter = SkipCounter("shards index")
    sizes: dict[str, int] = {}
    runs: dict[int, int] = {}  # label -> contiguous runs seen (a class is grouped when it has exactly one)
    last = None
    for url in tqdm(urls, desc="index shards", unit="shard", disable=None):
        before = len(counter.keys)
        n = 0
        for s in read_samples([url], counter, label_key):
            n += 1
            if (s.label, url) != last:
                runs[s.label] = runs.get(s.label, 0) + 1
                last = (s.label, url)
        sizes[url] = n + len(counter.keys) - before
    return {
        "samples": sum(sizes.values()),
        "classes": len(runs),
        "shards": len(urls),
        "bytes": 0,
        "skipped": sorted(f"{url}:{key}" for url, key in counter.keys),
        "shard_samples": sizes,
        "urls": urls,
        "label_key": label_key,
        "grouped": all(r == 1 for r in runs.values()),
    }


def index_corpus(source: str, out: str | Path, split: str = "train", label_key: str = "cls") -> dict:
    """Scan ``source`` as ``split`` and merge its entry into ``out``/stats.json and sizes.json."""
    urls = [u if is_remote(u) else str(Path(u).resolve()) for u in corpus_urls(source, split)]
    entry = scan(urls, label_key)
    if not entry["classes"]:
        raise UserError(f"{source}: no sample with an image and a {label_key!r} label; check --label-key")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = _read(out / "stats.json")
    stats[split] = entry
    stats["config"] = {"source": "index", **stats.get("config", {})}
    sizes = _read(out / "sizes.json")
    sizes.update(entry["shard_samples"])
    write_atomic(out / "stats.json", json.dumps(stats, indent=1))
    write_atomic(out / "sizes.json", json.dumps(sizes, indent=1))
    log.info(
        "%s: %s: %d samples, %d classes, %d shards, %d skipped, classes %s",
        *(out, split, entry["samples"], entry["classes"], entry["shards"], len(entry["skipped"])),
        "grouped" if entry["grouped"] else "scattered over shards (the planner buffers them)",
    )
    return entry


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it and index again") from None
    return data if isinstance(data, dict) else {}
