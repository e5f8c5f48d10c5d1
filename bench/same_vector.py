"""Same image, same vector (issue 29's acceptance at the demo's size): every image of a catalogue list, queried
through the Python API, ``retrieval search`` and the service, must find itself first with cosine >= 0.9999.

    python bench/same_vector.py --index runs/demo/run/index --list runs/demo/sop/Ebay_test.txt

``--list`` is an SOP-format list (``image_id class_id super_class_id path``, paths relative to its folder) of images
that are in the index: the demo's test split, which ``retrieval demo`` embeds and indexes. Prints, per path, how many
images found themselves first, how many at cosine >= 0.9999, and the lowest cosine; exit code 1 if any did not.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.data.sop import read_sop_file  # noqa: E402
from retrieval.search.searcher import Searcher  # noqa: E402
from retrieval.util import free_port  # noqa: E402

COSINE = 0.9999


def python_api(index: Path, paths: list[str]) -> list[dict]:
    return [r["results"][0] for r in Searcher(index).search(paths, k=1)]


def command(index: Path, listed: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "retrieval", "search", "--index", str(index), "--queries", str(listed), "--k", "1"]
    out = subprocess.run([*cmd, "--json"], check=True, capture_output=True, text=True).stdout
    return [q["results"][0] for q in json.loads(out)["queries"]]


def service(index: Path, paths: list[str], batch: int = 32) -> list[dict]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "retrieval", "serve", "--index", str(index), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, tops = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the service did not start") from None
                time.sleep(0.5)
        for start in range(0, len(paths), batch):  # the files' bytes, uploaded as a client would
            files = [
                ("image", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in paths[start : start + batch]
            ]
            answer = httpx.post(f"{url}/search", files=files, params={"k": 1}, timeout=120)
            answer.raise_for_status()
            tops += [q["results"][0] for q in answer.json()["queries"]]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return tops


def report(name: str, ids: np.ndarray, tops: list[dict]) -> bool:
    first = sum(int(t["image_id"]) == int(i) for t, i in zip(tops, ids, strict=True))
    scores = np.array([t["score"] for t in tops])
    close = int((scores >= COSINE).sum())
    print(f"{name:18s} {len(ids)} images: first {first}, cosine >= {COSINE} {close}, lowest cosine {scores.min():.6f}")
    return first == close == len(ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--list", type=Path, required=True, help="SOP-format list of images in the index")
    args = p.parse_args(argv)
    records = read_sop_file(args.list)
    ids = np.array([r.image_id for r in records])
    paths = [str(args.list.parent / r.path) for r in records]
    ok = report("Python API", ids, python_api(args.index, paths))
    ok &= report("retrieval search", ids, command(args.index, args.list))
    ok &= report("retrieval serve", ids, service(args.index, paths))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
