"""RunFolder: checkpoint pointers and pruning, resume lookup and its errors, export folders, the metrics reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval.config.io import load_config
from retrieval.errors import UserError
from retrieval.run_folder import RunFolder, TrainerState

REPO = Path(__file__).resolve().parents[1]


class FakeAccelerator:
    """One process: what RunFolder.save_checkpoint asks of an accelerate Accelerator."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        (Path(folder) / "model.bin").write_text("weights")


def _save(run: RunFolder, step: int, keep: int = 2) -> Path:
    return run.save_checkpoint(FakeAccelerator(), TrainerState(global_step=step, epoch=step // 3), keep)


def test_checkpoints_pointers_and_pruning(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.latest() is None and run.best() is None and not run.has_checkpoints()
    first = _save(run, 1)
    run.mark_best(first)
    for step in (2, 3, 4):
        last = _save(run, step)
    assert last == run.path / "checkpoints" / "step_4" and run.latest() == last
    assert (run.path / "latest").read_text() == "checkpoints/step_4"  # relative: the run folder can move
    assert run.best() == first
    kept = sorted(p.name for p in (run.path / "checkpoints").iterdir())
    assert kept == ["step_1", "step_3", "step_4"]  # the 2 newest, and best whatever its age
    assert TrainerState.load(last) == TrainerState(global_step=4, epoch=1)


def test_saving_a_step_again_replaces_it(tmp_path):
    run = RunFolder(tmp_path)
    _save(run, 5)
    (run.path / "checkpoints" / "step_5" / "stale").write_text("x")
    again = _save(run, 5)
    assert run.latest() == again and not (again / "stale").exists()
    assert [p.name for p in (run.path / "checkpoints").iterdir()] == ["step_5"]  # no .tmp-/.old- left


def test_resolve_resume(tmp_path):
    run = RunFolder(tmp_path)
    assert run.resolve_resume(None) is None and run.resolve_resume("none") is None
    assert run.resolve_resume("auto") is None  # nothing yet: a fresh start
    with pytest.raises(UserError, match="no complete checkpoint"):
        run.resolve_resume("latest")
    with pytest.raises(UserError, match="not a checkpoint folder"):
        run.resolve_resume(str(tmp_path))
    ckpt = _save(run, 2)
    assert run.resolve_resume("auto") == ckpt == run.resolve_resume("latest")
    assert run.resolve_resume(str(ckpt)) == ckpt


def test_dangling_latest_is_an_error_not_a_fresh_start(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "latest").write_text("checkpoints/step_9")
    assert run.latest() is None and run.has_checkpoints()
    for resume in ("auto", "latest"):
        with pytest.raises(UserError, match="does not exist"):
            run.resolve_resume(resume)


def test_checkpoint_without_state_is_refused(tmp_path):
    (tmp_path / "step_3").mkdir()
    with pytest.raises(UserError, match="trainer_state.json"):
        TrainerState.load(tmp_path / "step_3")


def test_model_dirs(tmp_path):
    run = RunFolder(tmp_path)
    assert run.model_dir() == run.model_dir("best") == tmp_path
    assert run.model_dir("final") == tmp_path / "final"
    with pytest.raises(ValueError, match="best"):
        run.model_dir("latest")
    assert not run.has_model() and not run.has_model("final")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"")
    assert run.has_model("final") and not run.has_model("best")


def test_config_summary_and_metrics(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert not RunFolder.is_run(run.path) and run.read_summary() is None and run.read_metrics() == []
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.epochs=7"])
    run.begin(cfg, fresh=True)
    assert RunFolder.is_run(run.path) and run.config_path.name == "config.yaml"
    assert run.read_config() == cfg
    run.write_summary({"global_step": 3, "preempted": False})
    assert run.read_summary() == {"global_step": 3, "preempted": False}
    assert json.loads(run.summary_path.read_text())["global_step"] == 3
    run.append_metrics({"kind": "train", "step": 1, "loss": 0.5})
    with run.metrics_path.open("a") as f:
        f.write('\n{"kind": "val", "step": 1, "recall@1": 0.25}\n{"kind": "tra')  # a blank line, a kill mid-write
    assert run.read_metrics() == [
        {"kind": "train", "step": 1, "loss": 0.5},
        {"kind": "val", "step": 1, "recall@1": 0.25},
    ]
    run.mark_preempted(3)
    assert run.preempted_path.read_text() == "3"
    run.begin(cfg, fresh=False)  # a resume keeps the log and clears the mark
    assert len(run.read_metrics()) == 2 and not run.preempted_path.exists()
    run.begin(cfg, fresh=True)  # a fresh start drops the lines of an attempt that never checkpointed
    assert run.read_metrics() == []


def test_the_run_folder_names_the_exports_weights_as_the_model_files_do():
    """RunFolder names an export's weights file itself (so that the model loader may read run folders without a
    circle); it must stay the name the model's files are written under."""
    from retrieval.model.files import WEIGHTS_NAME
    from retrieval.run_folder import EXPORT_WEIGHTS

    assert EXPORT_WEIGHTS == WEIGHTS_NAME
