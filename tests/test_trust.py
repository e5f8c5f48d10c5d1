"""The trust model (README "Trust model"), one test per rule: only what the user typed runs commands.

* a shard folder's or a remote prefix's ``stats.json`` never makes ``embed``/``train`` run a command it lists;
* a remote prefix's shard names are plain file names, never paths or shell text;
* the user's opt-in (``--allow-listed-commands`` / ``data.allow_listed_commands``) lets listed commands run;
* a run folder's checkpoint never unpickles code on ``--resume`` (see also tests/test_train.py), and loading its
  model never opens a pickle at all.

Planted commands write a marker file; each test asserts it is absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY, embed_args
from test_sources import serve

from retrieval.cli import main
from retrieval.data import source
from retrieval.errors import UserError

FAST = ["log.wandb=disabled", "data.num_workers=0", "train.eval_every=0", "train.epochs=1", "data.steps_per_epoch=1"]


def _planted_index(shards: Path, folder: Path, marker: Path, split: str = "test") -> Path:
    """A copy of ``shards`` whose stats.json lists, for ``split``, ``pipe:`` commands that touch ``marker``."""
    shutil.copytree(shards, folder)
    _list(folder, split, *(f"pipe:touch {marker}; cat {tar}" for tar in sorted(folder.glob(f"{split}-*.tar"))))
    return folder


def _list(folder: Path, split: str, *urls: str) -> None:
    stats = json.loads((folder / "stats.json").read_text())
    stats[split]["urls"] = list(urls)
    (folder / "stats.json").write_text(json.dumps(stats))


def test_a_shard_folders_stats_json_runs_no_command(synth_shards, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    idx = _planted_index(synth_shards, tmp_path / "idx", marker)
    argv = embed_args(TINY, idx, tmp_path / "emb", "--num-workers", "0", untrained=True)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stats.json: split 'test' lists the shard URL 'pipe:touch" in err and "--allow-listed-commands" in err
    assert not marker.exists()
    train = ["train", "--config", TINY, "--shards", str(idx), "--run-dir", str(tmp_path / "run"), *FAST]
    _list(idx, "train", *(f"pipe:touch {marker}; cat {t}" for t in sorted(idx.glob("train-*.tar"))))
    assert main(train) == 2 and not marker.exists()
    assert "data.allow_listed_commands=true" in capsys.readouterr().err


def test_a_remote_prefixs_stats_json_runs_no_command(synth_shards, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    idx = _planted_index(synth_shards, tmp_path / "idx", marker)
    with serve(idx) as url:
        assert main(embed_args(TINY, url, tmp_path / "emb", "--num-workers", "0", untrained=True)) == 2
        assert "which runs a program when read" in capsys.readouterr().err
        # a remote stats.json may not point at this machine's files (a path is the server's), nor list gs://
        _list(idx, "test", "/etc/hostname")
        assert source.shard_urls(url, "test") == [url + "etc/hostname"], "resolved against the server"
        for listed, words in (("file:///etc/hostname", "a path on this machine"), ("gs://b/x.tar", "runs a program")):
            _list(idx, "test", listed)
            with pytest.raises(UserError, match=words):
                source.shard_urls(url, "test")
    assert not marker.exists()


def test_a_remote_prefixs_shard_names_are_plain_file_names(synth_shards, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(synth_shards, served)
    stats = json.loads((served / "stats.json").read_text())
    for bad in ("../../etc/x.tar", "x'; touch PWNED; '.tar"):
        stats["test"]["shard_samples"] = {bad: 1}
        (served / "stats.json").write_text(json.dumps(stats))
        with serve(served) as url, pytest.raises(UserError, match="is not a plain file name"):
            source.shard_urls(url, "test")


def test_the_users_opt_in_lets_listed_commands_run(synth_shards, tmp_path):
    marker = tmp_path / "ran"
    idx = _planted_index(synth_shards, tmp_path / "idx", marker)
    urls = source.shard_urls(idx, "test", allow_commands=True)
    assert all(u.startswith("pipe:touch ") for u in urls)
    assert source.open_shard(urls[0]).read() == (idx / "test-000000.tar").read_bytes() and marker.exists()
    # typed by the user, a pipe: source runs as before (tests/test_sources.py trains and embeds from one)
    typed = f"pipe:cat {synth_shards}/test-000000.tar"
    assert source.shard_urls(typed, "test") == [typed]


def test_a_local_index_resolves_relative_urls_against_its_folder(synth_shards, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(synth_shards, idx)
    listed = ["test-000000.tar", str(idx / "test-000001.tar"), "https://host/sop/test-000002.tar"]
    _list(idx, "test", *listed)
    assert source.shard_urls(idx, "test") == [str(idx / "test-000000.tar"), *listed[1:]]


# ------------------------------------------------------------------------------------------ run folders


class _Planted:
    """Unpickled, it runs ``touch marker`` (what a replaced checkpoint file could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": _Planted(marker)}, path)


@pytest.fixture(scope="module")
def ema_xbm_run(synth_shards, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run with an EMA and a cross-batch memory, stopped after one step's checkpoint."""
    run = tmp_path_factory.mktemp("trust") / "run"
    argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run), *FAST]
    argv += ["train.ema_decay=0.5", "loss.name=multi_similarity", "loss.xbm_size=64", "data.steps_per_epoch=2"]
    assert main([*argv, "train.max_steps=1"]) == 0
    return run, [*argv, "--resume", "latest"]


def _resume_copy(ema_xbm_run, tmp_path: Path) -> tuple[Path, list[str]]:
    run, argv = ema_xbm_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy / "checkpoints" / "step_1", [str(copy) if a == str(run) else a for a in argv]


@pytest.mark.parametrize(
    "planted, words",
    [
        ("custom_checkpoint_0.pkl", "a pickled EMA/cross-batch-memory state of an older retrieval"),
        ("optimizer.bin", "optimizer.bin: its pickle names 'posix.system'"),
        ("pytorch_model/mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt: its pickle names 'posix.system'"),
    ],
)
def test_resuming_a_run_folder_unpickles_no_code(ema_xbm_run, tmp_path, capsys, planted, words):
    """A checkpoint file replaced by a pickle that runs a command: --resume refuses it in one line, before anything
    loads it (accelerate loads an old custom state with weights_only=False, DeepSpeed its .pt files)."""
    marker = tmp_path / "PWNED"
    ckpt, argv = _resume_copy(ema_xbm_run, tmp_path)
    _plant(ckpt / planted, marker)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and err[-1].startswith("retrieval train: error:")
    assert not marker.exists()


def test_a_run_folders_states_are_tensors_and_a_bad_one_is_one_line(ema_xbm_run, tmp_path, capsys):
    ckpt, argv = _resume_copy(ema_xbm_run, tmp_path)
    assert {p.name for p in ckpt.glob("*.safetensors")} == {
        "model.safetensors",
        "ema.safetensors",
        "memory.safetensors",
    }
    assert not list(ckpt.glob("custom_checkpoint_*"))
    (ckpt / "ema.safetensors").unlink()
    assert main(argv) == 2
    assert "has no ema.safetensors" in capsys.readouterr().err
    marker = tmp_path / "PWNED"
    _plant(ckpt / "memory.safetensors", marker)  # a pickle where the tensors were: read as safetensors, refused
    assert main(argv) == 2
    assert "memory.safetensors: not a readable safetensors file" in capsys.readouterr().err and not marker.exists()


def test_loading_a_model_unpickles_nothing_from_its_run_folder(ema_xbm_run, synth_shards, tmp_path):
    """`embed --model RUN` (the loader search, serve and export share) reads safetensors, YAML and JSON only: pickles
    planted where a loader might look are never opened."""
    marker = tmp_path / "PWNED"
    ckpt, _ = _resume_copy(ema_xbm_run, tmp_path)
    run = ckpt.parents[1]
    for planted in ("pytorch_model.bin", "model.pth", "final/pytorch_model.bin", "final/model.pt", "optimizer.bin"):
        _plant(run / planted, marker)
    _plant(ckpt / "custom_checkpoint_0.pkl", marker)
    assert main(embed_args(run, synth_shards, tmp_path / "emb", "--num-workers", "0", split="val")) == 0
    assert not marker.exists()
