"""Trainer under `accelerate launch` with 2 CPU processes (gloo): DDP and DeepSpeed ZeRO-2.

The exported model must load without DeepSpeed and reproduce the in-training validation exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launch import REPO, accelerate_cmd, cpu_env, run

from retrieval.cli import main

pytestmark = pytest.mark.dist
TINY = str(REPO / "configs" / "tiny.yaml")
COMMON = ["log.wandb=disabled", "data.num_workers=0", "train.log_every=1", "train.epochs=2", "data.steps_per_epoch=2"]


def _lines(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _reembed_matches_validation(run_dir: Path, shards: Path, tmp_path: Path) -> None:
    """model.safetensors (the best checkpoint's export) embedded in a plain process == the val line it won with."""
    out = tmp_path / f"{run_dir.name}-val"
    assert (
        main(
            [
                "embed",
                "--model",
                str(run_dir),
                "--shards",
                str(shards),
                "--split",
                "val",
                "--out",
                str(out),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    assert main(["eval", "--embeddings", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    best = next(r for r in _lines(run_dir, "val") if r["step"] == summary["best_step"])
    for key in ("recall@1", "recall@10", "map@r", "r_precision"):
        assert metrics[key] == pytest.approx(best[key], abs=1e-6), key


def test_ddp_two_processes(synth_shards, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = accelerate_cmd(
        2, ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run_dir), *COMMON]
    )
    run(cmd)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["weights_agree"] and summary["global_step"] == 4
    assert [r["step"] for r in _lines(run_dir, "train")] == [1, 2, 3, 4]  # rank 0 alone logs
    ckpt = run_dir / (run_dir / "latest").read_text().strip()
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    _reembed_matches_validation(run_dir, synth_shards, tmp_path)


def test_time_budget_stops_both_ranks_at_one_step(synth_shards, tmp_path):
    """train.max_minutes: rank 0's clock decides, both ranks stop at the same step, finish normally (exit 0,
    checkpoint + final export, not 'preempted')."""
    run_dir = tmp_path / "budget"
    argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run_dir), *COMMON]
    run(accelerate_cmd(2, argv + ["data.steps_per_epoch=200", "train.max_minutes=0.0001"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["preempted"] and summary["weights_agree"]
    assert 1 <= summary["global_step"] < 400
    assert (run_dir / "latest").read_text().strip() == f"checkpoints/step_{summary['global_step']}"
    assert (run_dir / "final" / "model.safetensors").is_file() and not (run_dir / "preempted").exists()


def test_deepspeed_zero2_trains_resumes_and_exports(synth_shards, tmp_path):
    """ZeRO-2 on 2 gloo processes: stop at step 2 mid-run, resume to 4; the export loads without DeepSpeed."""
    run_dir = tmp_path / "zero2"
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # with it, accelerate silently runs plain DDP instead of DeepSpeed
    base = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run_dir), *COMMON]
    profile = str(REPO / "launch" / "zero2.yaml")
    run(accelerate_cmd(2, [*base, "train.max_steps=2"], config_file=profile), env=env)
    assert (run_dir / "checkpoints" / "step_2" / "pytorch_model").is_dir()  # a DeepSpeed checkpoint, not DDP
    run(accelerate_cmd(2, [*base, "--resume", "latest"], config_file=profile), env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["weights_agree"]
    assert [r["step"] for r in _lines(run_dir, "train")] == [1, 2, 3, 4]
    latest = run_dir / (run_dir / "latest").read_text().strip()
    assert (latest / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # really sharded
    _export_equals_zero_checkpoint(run_dir / "final", latest)
    _reembed_matches_validation(run_dir, synth_shards, tmp_path)


def _export_equals_zero_checkpoint(export: Path, checkpoint: Path) -> None:
    """The exported weights are exactly DeepSpeed's own fp32 consolidation of the ZeRO checkpoint."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from retrieval.export import load_exported

    model, _ = load_exported(export / "model.safetensors")
    reference, _ = load_exported(export / "model.safetensors")
    reference.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)))
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reference.eval()(images))


def test_default_built_small_shards_train_on_two_processes(tmp_path):
    """`shards build` with its default --shard-size on a small catalogue makes one train shard; 2 processes still
    train (split by class inside the shard), with the defaults' steps per epoch, and agree on the weights."""
    sop, shards, run_dir = tmp_path / "sop", tmp_path / "shards", tmp_path / "run"
    assert main(["synth-sop", str(sop), "--classes", "80", "--images-per-class", "4-6", "--size", "64"]) == 0
    assert main(["shards", "build", "--sop-root", str(sop), "--out", str(shards), "--workers", "1"]) == 0
    assert len(list(shards.glob("train-*.tar"))) == 1
    run(accelerate_cmd(2, ["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run_dir)] + COMMON[:3]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["weights_agree"] and summary["global_step"] >= 2 and not summary["preempted"]
