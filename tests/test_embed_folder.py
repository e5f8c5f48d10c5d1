"""An embeddings folder as one unit (issue 29 points 6, 7, 8): one writer at a time, the old set complete until the
new one replaces it, nothing derived from the old set left beside the new one, no all-zero vectors accepted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _launch import cpu_env
from conftest import TINY, embed_args

from retrieval import util
from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet


@pytest.fixture(scope="module")
def scored(synth_shards, tmp_path_factory) -> Path:
    """An untrained set of the test split that `eval` scored (metrics.json in the folder)."""
    out = tmp_path_factory.mktemp("scored") / "emb"
    assert main(embed_args(TINY, synth_shards, out, "--num-workers", "0", untrained=True)) == 0
    assert main(["eval", "--embeddings", str(out)]) == 0
    assert (out / "metrics.json").is_file()
    return out


def test_a_reembed_takes_away_what_was_derived_from_the_old_set(scored, synth_shards, tmp_path):
    """Today the old metrics.json stays and `report` shows it under the new set's label."""
    out = tmp_path / "emb"
    shutil.copytree(scored, out)
    old_id = EmbeddingSet.load(out, vectors=False).meta["set_id"]
    assert main(embed_args(TINY, synth_shards, out, "--num-workers", "0", untrained=True)) == 0
    assert not (out / "metrics.json").exists()
    assert EmbeddingSet.load(out).meta["set_id"] != old_id
    assert not list(tmp_path.glob(".emb.stage-*"))


def test_a_killed_reembed_leaves_the_old_set_complete(scored, synth_shards, tmp_path):
    """Killed once it has written rows: today meta.json is removed at the start, and the folder is incomplete."""
    out = tmp_path / "emb"
    shutil.copytree(scored, out)
    before = EmbeddingSet.load(out)
    cmd = [sys.executable, "-m", "retrieval", *embed_args(TINY, synth_shards, out, "--num-workers", "0")]
    # batches of 8 with a part per batch: ~20 parts still to write when the second appears, so the kill lands
    # mid-embed (with the default batch the last part and the switch could follow within one poll)
    cmd += ["--untrained", "--part-rows", "8", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(tmp_path.glob("**/parts/r00000-p00001")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the embed ended before it could be killed"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    after = EmbeddingSet.load(out)
    assert after.meta["set_id"] == before.meta["set_id"] and (out / "metrics.json").is_file()
    np.testing.assert_array_equal(after.vectors32(), before.vectors32())
    # the next embed into it cleans what the killed one left beside it
    assert main(embed_args(TINY, synth_shards, out, "--num-workers", "0", untrained=True)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".emb.lock", "emb"]


def test_a_second_embed_into_one_folder_is_refused(scored, synth_shards, capsys):
    fd = util.lock(util.folder_lock_path(scored))  # another embed (or an eval, shared) holds it
    try:
        assert main(embed_args(TINY, synth_shards, scored, "--num-workers", "0", untrained=True)) == 2
    finally:
        util.unlock(fd)
    assert f"{scored} is being written or read by another process (pid {os.getpid()})" in capsys.readouterr().err
    assert (scored / "metrics.json").is_file()


def test_embed_never_replaces_a_folder_that_holds_no_set(synth_shards, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train: {}\n")
    assert main(embed_args(TINY, synth_shards, tmp_path / "run", "--num-workers", "0", untrained=True)) == 2
    assert "no embeddings set" in capsys.readouterr().err and (tmp_path / "run" / "config.yaml").is_file()


def test_all_zero_vectors_are_neither_evaluated_nor_indexed(tmp_path, capsys):
    """Today they are saved, evaluated (R@1 5.00) and indexed."""
    n = 40
    x = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    x[[3, 17]] = 0
    labels = np.arange(n) // 4
    EmbeddingSet(x, np.arange(n), labels, labels, [], {}).save(tmp_path / "emb")
    assert main(["eval", "--embeddings", str(tmp_path / "emb")]) == 2
    err = capsys.readouterr().err
    assert "embeddings.npy: 2 rows are all zero (first: row 3)" in err
    out = ["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--gpu", "none"]
    assert main(out) == 2 and not (tmp_path / "index").exists()
