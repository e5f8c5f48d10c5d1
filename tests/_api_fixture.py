"""A tiny exported model, a folder of small images and an index over them: built in seconds, no training, no shards.

Shared by the export, Python API, README and service tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval.config.io import load_config
from retrieval.data.input_spec import InputSpec
from retrieval.embed.embedder import Embedder
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.index.folder import build_folder
from retrieval.model.files import export_model
from retrieval.model.network import build_model

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
CLASSES, PER_CLASS = 6, 3


@dataclass
class World:
    model: Path  # export folder: model.safetensors + model.yaml + input.json
    images: list[Path]
    labels: list[int]
    index: Path


def export_tiny(out: Path, seed: int = 0) -> Path:
    """configs/tiny.yaml's model at seeded random weights, exported like the trainer does."""
    cfg = load_config(TINY)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    export_model(model, cfg.model, out, spec=InputSpec.of(model, cfg.data))
    return out


def write_images(folder: Path) -> tuple[list[Path], list[int]]:
    """Small PNGs: one colour per class, a stripe whose place depends on the image."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        base = rng.integers(0, 256, 3)
        for i in range(PER_CLASS):
            pixels = np.tile(base, (48, 56, 1)).astype(np.uint8)
            pixels[:, 8 * i : 8 * i + 6] = 255 - base
            path = folder / f"c{c}_{i}.png"
            Image.fromarray(pixels).save(path)
            paths.append(path)
            labels.append(100 + c)
    return paths, labels


def make_world(root: Path) -> World:
    """``root`` becomes an export folder (as a run folder's root is) with ``images/``, ``emb-test/``, ``index/``."""
    model = export_tiny(root)
    images, labels = write_images(root / "images")
    vectors = Embedder.load(model).embed(images)
    ids = np.arange(1, len(images) + 1, dtype=np.int64) * 10
    labels_a = np.asarray(labels, np.int64)
    meta = {"model": str(model), "untrained": False}
    EmbeddingSet(vectors, ids, labels_a, labels_a - 100, [str(p) for p in images], meta).save(root / "emb-test")
    build_folder(root / "emb-test", root / "index", gpu="none")
    return World(model, images, labels, root / "index")
