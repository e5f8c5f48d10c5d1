"""What a run validates, logs and exports (issue 29 points 2, 3, 4): a capped run validates its last step, the
metrics log stays monotone and comparable across worlds, the summary shows the best and the last validation,
``train.select_metric: last``, and the warning when the val split is too small to select with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from _launch import accelerate_cmd, run
from conftest import TINY

from retrieval.cli import main
from retrieval.report import plots
from retrieval.run_folder import RunFolder, TrainerState
from retrieval.train import select

FAST = ["log.wandb=disabled", "data.num_workers=0", "train.log_every=1"]


def _train(shards: Path, run_dir: Path, *overrides: str, resume: str | None = None) -> int:
    argv = ["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run_dir), *FAST, *overrides]
    return main(argv + (["--resume", resume] if resume else []))


def test_a_run_capped_before_its_first_epoch_end_validates_its_last_step(synth_shards, tmp_path, caplog):
    """Today: best_metric None, no `best`, no val line at all in a 3-step run."""
    run = RunFolder(tmp_path / "run")
    assert _train(synth_shards, run.path, "data.steps_per_epoch=10", "train.max_steps=3") == 0
    val = [r for r in run.read_metrics() if r["kind"] == "val"]
    assert [r["step"] for r in val] == [3] and val[0]["samples"] == 3 * 32
    summary = run.read_summary()
    assert summary["best_step"] == summary["last_step"] == 3 and summary["best_metric"] == val[0]["recall@1"]
    assert run.best() == run.path / "checkpoints" / "step_3" and run.has_model("best")
    caplog.set_level(logging.INFO, logger="retrieval.train.trainer")
    off = RunFolder(tmp_path / "off")
    assert _train(synth_shards, off.path, "data.steps_per_epoch=10", "train.max_steps=2", "train.eval_every=0") == 0
    assert "stopped at step 2: no validation (train.eval_every=0)" in caplog.text
    assert off.read_summary()["best_step"] is None and off.has_model("best")  # the final weights, said so


def test_select_last_exports_the_last_weights_and_the_summary_shows_both(synth_shards, tmp_path, caplog):
    """The val split of the fixture has 40 images: far too few to select with (the warning), and with
    select_metric=last the run root's model is the last validated weights."""
    run = RunFolder(tmp_path / "run")
    caplog.set_level(logging.WARNING, logger="retrieval.train.select")
    common = ["train.epochs=3", "data.steps_per_epoch=2", "train.select_metric=last"]
    assert _train(synth_shards, run.path, *common) == 0
    val = [r for r in run.read_metrics() if r["kind"] == "val"]
    summary = run.read_summary()
    assert [r["step"] for r in val] == [2, 4, 6] and summary["select_metric"] == "last"
    assert (summary["best_step"], summary["last_step"], summary["metric"]) == (6, 6, "recall@1")
    assert summary["last_metric"] == val[-1]["recall@1"] and summary["val_queries"] == 40
    assert summary["metric_se"] == pytest.approx(select.standard_error(val[-1]["recall@1"], 40), abs=1e-6)
    assert run.best() == run.path / "checkpoints" / "step_6"
    best, final = (run.path / "model.safetensors").read_bytes(), (run.path / "final" / "model.safetensors").read_bytes()
    assert best == final
    assert caplog.text.count("checkpoints closer than that cannot be told apart") == 1
    assert "on 40 val queries" in caplog.text


def test_select_last_and_patience_and_one_class_batches_are_refused(synth_shards, tmp_path, capsys):
    assert _train(synth_shards, tmp_path / "a", "train.select_metric=last", "train.early_stop_patience=2") == 2
    assert "train.early_stop_patience" in capsys.readouterr().err
    # today a batch of one class trains with loss 0 every step
    assert _train(synth_shards, tmp_path / "b", "data.classes_per_batch=1", "data.class_pool=4") == 2
    assert "data.classes_per_batch: expected >= 2" in capsys.readouterr().err


def test_standard_error_and_the_noise_rule():
    assert select.standard_error(0.5, 100) == pytest.approx(0.05)
    assert select.standard_error(0.2, 10_000) == pytest.approx(0.004)
    assert 1.96 * select.standard_error(0.2, 10_000) < select.NOISY <= 1.96 * select.standard_error(0.2, 300)


def _select(values: list[float], queries: int) -> TrainerState:
    state = TrainerState()
    for step, value in enumerate(values, 1):
        state.global_step = step
        state.record_eval(value, queries)
    return state


def test_best_is_the_latest_validation_the_val_split_cannot_tell_from_the_highest():
    """A tie within one standard error goes to the later weights; a drop past it does not; patience counts from the
    highest value, so a plateau within the noise still stops a run."""
    small = _select([0.10, 0.18, 0.225, 0.225, 0.20], queries=240)  # the demo's val split: se(0.225) = 0.027
    assert (small.best_step, small.best_metric, small.top_metric) == (5, 0.20, 0.225)
    assert small.evals_since_best == 2
    assert _select([0.10, 0.225, 0.15], queries=240).best_step == 2  # 0.075 below: a real drop
    large = _select([0.80, 0.81, 0.805], queries=60_000)  # se(0.81) = 0.0016: 0.005 apart is a real difference
    assert (large.best_step, large.best_metric) == (2, 0.81)
    assert _select([0.3, 0.2], queries=0).best_step == 1  # no query count (older states): the strict maximum


@pytest.mark.dist
def test_an_elastic_resume_keeps_the_log_monotone_in_samples(synth_shards, tmp_path):
    """1 process to step 4, resumed on 2 for 2 steps (checkpoints at each), then resumed on 1 from the 2-process
    checkpoint before the last: every record carries samples, world size and attempt; the log keeps the first
    world's records (today a resume cuts by step, and the 2-process step 3 dropped the 1-process step 4) and is
    strictly monotone in samples, which the report's curves run on."""
    run_dir = tmp_path / "elastic"
    argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run_dir), *FAST]
    argv += ["train.epochs=2", "data.classes_per_batch=4", "train.eval_every=0", "train.checkpoint_every=1"]
    argv += ["train.keep_checkpoints=4"]
    assert main([*argv, "train.max_steps=4"]) == 0  # 1 process: 4 x 16 samples
    run(accelerate_cmd(2, [*argv, "train.max_steps=4", "--resume", "latest"]))  # step 4 of 1 = step 2 of 2
    ckpt = run_dir / "checkpoints" / "step_3"
    assert json.loads((ckpt / "trainer_state.json").read_text())["samples_seen"] == 4 * 16 + 32
    assert main([*argv, "train.max_steps=7", "--resume", str(ckpt)]) == 0  # back on 1: step 6, then 7
    records = RunFolder(run_dir).read_metrics()
    seen = [(r["samples"], r["world_size"], r["attempt"]) for r in records]
    assert seen == [(16, 1, 1), (32, 1, 1), (48, 1, 1), (64, 1, 1), (96, 2, 2), (112, 1, 3)]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 7]  # steps of each world: renumbered, not monotone
    xs, _ = plots._series(records, "loss")
    assert xs == sorted(set(xs)) and plots._x_label(records) == "images seen"
