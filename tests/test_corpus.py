"""Foreign corpora: an img2dataset-layout folder written by webdataset's own ``TarWriter`` (labels in ``.json``,
classes scattered over shards, jpg/png/webp) is indexed once, then trains, embeds and evaluates."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import TINY, embed_args
from PIL import Image

from retrieval.cli import main
from retrieval.config.schema import DataConfig
from retrieval.data.input_spec import InputSpec
from retrieval.data.loader import EpochSpan, Reader, train_loader
from retrieval.embed.embeddings import EmbeddingSet

REPO = Path(__file__).resolve().parents[1]
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _image(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=FORMATS[fmt])
    return buf.getvalue()


def write_img2dataset(folder: Path, products: list[str], per_product: int, shards: int, first: int) -> None:
    """img2dataset's layout: ``00000.tar``.. with ``KEY.{jpg|png|webp,json,txt}``, ``00000_stats.json`` beside;
    samples in a random order, so every product is scattered over the shards."""
    folder.mkdir(parents=True)
    rows = [(p, i) for p in products for i in range(per_product)]
    order = np.random.default_rng(0).permutation(len(rows))
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for r in order[s::shards]:
                product, i = rows[r]
                key, fmt = f"{first + int(r):09d}", list(FORMATS)[int(r) % 3]
                meta = {"key": key, "url": f"https://shop.example/{product}/{i}", "product_id": product}
                sink.write({"__key__": key, fmt: _image(int(r), fmt), "json": json.dumps(meta), "txt": f"photo {i}"})
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(order[s::shards])}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("img2ds")
    write_img2dataset(root / "train", [f"sku-{c}" for c in range(24)], 5, 3, first=0)
    write_img2dataset(root / "val", [f"sku-{c}" for c in range(100, 108)], 4, 1, first=10_000)
    idx = root / "idx"
    for split in ("train", "val"):
        argv = ["shards", "index", str(root / split), "--split", split, "--label-key", "json:product_id"]
        assert main(argv + ["--out", str(idx)]) == 0
    return idx


def test_index_counts_samples_classes_and_scattering(corpus):
    stats = json.loads((corpus / "stats.json").read_text())
    assert (stats["train"]["samples"], stats["train"]["classes"], stats["train"]["shards"]) == (120, 24, 3)
    assert stats["train"]["grouped"] is False and stats["train"]["label_key"] == "json:product_id"
    assert sum(json.loads((corpus / "sizes.json").read_text()).values()) == 120 + 32


def test_scattered_classes_make_p_by_k_batches_split_by_class(corpus):
    cfg = DataConfig(classes_per_batch=3, images_per_class=4, class_pool=6, num_workers=0, seed=1)
    spec = InputSpec(32, (0.5,) * 3, (0.5,) * 3, 0.875)
    per_rank = [list(train_loader(corpus, cfg, spec, EpochSpan(0, 5), Reader(r, 4))) for r in range(4)]
    assert [len(b) for b in per_rank] == [5] * 4
    for batches in per_rank:
        for b in batches:
            assert sorted(np.bincount(np.unique(b["label"].numpy(), return_inverse=True)[1])) == [4, 4, 4]
    labels = [{c for b in batches for c in b["label"].tolist()} for batches in per_rank]
    assert sum(len(x) for x in labels) == len(set().union(*labels)), "3 shards for 4 ranks: split by class"


def test_img2dataset_corpus_trains_embeds_and_evaluates(corpus, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--config", TINY, "--shards", str(corpus), "--run-dir", str(run), "log.wandb=disabled"]
    argv += ["data.num_workers=0", "train.epochs=1", "data.steps_per_epoch=2", "data.classes_per_batch=4"]
    assert main(argv) == 0
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert len(val) == 1 and 0 <= val[0]["recall@1"] <= 1
    out = tmp_path / "emb"
    argv = embed_args(run, corpus, out, split="val")
    assert main(argv + ["--num-workers", "0"]) == 0
    assert main(["eval", "--embeddings", str(out)]) == 0
    emb = EmbeddingSet.load(out)
    assert len(emb) == 32 and len(set(emb.labels.tolist())) == 8
    assert json.loads((out / "metrics.json").read_text())["recall@1"] == pytest.approx(val[0]["recall@1"])
