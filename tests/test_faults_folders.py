"""The output folders under kill -9 and concurrent writers (issue 29's acceptance), from bench/faults_folders.py:
two kills of a plain `index build` here (one at an instant, one right after an event of the build); the full
campaign (20 instants of plain and auto builds, concurrent embeds) is `make faults` or the slow test below."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import faults_folders as ff  # noqa: E402


def test_a_killed_index_build_leaves_the_old_folder_or_the_new_one(tmp_path):
    ff._vectors(tmp_path / "emb-a", 20_000, 64, seed=1)
    ff._vectors(tmp_path / "emb-b", 30_000, 64, seed=2)
    counts = ff.index_trials(tmp_path, 2, random.Random(1), auto=False)
    assert counts["MIXED"] == 0 and counts["old"] + counts["new"] + counts["refused"] == 2
    assert counts["clean rebuild"] == 2


@pytest.mark.slow
def test_the_campaign(tmp_path):
    """`pytest -m slow tests/test_faults_folders.py` (about 15 minutes on 2 busy cores)."""
    assert ff.main(["--trials", "20", "--update-trials", "20", "--embed-trials", "10", "--work", str(tmp_path)]) == 0


def test_a_killed_index_update_leaves_the_old_version_or_the_new_one(tmp_path):
    """index add and index remove (Flat, IVF, HNSW) killed at an instant or right after an event of the update."""
    ff.update_sets(tmp_path, 12_000)
    counts = ff.update_trials(tmp_path, 4, random.Random(3))
    assert counts["MIXED"] == 0 and sum(counts[k] for k in ("old", "add", "remove", "refused")) == 4
    assert counts["clean update"] == 4
