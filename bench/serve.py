"""The search service from outside: queries/s and request-to-answer latency of ``retrieval serve`` beside
``Searcher.search`` in process (the raw baseline: the same model and index, no HTTP).

    python bench/serve.py                          # a tiny random-weight model and index built in a temp folder
    python bench/serve.py --index runs/demo/run/index --images 'runs/demo/sop/queries/*.JPG' --requests 400

Measured: batch 1 (one image per request, one client), concurrent (8 clients, one image each: the server's
batcher groups them), multi-image requests (16 images per request); in process, the same per image and per batch.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def tiny_index(root: Path, n: int = 200) -> tuple[Path, list[Path]]:
    """configs/tiny.yaml at seeded random weights, ``n`` random images, their index."""
    import torch

    from retrieval.config.io import load_config
    from retrieval.data.input_spec import InputSpec
    from retrieval.embed.embedder import Embedder
    from retrieval.embed.embeddings import EmbeddingSet
    from retrieval.index.folder import build_folder
    from retrieval.model.files import export_model
    from retrieval.model.network import build_model

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    export_model(model, cfg.model, root / "model", spec=InputSpec.of(model, cfg.data))
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    paths = []
    for i in range(n):
        path = root / "images" / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    vectors = Embedder.load(root / "model").embed(paths)
    ids = np.arange(n, dtype=np.int64)
    EmbeddingSet(vectors, ids, ids // 4, ids // 40, [str(p) for p in paths], {"model": str(root / "model")}).save(
        root / "emb"
    )
    build_folder(root / "emb", root / "index", gpu="none")
    return root / "index", paths


def _summary(latencies: list[float], images: int, seconds: float) -> dict:
    return {
        "images_per_s": round(images / seconds, 1),
        "requests": len(latencies),
        "median_latency_ms": round(1000 * statistics.median(latencies), 2),
        "p90_latency_ms": round(1000 * float(np.percentile(latencies, 90)), 2),
    }


def _timed(fn, items: list, workers: int = 1) -> tuple[list[float], float]:
    def one(item):
        t0 = time.perf_counter()
        fn(item)
        return time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        latencies = list(pool.map(one, items))
    return latencies, time.perf_counter() - start


def in_process(index: Path, images: list[Path], requests: int) -> dict:
    from retrieval.search.searcher import Searcher

    searcher = Searcher(index, batch_size=16)
    searcher.search(images[:16], 10)  # warm-up
    singles = [images[i % len(images)] for i in range(requests)]
    lat, secs = _timed(lambda p: searcher.search([p], 10), singles)
    out = {"searcher batch 1": _summary(lat, len(singles), secs)}
    groups = [[images[(16 * g + j) % len(images)] for j in range(16)] for g in range(max(1, requests // 16))]
    lat, secs = _timed(lambda g: searcher.search(g, 10), groups)
    out["searcher batch 16"] = _summary(lat, 16 * len(groups), secs)
    return out


def served(index: Path, images: list[Path], requests: int, port: int) -> dict:
    cmd = [sys.executable, "-m", "retrieval", "serve", "--index", str(index), "--port", str(port), "--max-batch", "32"]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_served(f"{url}/healthz", proc)
        data = [p.read_bytes() for p in images]
        client = httpx.Client(timeout=120)
        post = lambda i: client.post(f"{url}/search?k=10", content=data[i % len(data)]).raise_for_status()  # noqa: E731
        for i in range(16):
            post(i)  # warm-up
        out = {}
        lat, secs = _timed(post, list(range(requests)))
        out["serve batch 1 (1 client)"] = _summary(lat, requests, secs)
        lat, secs = _timed(post, list(range(requests)), workers=8)
        out["serve concurrent (8 clients x 1 image)"] = _summary(lat, requests, secs)

        def post16(g):
            files = [("image", (f"{j}.jpg", data[(16 * g + j) % len(data)])) for j in range(16)]
            client.post(f"{url}/search?k=10", files=files).raise_for_status()

        groups = list(range(max(1, requests // 16)))
        lat, secs = _timed(post16, groups)
        out["serve 16 images per request"] = _summary(lat, 16 * len(groups), secs)
        out["forward passes"] = client.get(f"{url}/healthz").json()["batches"]
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_until_served(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail if the server process ``proc`` exits or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server behind {url} exited")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def main() -> int:
    from retrieval.util import free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", help="index folder (default: a tiny one built in a temp folder)")
    p.add_argument("--images", help="glob of query images (default: the tiny index's images)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.index:
            index, images = Path(args.index), [Path(x) for x in sorted(glob.glob(args.images or ""))]
            if not images:
                raise SystemExit("--images: matched no file (needed with --index)")
        else:
            index, images = tiny_index(Path(tmp))
        figures = {**in_process(index, images, args.requests), **served(index, images, args.requests, free_port())}
    for name, row in figures.items():
        print(f"{name:<42} {row}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
