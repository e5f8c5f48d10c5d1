"""A fake but contract-shaped run folder for the report tests: metrics.jsonl, config, results, tiny shards and
an embedding folder whose top-4 neighbours are, for every image, exactly 2 of its class and 2 of a sister class."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.embed.embeddings import EmbeddingSet

GROUPS = 4  # pairs of "sister" classes
PER_CLASS = 3  # so every image has exactly 2 same-class neighbours
METRIC_KEYS = ("recall@1", "recall@10", "recall@100", "recall@1000", "map@r", "r_precision", "seed_map")


def half_right_embeddings(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, labels, ids). Image of class c in group g: g's axis + 0.8 * c's own axis + small noise, so
    cosine: same class ~1, sister class ~0.6, other groups ~0: the top-4 are 2 right and 2 wrong."""
    rng = np.random.default_rng(seed)
    dim = 3 * GROUPS
    rows, labels = [], []
    for c in range(2 * GROUPS):
        g = c // 2
        for _ in range(PER_CLASS):
            v = np.zeros(dim)
            v[3 * g] = 1.0
            v[3 * g + 1 + c % 2] = 0.8
            v += rng.normal(0, 0.03, dim)
            rows.append(v / np.linalg.norm(v))
            labels.append(100 + c)
    ids = np.arange(1, len(rows) + 1, dtype=np.int64) * 7  # ids that are not row indices
    return np.asarray(rows, np.float32), np.asarray(labels, np.int64), ids


def _jpeg(label: int, image_id: int) -> bytes:
    """A small picture whose colour says its class (hue steps) and whose stripe position says its id."""
    hue = (label * 37) % 256
    im = Image.new("RGB", (64, 48), (hue, 255 - hue, (hue * 3) % 256))
    for x in range(image_id % 50, min(64, image_id % 50 + 8)):
        for y in range(48):
            im.putpixel((x, y), (250, 250, 250))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, split: str, labels: np.ndarray, ids: np.ndarray, per_shard: int = 10) -> None:
    """WebDataset shards {split}-NNNNNN.tar with <key>.jpg/.cls/.json members, key = f"{image_id:09d}"."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(ids), per_shard)):
        with tarfile.open(folder / f"{split}-{shard:06d}.tar", "w") as tf:
            for image_id, label in zip(ids[start : start + per_shard], labels[start : start + per_shard], strict=True):
                key = f"{int(image_id):09d}"
                meta = {"image_id": int(image_id), "class_id": int(label), "path": f"c{label}/{image_id}.JPG"}
                _add(tf, f"{key}.jpg", _jpeg(int(label), int(image_id)))
                _add(tf, f"{key}.cls", str(int(label)).encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())


def metric_values(offset: float) -> dict:
    return {key: round(0.05 + offset + 0.1 * i, 4) for i, key in enumerate(METRIC_KEYS)}


def make_run(root: Path, *, shards: bool = True, results: bool = True) -> Path:
    """A run folder with every input the report reads; returns its path."""
    run = root / "run"
    run.mkdir(parents=True)
    lines = []
    for step in range(0, 60, 5):
        lines.append(
            {
                "kind": "train",
                "step": step,
                "epoch": step // 20,
                "loss": 1.0 / (1 + step / 10),
                "lr": 1e-4,
                "active_fraction": 0.9 - step / 100,
                "images_per_s": 100.0 + step,
                "images_per_s_per_gpu": 50.0 + step / 2,
                "data_wait": 0.01,
                "peak_mem_gb": 0.5,
            }
        )
        if step % 20 == 0:
            lines.append(
                {"kind": "val", "step": step, "epoch": step // 20, **metric_values(step / 200), "num_queries": 24}
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "config.yaml").write_text("model:\n  name: swinv2_tiny_window8_256\ntrain:\n  lr: 0.0001  # <tiny>\n")
    (run / "summary.json").write_text(json.dumps({"global_step": 55, "best_step": 40, "preempted": False}))
    if results:
        rows = [
            {
                "architecture": "swinv2-tiny",
                "training": "untrained",
                "loss": "triplet",
                **metric_values(0.0),
                "num_queries": 24,
            },
            {
                "architecture": "swinv2-tiny",
                "training": "finetuned",
                "loss": "triplet",
                **metric_values(0.03),
                "num_queries": 24,
            },
        ]
        (run / "results.json").write_text(json.dumps(rows))
    emb, labels, ids = half_right_embeddings()
    shard_dir = root / "shards"
    if shards:
        write_shards(shard_dir, "test", labels, ids)
    for name, untrained in (("emb-test-untrained", True), ("emb-test", False)):
        folder = run / name
        vectors = np.random.default_rng(1).normal(size=emb.shape).astype(np.float32) if untrained else emb
        paths = [f"c{c}/{i}.JPG" for c, i in zip(labels, ids, strict=True)]
        meta = {"shards": str(shard_dir), "split": "test", "untrained": untrained}
        EmbeddingSet(vectors, ids, labels, np.zeros_like(labels), paths, meta).save(folder)
        (folder / "metrics.json").write_text(
            json.dumps({**metric_values(0.0 if untrained else 0.03), "num_queries": 24})
        )
    return run
