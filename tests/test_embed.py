"""Rank-sharded embedding: every image exactly once after the merge, whatever the number of ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _launch import accelerate_cmd, run
from conftest import TINY, embed_args

from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet


def _test_ids(shards: Path) -> set[int]:
    stats = json.loads((shards / "stats.json").read_text())
    assert len(set(stats["test"]["shard_samples"].values())) > 1, "fixture should have shards of uneven sizes"
    ids = set()
    for tar in sorted(shards.glob("test-*.tar")):
        import tarfile

        with tarfile.open(tar) as t:
            ids |= {int(m.name.split(".")[0]) for m in t.getmembers() if m.name.endswith(".json")}
    assert len(ids) == stats["test"]["samples"]
    return ids


@pytest.fixture(scope="module")
def untrained_single(synth_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb1")
    assert (
        main(embed_args(TINY, synth_shards, out, "--num-workers", "2", "--batch-size", "16", "--merge", untrained=True))
        == 0
    )
    return out


def test_single_process_embeds_every_image_once(untrained_single, synth_shards):
    es = EmbeddingSet.load(untrained_single)
    ids, emb, labels, meta = es.ids, es.embeddings, es.labels, es.meta
    assert len(ids) == len(set(ids.tolist())) and set(ids.tolist()) == _test_ids(synth_shards)
    assert (np.diff(ids) > 0).all(), "merged output is ordered by image id"
    assert emb.shape == (len(ids), 64) and labels.shape == ids.shape
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert meta["count"] == len(ids) and meta["untrained"] and meta["split"] == "test"
    assert meta["images_per_s"] > 0 and meta["input"]["interpolation"] == "bicubic"
    assert not (untrained_single / "parts").exists()


@pytest.mark.dist
def test_two_ranks_parts_read_back_as_the_merged_arrays(untrained_single, synth_shards, tmp_path):
    """2 real processes stream their rows into parts (a part every 16 rows); the parted folder reads back
    identical to the merged one written by a single process with --merge."""
    out = tmp_path / "emb2"
    run(
        accelerate_cmd(
            2,
            embed_args(
                TINY, synth_shards, out, "--num-workers", "1", "--batch-size", "16", "--part-rows", "16", untrained=True
            ),
        )
    )
    two, one = EmbeddingSet.load(out), EmbeddingSet.load(untrained_single)
    assert two.meta["world_size"] == 2 and two.meta["layout"] == "parts" and one.meta["layout"] == "merged"
    manifest = json.loads((out / "parts.json").read_text())
    assert {p["name"][:6] for p in manifest["parts"]} == {"r00000", "r00001"} and len(manifest["parts"]) > 2
    assert not (out / "embeddings.npy").exists() and EmbeddingSet.has_vectors(out)
    for name in ("ids", "labels", "super_labels"):
        assert np.array_equal(getattr(two, name), getattr(one, name)), name
    np.testing.assert_allclose(two.vectors32(), one.embeddings, atol=1e-5)
    np.testing.assert_allclose(two.embeddings[[5, 0, 3]], one.embeddings[[5, 0, 3]], atol=1e-5)
    assert two.paths == one.paths


def test_float16_output_and_unknown_split(synth_shards, tmp_path, capsys):
    out = tmp_path / "half"
    assert (
        main(
            embed_args(TINY, synth_shards, out, "--num-workers", "0", "--dtype", "float16", split="val", untrained=True)
        )
        == 0
    )
    assert EmbeddingSet.load(out).embeddings.dtype == np.float16
    assert main(embed_args(TINY, synth_shards, tmp_path / "x", split="nope", untrained=True)) == 2
    assert "no split 'nope'" in capsys.readouterr().err


def test_config_without_untrained_is_refused(synth_shards, tmp_path, capsys):
    assert main(embed_args(TINY, synth_shards, tmp_path / "x")) == 2
    assert "--untrained" in capsys.readouterr().err


def test_a_bilinear_run_is_embedded_with_bilinear(synth_shards, tmp_path):
    """The resize filter a model was trained with travels with it (input.json, the embeddings' meta) and is the one
    `embed` uses: its vectors equal the model applied to bilinear-resized images, not bicubic ones."""
    import torch

    from retrieval.data.transforms import eval_transform
    from retrieval.model.files import read_input_spec
    from retrieval.model.loading import load_model

    run_dir, out = tmp_path / "run", tmp_path / "emb"
    train = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run_dir)]
    overrides = ["data.interpolation=bilinear", "train.max_steps=2", "data.num_workers=0", "log.wandb=disabled"]
    assert main([*train, *overrides, "train.eval_every=0"]) == 0
    assert read_input_spec(run_dir / "model.safetensors").interpolation == "bilinear"
    embed = embed_args(run_dir, synth_shards, out)
    assert main([*embed, "--num-workers", "0"]) == 0
    es = EmbeddingSet.load(out)
    assert es.meta["input"]["interpolation"] == "bilinear"
    loaded = load_model(run_dir)
    from retrieval.data.loader import Reader, eval_loader

    batch = next(iter(eval_loader(synth_shards, "test", loaded.spec, 8, 0, Reader(0, 1))))
    with torch.no_grad():
        want = loaded.model.eval()(batch["image"]).numpy()
    rows = [int(np.flatnonzero(es.ids == i)[0]) for i in batch["image_id"].tolist()]
    np.testing.assert_allclose(es.embeddings[rows], want, atol=1e-5)
    # and the filter matters: the same images resized bicubic give other vectors
    from dataclasses import replace

    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((97, 131, 3)) * 255).astype(np.uint8))
    bicubic = eval_transform(replace(loaded.spec, interpolation="bicubic"))(img)
    assert not torch.allclose(eval_transform(loaded.spec)(img), bicubic)
