"""Trainer: single-process runs through the CLI, bitwise resume, run-folder layout, clear config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, embed_args
from safetensors.numpy import load_file

from retrieval.cli import main
from retrieval.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
FAST = ["log.wandb=disabled", "data.num_workers=0", "train.log_every=1", "train.deterministic=true"]


def _train(shards: Path, run_dir: Path, *overrides: str, resume: str | None = None) -> int:
    argv = ["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run_dir)]
    if resume:
        argv += ["--resume", resume]
    return main(argv + FAST + list(overrides))


def _weights(path: Path) -> dict:
    return load_file(str(path))


def test_train_writes_run_folder(synth_shards, tmp_path):
    run = tmp_path / "run"
    assert _train(synth_shards, run, "train.epochs=2", "data.steps_per_epoch=3") == 0
    assert (run / "config.yaml").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    val_lines = [x for x in lines if x["kind"] == "val"]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4, 5, 6]
    assert (train_lines[-1]["total_steps"], train_lines[-1]["epochs"], train_lines[-1]["samples"]) == (6, 2, 6 * 32)
    for key in ("loss", "lr", "active_fraction", "images_per_s", "images_per_s_per_gpu", "data_wait", "peak_mem_gb"):
        assert key in train_lines[0]
    assert len(val_lines) == 2 and 0 <= val_lines[-1]["recall@1"] <= 1
    latest = (run / "latest").read_text().strip()
    assert latest == "checkpoints/step_6" and (run / latest / "trainer_state.json").is_file()
    best = (run / "best").read_text().strip()
    assert (run / best).is_dir()
    assert (run / "model.safetensors").is_file() and (run / "model.yaml").is_file()
    assert (run / "final" / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["weights_agree"] and not summary["preempted"]


def test_resume_mid_epoch_is_bitwise_identical(synth_shards, tmp_path):
    """4 steps straight == 2 steps, stop, resume for 2 more (the stop falls mid-epoch: 3 steps per epoch)."""
    common = ["train.epochs=2", "data.steps_per_epoch=3", "train.eval_every=0", "model.drop_path_rate=0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(synth_shards, straight, *common, "train.max_steps=4") == 0
    assert _train(synth_shards, resumed, *common, "train.max_steps=2") == 0
    state = json.loads((resumed / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)
    assert _train(synth_shards, resumed, *common, "train.max_steps=4", resume="latest") == 0
    a = _weights(straight / "final" / "model.safetensors")
    b = _weights(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"parameter {k} differs after resume"
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_the_next_epoch_starts_ahead_with_the_batches_a_resume_gets(synth_shards, tmp_path, monkeypatch):
    """With loader workers, the next epoch's loader starts before this epoch's last batch (its workers warm up
    while the epoch ends and validates); its batches are those a run resumed at the boundary reads."""
    import retrieval.train.trainer as trainer_module

    events: list[tuple] = []
    real = trainer_module.train_loader

    def tagged(batches, epoch):
        for batch in batches:
            events.append(("batch", epoch))
            yield batch

    def recorded(shards, data, spec, span, reader):
        events.append(("start", span.epoch))
        return tagged(iter(real(shards, data, spec, span, reader)), span.epoch)  # started now, as the trainer does

    monkeypatch.setattr(trainer_module, "train_loader", recorded)
    common = ["train.epochs=2", "data.steps_per_epoch=3", "train.eval_every=0", "data.num_workers=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(synth_shards, straight, *common) == 0
    assert events == [("start", 0), ("batch", 0), ("start", 1), ("batch", 0), ("batch", 0), *[("batch", 1)] * 3]
    events.clear()
    assert _train(synth_shards, resumed, *common, "train.max_steps=3") == 0  # capped at the boundary: no start ahead
    assert _train(synth_shards, resumed, *common, resume="latest") == 0
    assert events == [("start", 0), *[("batch", 0)] * 3, ("start", 1), *[("batch", 1)] * 3]
    a, b = (_weights(run / "final" / "model.safetensors") for run in (straight, resumed))
    assert all((a[k] == b[k]).all() for k in a), "the epoch started ahead trained on other batches"


def test_resume_with_ema_and_xbm_is_bitwise_identical(synth_shards, tmp_path):
    """train.ema_decay and a cross-batch memory on (with warmup, layer decay and RandAugment + erasing, the recipes'
    other options): 4 steps straight == 2, stop, resume for 2 more, for the raw weights (the checkpoint), the EMA
    (the exports) and the losses logged (the memory's). Validations score the EMA: the best export is the EMA of
    the best step, and embedding it gives that val line. The capped invocation validates its last step (step 2,
    issue 29): the same weights give the same val lines at steps 3 and 4 as the straight run's."""
    from safetensors.torch import load_file as load_torch

    common = ["train.epochs=2", "data.steps_per_epoch=3", "train.ema_decay=0.6", "train.ema_warmup=true"]
    common += ["optim.layer_decay=0.7", "data.rand_augment=rand-m9-mstd0.5", "data.random_erasing=0.25"]
    common += ["loss.name=multi_similarity", "loss.xbm_size=64", "train.log_every=1"]  # 32 a step: it wraps at step 3
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(synth_shards, straight, *common, "train.max_steps=4") == 0
    assert _train(synth_shards, resumed, *common, "train.max_steps=2") == 0
    # the memory and the EMA are tensors beside accelerate's files, never a pickle
    step2 = resumed / "checkpoints" / "step_2"
    assert (step2 / "memory.safetensors").is_file() and (step2 / "ema.safetensors").is_file()
    assert not list(step2.glob("custom_checkpoint_*"))
    assert _train(synth_shards, resumed, *common, "train.max_steps=4", resume="latest") == 0
    losses = [[r["loss"] for r in RunFolder(d).read_metrics() if r["kind"] == "train"] for d in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    for name in (
        "final/model.safetensors",
        "checkpoints/step_3/model.safetensors",
        "checkpoints/step_4/model.safetensors",
    ):
        a, b = _weights(straight / name), _weights(resumed / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f"{name} differs after resume"
    vals = {d: [r for r in RunFolder(d).read_metrics() if r["kind"] == "val"] for d in (straight, resumed)}
    assert [r["step"] for r in vals[straight]] == [3, 4] and [r["step"] for r in vals[resumed]] == [2, 3, 4]
    assert all(a["recall@1"] == b["recall@1"] for a, b in zip(vals[straight], vals[resumed][1:], strict=True))
    best = RunFolder(resumed).read_summary()["best_step"]
    for export, step in (("final", 4), (".", best)):
        ema = load_torch(str(resumed / f"checkpoints/step_{step}/ema.safetensors"))
        exported = _weights(resumed / export / "model.safetensors")
        raw = _weights(resumed / f"checkpoints/step_{step}/model.safetensors")
        assert all((ema[k].numpy() == exported[k]).all() for k in exported), f"the {export} export is the EMA"
        assert any((raw[k] != exported[k]).any() for k in exported if k.endswith("weight")), "not the raw weights"
    val = next(r for r in vals[resumed] if r["step"] == best)
    assert (resumed / "best").read_text().strip() == f"checkpoints/step_{best}"
    emb = tmp_path / "emb"
    assert main(embed_args(resumed, synth_shards, emb, "--num-workers", "0", split="val")) == 0
    assert main(["eval", "--embeddings", str(emb)]) == 0
    metrics = json.loads((emb / "metrics.json").read_text())
    assert all(metrics[k] == pytest.approx(val[k], abs=1e-6) for k in ("recall@1", "map@r", "r_precision"))


def _signalled_run(shards: Path, run: RunFolder, overrides: list[str], after_s: float = 0.0) -> tuple[int, str]:
    """A training process sent SIGUSR1 ``after_s`` after its first logged step: (exit code, stderr)."""
    from _launch import cpu_env

    argv = ["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run.path), *FAST, *overrides]
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrieval", *argv], env=cpu_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not any(r["kind"] == "train" for r in run.read_metrics()):
            assert proc.poll() is None and time.monotonic() < deadline, "no train step logged"
            time.sleep(0.2)
        time.sleep(after_s)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    return proc.returncode, err


def test_signal_checkpoints_marks_preempted_and_exits_3(synth_shards, tmp_path):
    """SIGUSR1 mid-run: the step finishes, a checkpoint is written, ``preempted`` holds its step, exit code 3;
    ``--resume auto`` then continues from that step and clears the mark."""
    run = RunFolder(tmp_path / "run")
    common = ["train.epochs=1", "data.steps_per_epoch=400", "train.eval_every=0"]
    returncode, err = _signalled_run(synth_shards, run, common)
    assert returncode == 3, err[-3000:]
    step = int(run.preempted_path.read_text())
    assert 1 <= step < 400 and run.latest() == run.path / "checkpoints" / f"step_{step}"
    assert run.read_summary()["preempted"] and run.read_summary()["global_step"] == step
    assert not run.has_model("final")  # a preempted run exports nothing
    assert _train(synth_shards, run.path, *common, f"train.max_steps={step + 1}", resume="auto") == 0
    assert not run.preempted_path.exists() and run.read_summary()["global_step"] == step + 1
    assert [r["step"] for r in run.read_metrics()][-2:] == [step, step + 1]


def test_a_signal_is_agreed_at_a_log_step(synth_shards, tmp_path):
    """The stop flag's all-reduce and host read run at log steps only (not every step: on a GPU each is a stall), so
    a preempted run stops at a multiple of train.log_every."""
    run = RunFolder(tmp_path / "run")
    overrides = ["train.epochs=1", "data.steps_per_epoch=400", "train.eval_every=0", "train.log_every=7"]
    returncode, err = _signalled_run(synth_shards, run, overrides, after_s=0.3)  # between two log steps, likely
    assert returncode == 3, err[-3000:]
    step = int(run.preempted_path.read_text())
    assert step % 7 == 0 and 7 <= step < 400, step


def test_resume_latest_without_checkpoint_is_a_clear_error(synth_shards, tmp_path, capsys):
    assert _train(synth_shards, tmp_path / "none", resume="latest") == 2
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", "optim.lr: expected a number"),
        ("train.epoch=3", "did you mean train.epochs"),
        ("loss.miner=hardest", "loss.miner: expected one of"),
        ("train.select_metric=recall@5", "train.select_metric: expected one of"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, capsys, override, message):
    rc = main(["train", "--config", TINY, "--shards", str(tmp_path), "--run-dir", str(tmp_path / "r"), override])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_shards_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--config", TINY, "--shards", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")])
    assert rc == 2
    assert "stats.json" in capsys.readouterr().err


def test_fresh_run_into_an_existing_run_is_refused(synth_shards, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train.epochs=1", "data.steps_per_epoch=2", "train.eval_every=0"]
    assert _train(synth_shards, run, *args) == 0
    assert _train(synth_shards, run, *args) == 2
    assert "already holds a run" in capsys.readouterr().err
    # resuming with another per-rank batch would silently change the data position: refused too
    assert _train(synth_shards, run, *args, "data.classes_per_batch=4", resume="auto") == 2
    err = capsys.readouterr().err  # the config check names the key before anything is written
    assert "data.classes_per_batch: 8 -> 4" in err and "start a new --run-dir" in err, err


def test_epochs_hold_whole_optimizer_steps():
    from retrieval.config.io import load_config
    from retrieval.config.schema import ConfigError, derived

    cfg = load_config(TINY, ["optim.grad_accum=4", "data.steps_per_epoch=10", "train.epochs=3"])
    d = derived(cfg, 2, None)
    assert (d.steps_per_epoch, d.optimizer_steps_per_epoch, d.total_optimizer_steps) == (8, 2, 6)
    with pytest.raises(ConfigError, match="optim.grad_accum"):
        derived(load_config(TINY, ["optim.grad_accum=4", "data.steps_per_epoch=3"]), 1, None)


def test_dangling_latest_pointer_is_an_error_not_a_fresh_start(tmp_path):
    from retrieval.errors import UserError
    from retrieval.run_folder import RunFolder

    (tmp_path / "latest").write_text("checkpoints/step_9")
    with pytest.raises(UserError, match="does not exist"):
        RunFolder(tmp_path).resolve_resume("auto")


def test_one_wandb_run_per_training_run(synth_shards, tmp_path, monkeypatch):
    """wandb offline: the run id is kept in the run folder and a resume logs into the same run (resume="allow")."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = RunFolder(tmp_path / "run")
    common = ["data.num_workers=0", "train.epochs=1", "data.steps_per_epoch=2", "train.eval_every=0"]
    argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run.path), "log.wandb=offline"]
    assert main([*argv, *common, "train.max_steps=1"]) == 0
    run_id = run.wandb_id_path.read_text().strip()
    assert main([*argv, *common, "--resume", "latest"]) == 0
    assert run.wandb_id() == run_id
    folders = sorted((run.path / "wandb").glob("offline-run-*"))
    assert folders and {f.name.rsplit("-", 1)[1] for f in folders} == {run_id}, "every invocation: the same run"
    assert all((f / f"run-{run_id}.wandb").is_file() for f in folders)


def test_progress_line_reads_step_total_epoch_rate_eta():
    from retrieval.train import log as runlog

    record = {"kind": "train", "step": 30, "epoch": 1, "samples": 960, "loss": 0.1, "images_per_s": 64.0}
    record.update(total_steps=120, epochs=4, eta_s=3725.0)
    line = runlog.console(record)
    assert line.startswith("[train] step 30/120 (25%) epoch 2/4 64.0 img/s eta 1:02:05 | ")
    assert "loss=0.1" in line and "samples=960" in line
