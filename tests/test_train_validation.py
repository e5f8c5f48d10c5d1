"""The run's extra work kept proportionate (issue 31): validations after the first re-embed the val split from
memory instead of decoding it again (same numbers), and the summary shows start-up, validation, checkpoint and
export as shares of the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY

from retrieval.cli import main
from retrieval.run_folder import RunFolder
from retrieval.train.validation import BatchCache

FAST = ["log.wandb=disabled", "data.num_workers=0", "train.log_every=1", "data.steps_per_epoch=3", "train.epochs=3"]


def _batches(n: int, side: int = 4) -> list[dict]:
    return [{"image": torch.full((2, 3, side, side), float(i)), "label": torch.tensor([i, i])} for i in range(n)]


def test_batch_cache_keeps_one_whole_pass_that_fits():
    made = []

    def loader():
        made.append(1)
        return iter(_batches(3))

    cache = BatchCache(budget=10**6)
    first = list(cache.batches(loader))
    again = list(cache.batches(loader))
    assert len(made) == 1 and [b["image"][0, 0, 0, 0].item() for b in again] == [0.0, 1.0, 2.0]
    assert all(a is b for a, b in zip(first, again, strict=True))  # the same prepared tensors, not decoded again

    small = BatchCache(budget=2 * 3 * 4 * 4 * 4 * 2)  # two batches of 2 x 3 x 4 x 4 float32 fit, three do not
    assert len(list(small.batches(lambda: iter(_batches(3))))) == 3 and small.kept is None
    partial = BatchCache(budget=10**6)
    next(partial.batches(lambda: iter(_batches(3))))  # a pass that stopped early is never taken as the split
    assert partial.kept is None
    off = BatchCache(budget=0)
    assert len(list(off.batches(lambda: iter(_batches(2))))) == 2 and off.kept is None


def test_cached_validations_score_as_decoded_ones_and_the_summary_shows_the_costs(synth_shards, tmp_path: Path):
    runs = {}
    for name, cache in (("cached", "512"), ("decoded", "0")):
        run = RunFolder(tmp_path / name)
        argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run.path), *FAST]
        assert main([*argv, f"data.val_cache_mb={cache}"]) == 0
        runs[name] = run
    vals = {name: [r for r in run.read_metrics() if r["kind"] == "val"] for name, run in runs.items()}
    assert len(vals["cached"]) == 3
    for a, b in zip(vals["cached"], vals["decoded"], strict=True):
        assert a["step"] == b["step"] and a["recall@1"] == b["recall@1"] and a["map@r"] == b["map@r"]
    costs = runs["cached"].read_summary()["costs"]
    assert costs["wall_s"] > 0 and {"startup_share", "validation_share", "checkpoint_share", "export_share"} <= set(
        costs
    )
    parts = [v for k, v in costs.items() if k.endswith("_share")]
    assert all(0 <= v <= 1 for v in parts) and sum(parts) == pytest.approx(1.0, abs=1e-3)
    assert costs["validation_s"] > 0 and costs["checkpoint_s"] > 0
