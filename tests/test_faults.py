"""Faults never pass silently (issue 13): divergence, kills at any instant, partial data, concurrent trainers,
changed configs on resume, a full disk, planted symlinks, and inputs that used to give tracebacks.

Single-process runs go through the CLI's ``main``; the kill tests launch 2 real processes (gloo on CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _launch import accelerate_cmd, cpu_env
from conftest import TINY, embed_args
from safetensors.numpy import load_file

from retrieval.cli import main
from retrieval.run_folder import RunFolder

FAST = ["log.wandb=disabled", "data.num_workers=0", "train.deterministic=true"]


def _argv(shards: Path, run_dir: Path, *overrides: str, resume: str | None = None) -> list[str]:
    argv = ["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run_dir), *FAST, *overrides]
    return argv + (["--resume", resume] if resume else [])


def _train(shards: Path, run_dir: Path, *overrides: str, resume: str | None = None) -> int:
    return main(_argv(shards, run_dir, *overrides, resume=resume))


def _wait_for(what: str, cond, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _stripped(weights: dict) -> dict:
    return {k.split("module.", 1)[-1]: v for k, v in weights.items()}


def best_is_consistent(run: RunFolder) -> bool:
    """``best`` names the checkpoint of the state's best_step and model.safetensors holds its weights."""
    latest = run.latest()
    state = json.loads((latest / "trainer_state.json").read_text())
    if state["best_step"] is None:
        return True
    ckpt = run.path / "checkpoints" / f"step_{state['best_step']}"
    if run.best() != ckpt or not run.has_model("best"):
        return False
    exported, saved = (
        load_file(str(run.model_dir("best") / "model.safetensors")),
        _stripped(load_file(str(ckpt / "model.safetensors"))),
    )
    return exported.keys() == saved.keys() and all(np.array_equal(exported[k], saved[k]) for k in exported)


# ------------------------------------------------------------------------------------------- 1. divergence


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=.inf", "loss.margin=nan", "data.scale=[0.5, .nan]"])
def test_non_finite_config_values_are_refused(tmp_path, capsys, override):
    rc = main(["train", "--config", TINY, "--shards", str(tmp_path), "--run-dir", str(tmp_path / "r"), override])
    assert rc == 2
    field = override.split("=")[0]
    assert f"{field}" in (err := capsys.readouterr().err) and "expected a finite number" in err
    assert not (tmp_path / "r").exists()


def test_divergence_stops_with_the_step_and_saves_nothing_non_finite(synth_shards, tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    blowup = ["optim.lr=1e6", "optim.backbone_lr=1e6", "optim.grad_clip=null", "optim.warmup_steps=0"]
    common = ["train.epochs=1", "data.steps_per_epoch=6", "train.log_every=100", "train.checkpoint_every=1"]
    assert _train(synth_shards, run.path, *blowup, *common) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "at step" in err, err[-2000:]
    assert not run.has_model("best") and not run.has_model("final") and run.read_summary() is None
    # step 1 is still finite (checkpointed), step 2 is not: latest stays at the last finite state
    assert run.latest() == run.checkpoints_path / "step_1" and "latest stays at checkpoints/step_1" in err
    assert "at step 2" in err and sorted(p.name for p in run.checkpoints_path.iterdir()) == ["step_1"]
    weights = load_file(str(run.latest() / "model.safetensors"))
    assert all(np.isfinite(v).all() for v in weights.values())


def test_embed_refuses_non_finite_weights(synth_shards, tmp_path, capsys):
    import torch

    from retrieval.config.io import load_config
    from retrieval.model.files import export_model
    from retrieval.model.network import initial_model

    cfg = load_config(TINY)
    model = initial_model(cfg)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    export_model(model, cfg.model, tmp_path / "nan")
    argv = ["embed", "--model", str(tmp_path / "nan"), "--shards", str(synth_shards), "--split", "val"]
    assert main([*argv, "--out", str(tmp_path / "emb"), "--num-workers", "0"]) == 2
    assert "NaN or inf" in capsys.readouterr().err and not (tmp_path / "emb" / "meta.json").exists()


# ------------------------------------------------------------------------------- 2. kill before best export


def test_kill_between_checkpoint_and_best_export_is_repaired_on_resume(synth_shards, tmp_path):
    """Rank 0 dies right after the checkpoint that records a new best (before ``best`` and model.safetensors):
    the resume exports that best and points ``best`` at it before anything else."""
    run = RunFolder(tmp_path / "run")
    argv = _argv(synth_shards, run.path, "train.epochs=1", "data.steps_per_epoch=2", "train.log_every=1")
    killed = subprocess.run(
        accelerate_cmd(2, argv), env=cpu_env(RETRIEVAL_FAULT="after_checkpoint"), capture_output=True, timeout=300
    )
    assert killed.returncode != 0
    assert run.latest() == run.checkpoints_path / "step_2" and run.best() is None  # the window
    resumed = subprocess.run(
        accelerate_cmd(2, [*argv, "--resume", "auto"]), env=cpu_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run.read_summary()["best_step"] == 2 and best_is_consistent(run)
    assert resumed.stderr.count("resumed from") == 1  # rank 0 alone says it


# ------------------------------------------------------------------------------ 4. one trainer per folder


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(x) for x in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_second_trainer_is_refused_and_workers_die_with_their_launcher(synth_shards, tmp_path, capsys):
    import fcntl

    run = RunFolder(tmp_path / "run")
    argv = _argv(synth_shards, run.path, "train.epochs=1", "data.steps_per_epoch=400", "train.log_every=1")
    argv += ["train.eval_every=0"]
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = subprocess.Popen(accelerate_cmd(2, argv), env=cpu_env(), stdout=log, stderr=log)
    try:
        _wait_for("a train step", lambda: any(r["kind"] == "train" for r in run.read_metrics()), launcher)
        assert main([*argv, "train.max_steps=1", "--resume", "auto"]) == 2
        assert "in use by another trainer" in capsys.readouterr().err
        workers = _children(launcher.pid)
        assert len(workers) == 2
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        _wait_for("the workers to exit", lambda: not any(_alive(p) for p in workers), timeout=30)
    finally:
        launcher.kill()
    with open(run.path / ".lock") as f:  # the OS released the dead trainer's lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --------------------------------------------------------------------------- 5. resume with a changed config


def test_resume_refuses_identity_changes_and_keeps_each_attempts_config(synth_shards, tmp_path, capsys):
    """Point 5, and point 9's metrics.jsonl: a resume drops the lines past its checkpoint's step."""
    run = RunFolder(tmp_path / "run")
    common = ["train.epochs=1", "data.steps_per_epoch=4", "train.eval_every=0", "train.log_every=1"]
    assert _train(synth_shards, run.path, *common, "train.max_steps=2") == 0
    saved = run.config_path.read_text()
    changed = ["optim.lr=5e-4", "model.embed_dim=32", "loss.margin=0.3", "train.max_steps=3"]
    assert _train(synth_shards, run.path, *common, *changed, resume="auto") == 2
    err = capsys.readouterr().err
    for key in ("optim.lr", "model.embed_dim", "loss.margin"):
        assert key in err, err[-2000:]
    assert "train.max_steps" not in err.split("in keys a resume cannot change")[1].split(". Resume")[0]
    assert run.config_path.read_text() == saved and run.latest() == run.checkpoints_path / "step_2"  # nothing written
    with run.metrics_path.open("a") as f:  # an attempt that logged step 3 and was killed before its checkpoint
        f.write(json.dumps({"kind": "train", "step": 3, "loss": 1.0}) + '\n{"kind": "tra')
    # budgets and logging may change: the resume runs and keeps its own resolved config beside the first one
    assert _train(synth_shards, run.path, *common, "train.max_steps=3", "train.keep_checkpoints=3", resume="auto") == 0
    attempts = run.attempt_configs()
    assert [p.name for p in attempts] == ["attempt-1.yaml", "attempt-2.yaml"]
    assert "max_steps: 2" in attempts[0].read_text() and "max_steps: 3" in attempts[1].read_text()
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3] and run.read_metrics()[-1]["loss"] != 1.0


# ------------------------------------------------------------------------------------------ 9. small things


def test_exports_of_the_same_weights_are_byte_identical(tmp_path):
    from retrieval.config.io import load_config
    from retrieval.model.files import export_model, load_exported
    from retrieval.model.network import initial_model

    cfg = load_config(TINY)
    model = initial_model(cfg)
    a = export_model(model, cfg.model, tmp_path / "a")
    reloaded, model_cfg = load_exported(a)
    b = export_model(reloaded, model_cfg, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "model.yaml").read_bytes() == (tmp_path / "b" / "model.yaml").read_bytes()


# --------------------------------------------------------------------------------- 3. no silent partial data


def _copy_shards(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_or_truncated_shards_are_refused(synth_shards, tmp_path, capsys):
    shards = _copy_shards(synth_shards, tmp_path / "shards")
    (shards / "train-000001.tar").unlink()
    assert _train(shards, tmp_path / "run", "train.max_steps=1") == 2
    err = capsys.readouterr().err
    assert "split 'train' is incomplete" in err and "train-000001.tar" in err and "allow_incomplete" in err
    test_shard = shards / "test-000002.tar"
    test_shard.write_bytes(test_shard.read_bytes()[: test_shard.stat().st_size // 2])
    out = tmp_path / "emb"
    argv = embed_args(TINY, shards, out, untrained=True)
    assert main([*argv, "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "split 'test' is incomplete" in err and "Traceback" not in err and not (out / "parts").exists()


def test_skipped_samples_are_counted_and_capped(tmp_path, capsys, caplog):
    import logging

    from _shardkit import write_split

    caplog.set_level(logging.INFO, logger="retrieval.train.trainer")

    shards = tmp_path / "shards"
    write_split(shards, "train", [[(c, 6) for c in range(8)], [(c, 6) for c in range(8, 16)]], corrupt={3, 9, 20, 50})
    write_split(shards, "val", [[(c, 4) for c in range(100, 106)]], first_id=1000)
    run = RunFolder(tmp_path / "run")
    common = ["train.epochs=1", "data.steps_per_epoch=2", "train.log_every=1", "train.eval_every=0"]
    assert _train(shards, run.path, *common, "data.max_skipped_fraction=0.5") == 0
    records = [r for r in run.read_metrics() if r["kind"] == "train"]
    assert all("skipped" in r for r in records) and sum(r["skipped"] for r in records) > 0
    summary = run.read_summary()
    assert summary["skipped"] == sum(r["skipped"] for r in records) and summary["samples_read"] > summary["skipped"]
    assert any("[train]" in r.message and "skipped=" in r.message for r in caplog.records)  # the console line
    assert _train(shards, tmp_path / "strict", *common, "data.max_skipped_fraction=0.001") == 2
    assert "data.max_skipped_fraction=0.001" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 6. disk full


def test_disk_full_is_one_clear_line_with_the_resume_hint(synth_shards, tmp_path, capsys, monkeypatch):
    import accelerate

    from retrieval import util

    common = ["train.epochs=1", "data.steps_per_epoch=2", "train.max_steps=1", "train.eval_every=0"]
    real_free = util.free_bytes
    monkeypatch.setattr(util, "free_bytes", lambda path: 2**20)  # 1 MB free: the checkpoint needs ~9
    run = RunFolder(tmp_path / "run")
    assert _train(synth_shards, run.path, *common) == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and ".tmp-step_1" in err and "needs ~" in err, err[-2000:]
    assert "--resume auto" in err and not list(run.checkpoints_path.glob("*"))  # nothing half-written
    # the disk fills up during the write: torch's C++ writer says only `basic_ios::clear`
    monkeypatch.setattr(util, "free_bytes", real_free)

    def full(self, *args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    assert _train(synth_shards, tmp_path / "run2", *common) == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "--resume auto" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- 7. planted temp symlinks


def test_shard_builder_never_follows_a_planted_temp_symlink(tmp_path):
    sop, out, victim = tmp_path / "sop", tmp_path / "out", tmp_path / "victim.txt"
    assert main(["synth-sop", str(sop), "--classes", "6", "--images-per-class", "2", "--size", "40"]) == 0
    victim.write_text("precious")
    (out / ".build").mkdir(parents=True)
    for name in ("train-000000.tar", "val-000000.tar", "test-000000.tar"):
        (out / f".{name}.tmp").symlink_to(victim)
        (out / ".build" / f".{name}.json.tmp").symlink_to(victim)
    build = ["shards", "build", "--sop-root", str(sop), "--out", str(out), "--workers", "1", "--val-classes", "1"]
    assert main(build) == 0
    assert victim.read_text() == "precious"
    shards = sorted(out.glob("*-*.tar"))
    assert shards and not any(p.is_symlink() for p in shards)


# ------------------------------------------------------------ 8. tracebacks and accepted nonsense


def test_non_utf8_list_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    sop = tmp_path / "sop"
    assert main(["synth-sop", str(sop), "--classes", "4", "--images-per-class", "2", "--size", "40"]) == 0
    listing = sop / "Ebay_train.txt"
    lines = listing.read_bytes().splitlines(keepends=True)
    listing.write_bytes(b"".join(lines[:2]) + lines[2].replace(b".JPG", b"\xe9.JPG") + b"".join(lines[3:]))
    assert main(["shards", "build", "--sop-root", str(sop), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{listing}:3: not UTF-8 text (byte 0xe9" in err and "Traceback" not in err


def test_search_refuses_a_model_the_index_was_not_built_with(synth_shards, tmp_path, capsys):
    from retrieval.config.io import load_config
    from retrieval.model.files import export_model
    from retrieval.model.network import initial_model

    for name, seed in (("a", 1), ("b", 2)):  # same architecture and dimension, other weights
        cfg = load_config(TINY, [f"train.seed={seed}"])
        export_model(initial_model(cfg), cfg.model, tmp_path / name)
    emb, index = tmp_path / "emb", tmp_path / "index"
    argv = ["embed", "--model", str(tmp_path / "a"), "--shards", str(synth_shards), "--split", "val"]
    assert main([*argv, "--out", str(emb), "--num-workers", "0"]) == 0
    assert main(["index", "build", "--embeddings", str(emb), "--out", str(index)]) == 0
    assert len(json.loads((index / "index.json").read_text())["model_sha256"]) == 64
    image = str(next((synth_shards.parent / "sop").rglob("*.JPG")))
    search = ["search", "--index", str(index), "--image", image, "--json"]
    assert main([*search, "--model", str(tmp_path / "b")]) == 2
    assert "is not the model the index" in capsys.readouterr().err
    assert main([*search, "--model", str(tmp_path / "b"), "--force"]) == 0
    assert main([*search, "--model", str(tmp_path / "a")]) == 0 and main(search) == 0


def test_launcher_failure_report_carries_the_one_line_error(tmp_path):
    argv = ["train", "--config", TINY, "--shards", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r"), *FAST]
    proc = subprocess.run(accelerate_cmd(2, argv), env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert "retrieval train: error:" in root_cause and "stats.json" in root_cause, proc.stderr[-3000:]
    assert "To enable traceback" not in root_cause


def test_retrieval_launch_prints_the_one_line_error_last_with_exit_code_2(tmp_path):
    """`accelerate launch` prints its ChildFailedError block after the worker's line and exits 1; `retrieval
    launch` (the wrapper README and the demo use) ends with the worker's line and exit code 2."""
    argv = ["train", "--config", TINY, "--shards", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r"), *FAST]
    cmd = [sys.executable, "-m", "retrieval", "launch", "--processes", "2", "--cpu", *argv]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("retrieval train: error:") and "stats.json" in last, proc.stderr[-3000:]
    assert "ChildFailedError" in proc.stderr  # the launcher's block is there, above the line
