"""``retrieval index add`` against a full rebuild (issue 25's acceptance): 10k new rows into a 1M-row index.

    python -m bench.index_update                                   # HNSW32 and Flat at 1M x 256 (about 30 min, 2 cores)
    python -m bench.index_update --rows 100000 --factories Flat    # a quick look

The data is ``bench.scale``'s (``bench/synthetic.py``, the ``trained`` family, d = 256): the catalogue of N rows, an
update of ``--new`` rows of the same products (another seed: new photos, new ids), and their union (what a rebuild
reads). For each factory (HNSW32 is what ``--factory auto`` chose at 1M in ``bench.scale``; Flat is exact):
``index build`` over the catalogue once, then ``--repeats`` times each, every one in a fresh process (its own
peak RSS, VmHWM): ``index add`` of the update into a copy of that index, and ``index build`` over the union. Medians
(and the spread) of seconds and peak RSS; ``--out`` keeps ``index_update.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from bench.common import summarize, table
from bench.scale import run_step, write_set


def _data(work: Path, n: int, new: int) -> dict[str, Path]:
    folders = {"catalogue": work / "catalogue", "update": work / "update", "union": work / "union"}
    if not (folders["union"] / "meta.json").is_file():
        for f in folders.values():
            shutil.rmtree(f, ignore_errors=True)
        write_set(folders["catalogue"], n, n, seed=0)
        write_set(folders["update"], new, n, seed=1, world=1)
        write_set(folders["union"], n, n, seed=0, more=(new, 1))
    return folders


def _factory(work: Path, factory: str, data: dict[str, Path], repeats: int) -> dict:
    base = work / f"index-{factory.replace(',', '-')}"
    build = ["index", "build", "--factory", factory, "--gpu", "none"]
    if not (base / "index.json").is_file():
        run_step("run", "--", *build, "--embeddings", str(data["catalogue"]), "--out", str(base))
    adds, rebuilds = [], []
    for _ in range(repeats):
        copy = work / "index-copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        adds.append(run_step("run", "--", "index", "add", "--index", str(copy), "--embeddings", str(data["update"])))
        shutil.rmtree(copy)
        out = work / "index-rebuilt"
        rebuilds.append(run_step("run", "--", *build, "--embeddings", str(data["union"]), "--out", str(out)))
        shutil.rmtree(out)
    return {
        what: {
            key: summarize([r[key] for r in runs], unit, 0) for key, unit in (("seconds", "s"), ("peak_rss_gb", "GiB"))
        }
        for what, runs in (("add", adds), ("rebuild", rebuilds))
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--new", type=int, default=10_000)
    p.add_argument("--factories", nargs="+", default=["HNSW32", "Flat"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/retrieval-index-update"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    data = _data(a.out, a.rows, a.new)
    results = {f: _factory(a.out, f, data, a.repeats) for f in a.factories}
    record = {"rows": a.rows, "new": a.new, "repeats": a.repeats, "load_before": load, "load_after": os.getloadavg()[0]}
    (a.out / "index_update.json").write_text(json.dumps({**record, "results": results}, indent=1) + "\n")
    rows = []
    for factory, r in results.items():
        for what in ("add", "rebuild"):
            s, m = r[what]["seconds"], r[what]["peak_rss_gb"]
            rows.append([factory, what, f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})", f"{m['median']:.2f}"])
    print(f"{a.new:,} rows into {a.rows:,} x 256, medians of {a.repeats} (load average {load:.1f} before)")
    print(table(["factory", "step", "seconds (min-max)", "peak RSS GiB"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
