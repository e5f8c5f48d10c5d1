"""The trainer with the other losses: a cross-batch memory resumes bitwise; ProxyAnchor's proxies train in their
own optimizer group, survive a ZeRO-2 checkpoint and resume, and are exported beside an unchanged model export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _launch import REPO, accelerate_cmd, cpu_env, run
from conftest import TINY
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from retrieval.cli import main
from retrieval.model.files import load_exported, read_loss_state

FAST = ["log.wandb=disabled", "data.num_workers=0", "train.log_every=1", "train.deterministic=true"]
XBM = ["loss.name=multi_similarity", "loss.xbm_size=80", "loss.xbm_start_step=1"]  # 32 a step: wraps at step 3
PROXY = ["loss.name=proxy_anchor", "loss.num_classes=81"]  # synthetic class ids lie in 1..80


def _train(shards: Path, run_dir: Path, *overrides: str, resume: str | None = None) -> int:
    argv = ["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run_dir), *FAST, *overrides]
    return main(argv + (["--resume", resume] if resume else []))


def test_resume_with_cross_batch_memory_is_bitwise_identical(synth_shards, tmp_path):
    """4 steps straight == 2 steps, stop, resume for 2 more; the memory (filled at step 2, wrapped at step 3) is
    in the checkpoint and loads with the run."""
    common = [*XBM, "train.epochs=2", "data.steps_per_epoch=3", "train.eval_every=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(synth_shards, straight, *common, "train.max_steps=4") == 0
    assert _train(synth_shards, resumed, *common, "train.max_steps=2") == 0
    memory = load_torch(str(resumed / "checkpoints" / "step_2" / "memory.safetensors"))
    assert memory["_extra_state"].tolist() == [32, 0]  # queue_idx, has_been_filled: step 1 only (start step 1)
    assert memory["embedding_memory"][:32].abs().sum() > 0
    assert _train(synth_shards, resumed, *common, "train.max_steps=4", resume="latest") == 0
    a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "weights differ after resume"
    losses = [
        [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (straight, resumed)
    ]
    assert losses[0] == losses[1]


def test_small_memory_and_proxy_anchor_without_num_classes_are_refused(synth_shards, tmp_path, capsys):
    assert _train(synth_shards, tmp_path / "a", "loss.xbm_size=16", "train.max_steps=1") == 2
    assert "loss.xbm_size" in capsys.readouterr().err
    assert _train(synth_shards, tmp_path / "b", "loss.name=proxy_anchor") == 2
    assert "loss.num_classes" in capsys.readouterr().err


def test_proxy_anchor_trains_with_its_own_group_and_exports_the_proxies(synth_shards, tmp_path):
    run_dir = tmp_path / "proxy"
    assert _train(synth_shards, run_dir, *PROXY, "train.epochs=1", "data.steps_per_epoch=2", "train.eval_every=0") == 0
    model, _ = load_exported(run_dir / "final")  # model.safetensors: the embedding model alone, strictly loaded
    proxies = read_loss_state(run_dir / "final")["proxies"]
    assert proxies.shape == (81, model.embed_dim) and torch.isfinite(proxies).all()
    initial = torch.randn(81, model.embed_dim, generator=torch.Generator().manual_seed(0)) * (2 / 81) ** 0.5
    assert not torch.equal(proxies, initial), "the proxies did not train"
    assert read_loss_state(tmp_path / "proxy" / "final") is not None
    assert (
        len(json.loads((run_dir / "summary.json").read_text())) and (run_dir / "final" / "loss.safetensors").is_file()
    )


@pytest.mark.dist
@pytest.mark.slow  # ~90 s on 2 shared cores: two DeepSpeed launches
def test_proxy_anchor_under_zero2_trains_resumes_and_exports_the_proxies(synth_shards, tmp_path):
    """ZeRO-2 on 2 gloo processes, stop at step 2 and resume to 4: the exported proxies are DeepSpeed's own fp32
    consolidation of the checkpoint, and model.safetensors loads without DeepSpeed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = tmp_path / "zero2"
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # with it, accelerate silently runs plain DDP instead of DeepSpeed
    base = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run_dir), *PROXY]
    base += [
        "log.wandb=disabled",
        "data.num_workers=0",
        "train.epochs=2",
        "data.steps_per_epoch=2",
        "train.eval_every=0",
    ]
    profile = str(REPO / "launch" / "zero2.yaml")
    run(accelerate_cmd(2, [*base, "train.max_steps=2"], config_file=profile), env=env)
    run(accelerate_cmd(2, [*base, "--resume", "latest"], config_file=profile), env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["weights_agree"]
    latest = run_dir / (run_dir / "latest").read_text().strip()
    assert (latest / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # really sharded
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(latest))
    exported = read_loss_state(run_dir / "final")
    assert torch.equal(exported["proxies"], consolidated["loss.proxies"].float())
    model, _ = load_exported(run_dir / "final")
    assert all(torch.equal(v, consolidated[k].float()) for k, v in model.state_dict().items())
