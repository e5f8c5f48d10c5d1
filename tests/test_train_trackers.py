"""Trackers through accelerate's log_with (`log.trackers`): tensorboard event files and an MLflow file store hold
the train and val scalars of a real run; the trackers' own environment variables win over our defaults; a
tracker whose package is missing is one line naming the extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY

from retrieval.cli import main
from retrieval.config.io import load_config
from retrieval.train.log import project_name, wandb_init

STEPS = ["train.epochs=1", "data.steps_per_epoch=3", "data.num_workers=0", "train.log_every=1"]


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _train(shards: Path, run: Path, trackers: str) -> tuple[list[dict], list[dict]]:
    argv = ["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run), *STEPS]
    assert main([*argv, f"log.trackers={trackers}"]) == 0
    train, val = _records(run, "train"), _records(run, "val")
    assert len(train) == 3 and len(val) == 1
    return train, val


def _mlflow_holds(uri: str, experiment: str, train: list[dict], val: list[dict]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == experiment]
    (mlrun,) = client.search_runs([exp.experiment_id])
    losses = [m.value for m in client.get_metric_history(mlrun.info.run_id, "train/loss")]
    assert losses == [r["loss"] for r in train]
    assert client.get_metric_history(mlrun.info.run_id, "val/recall_at_1")[-1].value == val[-1]["recall@1"]
    assert mlrun.data.params["loss.name"] == "triplet" and mlrun.info.run_name == "tiny"


def test_tensorboard_and_mlflow_hold_train_and_val_scalars(synth_shards: Path, tmp_path: Path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    train, val = _train(synth_shards, run, "[tensorboard, mlflow]")
    scalars = EventAccumulator(str(run / "tensorboard" / "retrieval")).Reload()  # <run>/tensorboard/<project>
    # tensorboard stores float32
    assert [e.value for e in scalars.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert scalars.Scalars("val/recall@1")[-1].value == pytest.approx(val[-1]["recall@1"], rel=1e-6)
    _mlflow_holds(f"sqlite:///{run / 'mlflow.db'}", "retrieval", train, val)  # the default: a store in the run
    assert not (run / "wandb").exists()  # log.trackers names the trackers: no wandb unless listed


def test_mlflow_file_store_named_by_the_environment(synth_shards: Path, tmp_path: Path, monkeypatch) -> None:
    """MLflow's own variables win: the tracking URI (a file store) and the experiment name."""
    store = (tmp_path / "mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to use a file store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    run = tmp_path / "run"
    train, val = _train(synth_shards, run, "[mlflow]")
    _mlflow_holds(store, "from-env", train, val)
    assert not (run / "mlflow.db").exists()


def test_the_trackers_environment_wins_over_defaults(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(TINY, ["log.wandb=online"])
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert wandb_init(cfg, tmp_path, main=False)["mode"] == "online" and project_name(cfg.log) == "retrieval"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("WANDB_PROJECT", "theirs")
    init = wandb_init(cfg, tmp_path, main=False)
    assert "mode" not in init and "dir" not in init and init["name"] == "tiny"  # wandb reads them itself
    assert project_name(cfg.log) == "theirs"
    assert project_name(load_config(TINY, ["log.project=ours"]).log) == "ours"  # an explicit config value wins


def test_legacy_log_wandb_and_a_missing_tracker_package(synth_shards: Path, tmp_path: Path, monkeypatch, capsys):
    from retrieval.train.log import trackers_of

    assert trackers_of(load_config(TINY, []).log) == ["wandb"]  # log.trackers unset: as log.wandb says
    assert trackers_of(load_config(TINY, ["log.wandb=disabled"]).log) == []
    assert trackers_of(load_config(TINY, ["log.trackers=[]"]).log) == []
    assert main(["train", "--config", TINY, "--print-config", "log.trackers=[neptune]"]) == 2
    assert "log.trackers: expected one of ['wandb', 'tensorboard', 'mlflow'], got 'neptune'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "mlflow", None)
    argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(tmp_path / "r"), *STEPS]
    assert main([*argv, "log.trackers=[mlflow]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("log.trackers: mlflow needs the package 'mlflow': pip install 'retrieval[trackers]'")
