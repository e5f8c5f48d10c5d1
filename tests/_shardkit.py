"""Tiny contract-format shard writer for tests (the real builder is ``retrieval shards build``).

``write_split(dir, "train", [[(class_id, n_images), ...], ...])`` writes one tar per inner list,
keeping each class contiguous in one shard, plus ``stats.json`` and ``sizes.json``. Images are small
JPEGs whose colour encodes the class, so tests stay fast.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CORRUPT = b"\xff\xd8\xff\xe0not a jpeg at all"


def jpeg_bytes(seed: int, size: int = 40, quality: int = 85) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.normal(0, 20, (size, size + 8, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_split(
    out: Path,
    split: str,
    shards: list[list[tuple[int, int]]],
    first_id: int = 1,
    corrupt: set[int] = frozenset(),
    size: int = 40,
) -> dict[int, str]:
    """Write ``{split}-NNNNNN.tar`` shards; returns image_id -> shard file name. ``corrupt``: image ids with bad bytes."""
    out.mkdir(parents=True, exist_ok=True)
    image_id, where, counts = first_id, {}, {}
    for s, classes in enumerate(shards):
        name = f"{split}-{s:06d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for class_id, n in classes:
                for _ in range(n):
                    key = f"{image_id:09d}"
                    jpg = CORRUPT if image_id in corrupt else jpeg_bytes(class_id * 1000 + image_id, size)
                    meta = {
                        "image_id": image_id,
                        "class_id": class_id,
                        "super_class_id": class_id % 3 + 1,
                        "path": f"c{class_id}/{image_id}.JPG",
                        "width": size + 8,
                        "height": size,
                        "split": split,
                    }
                    _add(tar, f"{key}.jpg", jpg)
                    _add(tar, f"{key}.cls", str(class_id).encode())
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
                    where[image_id] = name
                    image_id += 1
        counts[name] = sum(n for _, n in classes)
    _update_json(out / "sizes.json", counts)
    entry = {
        "samples": sum(counts.values()),
        "classes": sum(len(c) for c in shards),
        "shards": len(shards),
        "bytes": sum((out / n).stat().st_size for n in counts),
        "skipped": [],
        "seconds": 0.0,
        "shard_samples": counts,
    }
    _update_json(out / "stats.json", {split: entry})
    return where


def _update_json(path: Path, values: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=1))
