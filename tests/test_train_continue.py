"""`retrieval train` from a trained run (model.init_from): a new run that starts from the parent's weights (backbone,
head, ProxyAnchor's proxies for the labels both have), with a fresh optimizer and schedule and its own folder, the
parent recorded in its config; bad parents are one line before any training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from safetensors.torch import load_file

from retrieval.cli import main
from retrieval.model.files import read_loss_state
from retrieval.model.loading import file_sha256, load_model

FAST = ["log.wandb=disabled", "data.num_workers=0", "train.log_every=1", "train.eval_every=0"]
PROXY = ["loss.name=proxy_anchor", "loss.num_classes=81"]  # synthetic class ids lie in 1..80
STILL = ["optim.lr=1e-9", "optim.backbone_lr=1e-9", "optim.warmup_steps=0"]  # one step moves nothing measurable


def _train(shards: Path, run_dir: Path, *overrides: str, resume: str | None = None) -> int:
    argv = ["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run_dir), *FAST, *overrides]
    return main(argv + (["--resume", resume] if resume else []))


@pytest.fixture(scope="module")
def parent(synth_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("parent") / "run"
    assert _train(synth_shards, run, *PROXY, "train.epochs=1", "data.steps_per_epoch=3") == 0
    return run


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_continued_run_starts_from_the_parent_as_a_new_run(parent, synth_shards, tmp_path):
    child = tmp_path / "child"
    argv = [*PROXY, "loss.num_classes=90", f"model.init_from={parent}", *STILL, "train.max_steps=1"]
    assert _train(synth_shards, child, *argv, "train.epochs=2", "data.steps_per_epoch=2") == 0
    cfg = yaml.safe_load((child / "config.yaml").read_text())["model"]
    assert cfg["init_from"] == str(parent) and cfg["init_sha256"] == file_sha256(parent / "model.safetensors")
    # its starting weights are the parent's (what `embed --untrained` of the child rebuilds) ...
    start = load_model(child, untrained=True).model.state_dict()
    theirs = _state(parent)
    assert start.keys() == theirs.keys() and all(torch.equal(start[k], theirs[k]) for k in theirs)
    # ... and one step at lr 1e-9 leaves them there: the export is the parent's, proxies 0..80 too, 81..89 new
    mine = _state(child / "final")
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in theirs)
    proxies, parents = read_loss_state(child / "final")["proxies"], read_loss_state(parent)["proxies"]
    assert proxies.shape[0] == 90 and torch.allclose(proxies[:81], parents, atol=1e-6)
    assert not torch.allclose(proxies[81:], torch.zeros_like(proxies[81:]))
    # a fresh optimizer and schedule in a folder of its own: step 1 of its own, no checkpoint of the parent
    first = json.loads((child / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["step"], first["epoch"], first["samples"]) == (1, 0, 32)
    assert sorted(p.name for p in (child / "checkpoints").iterdir()) == ["step_1"]
    # the child resumes as any run does (its recorded parent is still the same weights)
    assert _train(synth_shards, child, *argv[:-1], "train.max_steps=2", "train.epochs=2",
                  "data.steps_per_epoch=2", resume="latest") == 0  # fmt: skip


def test_bad_parents_are_one_line_before_training(parent, synth_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(synth_shards, run, f"model.init_from={parent}", "model.embed_dim=32", "train.max_steps=1") == 2
    err = capsys.readouterr().err
    assert f"model.init_from: {parent} is not the architecture" in err and "head.weight" in err
    assert _train(synth_shards, run, f"model.init_from={parent}", "model.init_sha256=abc", "train.max_steps=1") == 2
    assert "the parent changed since this run started from it" in capsys.readouterr().err
    assert _train(synth_shards, run, f"model.init_from={tmp_path / 'nope'}", "train.max_steps=1") == 2
    assert "does not exist" in capsys.readouterr().err
    weights = parent / "model.safetensors"
    assert _train(synth_shards, run, f"model.pretrained_file={weights}", "train.max_steps=1") == 2
    assert f"start a new run from it with model.init_from={parent}" in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def test_a_run_takes_hard_negatives_and_refuses_a_bad_file_before_training(parent, synth_shards, tmp_path, caplog):
    """data.hard_negatives (`retrieval feedback export`): read before any work (one line naming file:line), used by
    the loader (tests/test_loader.py checks the batches)."""
    from retrieval.data.negatives import write_pairs

    caplog.set_level(logging.INFO, logger="retrieval.train.build")
    write_pairs(tmp_path / "neg.tsv", {(1, 2): 3, (5, 9): 1})
    argv = [f"model.init_from={parent}", f"data.hard_negatives={tmp_path / 'neg.tsv'}", "train.max_steps=1"]
    assert _train(synth_shards, tmp_path / "run", *argv) == 0
    assert "2 hard-negative class pairs" in caplog.text
    (tmp_path / "bad.tsv").write_text("1\t2\n3\n")
    assert (
        _train(synth_shards, tmp_path / "bad", f"data.hard_negatives={tmp_path / 'bad.tsv'}", "train.max_steps=1") == 2
    )
    assert not (tmp_path / "bad" / "checkpoints").exists()
