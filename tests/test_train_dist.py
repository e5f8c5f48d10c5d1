"""Trainer under `accelerate launch` with 2 CPU processes (gloo): DDP and DeepSpeed ZeRO-2.

The exported model must load without DeepSpeed and reproduce the in-training validation exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launch import REPO, accelerate_cmd, cpu_env, run
from conftest import TINY, embed_args

from retrieval.cli import main

pytestmark = pytest.mark.dist
COMMON = ["log.wandb=disabled", "data.num_workers=0", "train.log_every=1", "train.epochs=2", "data.steps_per_epoch=2"]


def _lines(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _reembed_matches_validation(run_dir: Path, shards: Path, tmp_path: Path) -> None:
    """model.safetensors (the best checkpoint's export) embedded in a plain process == the val line it won with."""
    out = tmp_path / f"{run_dir.name}-val"
    assert main(embed_args(run_dir, shards, out, "--num-workers", "0", split="val")) == 0
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


@pytest.mark.slow
def test_deepspeed_zero2_with_ema_trains_resumes_and_exports_the_ema(synth_shards, tmp_path):
    """ZeRO-2 + train.ema_decay: each rank keeps a full EMA (ZeRO-2 shards gradients and optimizer state, not the
    parameters); stop at step 2, resume to 4; the exports are the EMA (the checkpoint's), not DeepSpeed's raw
    weights, load without DeepSpeed, and re-embedded give the validation that chose them (validation scores the EMA)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    run_dir = tmp_path / "zero2-ema"
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # with it, accelerate silently runs plain DDP instead of DeepSpeed
    base = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run_dir), *COMMON]
    base += ["train.ema_decay=0.5"]
    profile = str(REPO / "launch" / "zero2.yaml")
    run(accelerate_cmd(2, [*base, "train.max_steps=2"], config_file=profile), env=env)
    assert (run_dir / "checkpoints" / "step_2" / "ema.safetensors").is_file()
    run(accelerate_cmd(2, [*base, "--resume", "latest"], config_file=profile), env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["weights_agree"]  # the raw weights and the EMA, on both ranks
    latest = run_dir / (run_dir / "latest").read_text().strip()
    assert (latest / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # really sharded
    exported = load_file(str(run_dir / "final" / "model.safetensors"))
    ema = load_file(str(latest / "ema.safetensors"))
    raw = get_fp32_state_dict_from_zero_checkpoint(str(latest))
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k].float()) for k in exported), "the export is the EMA"
    assert any(not torch.equal(exported[k], raw[k]) for k in raw), "not DeepSpeed's raw weights"
    _reembed_matches_validation(run_dir, synth_shards, tmp_path)


def _export_equals_zero_checkpoint(export: Path, checkpoint: Path) -> None:
    """The exported weights are exactly DeepSpeed's own fp32 consolidation of the ZeRO checkpoint."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from retrieval.model.files import load_exported

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


def test_elastic_resume_two_one_two_finishes_the_schedule(synth_shards, tmp_path):
    """Started on 2 processes, resumed on 1, then on 2 again: the run ends at its schedule's end with the samples of
    an uninterrupted run (within one global batch), and the lr continues at each resume (no warmup: it only falls)."""
    run_dir = tmp_path / "elastic"
    argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run_dir)]
    argv += [*COMMON[:3], "train.epochs=2", "data.classes_per_batch=4", "optim.warmup_steps=0", "train.eval_every=0"]
    samples = json.loads((synth_shards / "stats.json").read_text())["train"]["samples"]
    steps2, steps1 = samples // 32, samples // 16  # optimizer steps per epoch on 2 and on 1 process(es)
    run(accelerate_cmd(2, [*argv, "train.max_steps=2"]))
    assert main([*argv, f"train.max_steps={steps1 + 2}", "--resume", "latest"]) == 0  # 1 process, into epoch 1
    state = json.loads((run_dir / (run_dir / "latest").read_text().strip() / "trainer_state.json").read_text())
    assert (state["world_size"], state["epoch"], state["global_step"]) == (1, 1, steps1 + 2)
    run(accelerate_cmd(2, [*argv, "--resume", "latest"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["epoch"], summary["global_step"]) == (2, 2 * steps2) and summary["weights_agree"]
    rows = _lines(run_dir, "train")
    assert abs(rows[-1]["samples"] - 2 * steps2 * 32) <= 32, "the schedule's samples, within one global batch"
    lrs = [r["lr"] for r in rows]
    steps = [b - a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(x <= 1e-12 for x in steps), "cosine without warmup: the lr never rises, also across resumes"
    assert max(-x for x in steps) <= 3 * sorted(-x for x in steps)[len(steps) // 2] + 1e-9, "no jump at a resume"


def test_elastic_resume_carries_the_memory_and_the_ema(synth_shards, tmp_path):
    """XBM and EMA on, 2 processes for 2 steps, resumed on 1 for one more: the gathered queue of the 2-process run is
    in the memory the 1-process run continues (its 128 rows unchanged, one 1-process batch added after them), and the
    EMA it continues is the 2-process run's (the new EMA = 0.6 x the carried one + 0.4 x the new weights)."""
    import torch
    from safetensors.torch import load_file

    run_dir = tmp_path / "elastic-xbm"
    argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run_dir), *COMMON[:3]]
    argv += ["train.epochs=2", "train.eval_every=0", "loss.name=multi_similarity", "loss.xbm_size=256"]
    argv += ["train.ema_decay=0.6"]
    run(accelerate_cmd(2, [*argv, "train.max_steps=2"]))
    # 1 process: step 2 of 2 processes is step 4 of 1 (the same samples), then one more
    assert main([*argv, "train.max_steps=5", "--resume", "latest"]) == 0
    ckpt = {2: run_dir / "checkpoints" / "step_2", 3: run_dir / (run_dir / "latest").read_text().strip()}
    state = json.loads((ckpt[3] / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_step"]) == (1, 5)
    mem = {s: load_file(str(ckpt[s] / "memory.safetensors")) for s in (2, 3)}
    assert mem[2]["_extra_state"].tolist() == [128, 0]  # queue_idx, filled: 2 steps x 2 ranks x 32
    assert mem[3]["_extra_state"].tolist() == [160, 0]  # + one batch of 32 on 1 process
    for key in ("embedding_memory", "label_memory"):
        assert torch.equal(mem[3][key][:128], mem[2][key][:128]), f"{key}: the 2-process queue was not carried"
    assert mem[3]["embedding_memory"][128:160].abs().sum() > 0
    ema = {s: load_file(str(ckpt[s] / "ema.safetensors")) for s in (2, 3)}
    raw3 = load_file(str(ckpt[3] / "model.safetensors"))
    for k, v in raw3.items():
        torch.testing.assert_close(ema[3][k], 0.6 * ema[2][k] + 0.4 * v, rtol=1e-5, atol=1e-6, msg=k)
