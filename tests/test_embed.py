"""Rank-sharded embedding: every image exactly once after the merge, whatever the number of ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _launch import REPO, accelerate_cmd, run

from retrieval.cli import main

TINY = str(REPO / "configs" / "tiny.yaml")


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
        main(
            [
                "embed",
                "--model",
                TINY,
                "--untrained",
                "--shards",
                str(synth_shards),
                "--split",
                "test",
                "--out",
                str(out),
                "--num-workers",
                "2",
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    return out


def test_single_process_embeds_every_image_once(untrained_single, synth_shards):
    ids = np.load(untrained_single / "ids.npy")
    assert len(ids) == len(set(ids.tolist())) and set(ids.tolist()) == _test_ids(synth_shards)
    assert (np.diff(ids) > 0).all(), "merged output is ordered by image id"
    emb = np.load(untrained_single / "embeddings.npy")
    labels = np.load(untrained_single / "labels.npy")
    assert emb.shape == (len(ids), 64) and labels.shape == ids.shape
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    meta = json.loads((untrained_single / "meta.json").read_text())
    assert meta["count"] == len(ids) and meta["untrained"] and meta["split"] == "test"
    assert not (untrained_single / "parts").exists()


@pytest.mark.dist
def test_two_ranks_merge_to_the_same_arrays(untrained_single, synth_shards, tmp_path):
    out = tmp_path / "emb2"
    run(
        accelerate_cmd(
            2,
            [
                "embed",
                "--model",
                TINY,
                "--untrained",
                "--shards",
                str(synth_shards),
                "--split",
                "test",
                "--out",
                str(out),
                "--num-workers",
                "1",
                "--batch-size",
                "16",
            ],
        )
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2
    for name in ("ids", "labels", "super_labels"):
        assert np.array_equal(np.load(out / f"{name}.npy"), np.load(untrained_single / f"{name}.npy")), name
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), np.load(untrained_single / "embeddings.npy"), atol=1e-5)
    assert json.loads((out / "paths.json").read_text()) == json.loads((untrained_single / "paths.json").read_text())


def test_float16_output_and_unknown_split(synth_shards, tmp_path, capsys):
    out = tmp_path / "half"
    assert (
        main(
            [
                "embed",
                "--model",
                TINY,
                "--untrained",
                "--shards",
                str(synth_shards),
                "--split",
                "val",
                "--out",
                str(out),
                "--num-workers",
                "0",
                "--dtype",
                "float16",
            ]
        )
        == 0
    )
    assert np.load(out / "embeddings.npy").dtype == np.float16
    assert (
        main(
            [
                "embed",
                "--model",
                TINY,
                "--untrained",
                "--shards",
                str(synth_shards),
                "--split",
                "nope",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "no split 'nope'" in capsys.readouterr().err


def test_config_without_untrained_is_refused(synth_shards, tmp_path, capsys):
    assert main(["embed", "--model", TINY, "--shards", str(synth_shards), "--out", str(tmp_path / "x")]) == 2
    assert "--untrained" in capsys.readouterr().err
