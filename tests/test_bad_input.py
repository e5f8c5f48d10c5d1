"""Inputs that used to give tracebacks or hang (issue 30, point 10) are one line naming the file, exit code 2:
config files that are not configs, embeddings sets whose manifest or meta.json claim another dimension, and a
failed ``--resume`` into a new folder, which leaves no folder behind."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import TINY, embed_args

from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet


def _laughs(path: Path, levels: int = 6) -> Path:
    """A YAML "billion laughs": 10 aliases of the level below per level, 10^6 values from ~700 bytes."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("alias to itself", "contains itself (a YAML alias inside its own anchor)"),
        ("binary", "is not UTF-8 text"),
        ("billion laughs", "expands to more than 100000 values"),
        ("directory", "is a directory; expected a YAML file"),
        ("huge", "bytes; a config is at most"),
    ],
)
def test_config_files_that_are_not_configs_are_one_line(tmp_path, capsys, kind, words):
    path = {
        "alias to itself": tmp_path / "self.yaml",
        "binary": Path("/bin/ls"),
        "billion laughs": _laughs(tmp_path / "laughs.yaml"),
        "directory": tmp_path,
        "huge": tmp_path / "huge.yaml",
    }[kind]
    if kind == "alias to itself":
        path.write_text("train: &a {name: *a}\n")
    if kind == "huge":
        path.write_text("# padding\n" * 200_000)
    start = time.perf_counter()
    assert main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert words in lines[-1] and str(path) in lines[-1]
    assert time.perf_counter() - start < 30 and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def parted(synth_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dims") / "emb"
    assert main(embed_args(TINY, synth_shards, out, "--num-workers", "0", untrained=True)) == 0
    return out


@pytest.mark.parametrize("layout, claims", [("parted", "parts.json"), ("parted", "meta.json"), ("merged", "meta.json")])
def test_an_embeddings_set_claiming_another_dim_is_one_line(parted, tmp_path, capsys, layout, claims):
    emb = tmp_path / "emb"
    if layout == "parted":
        shutil.copytree(parted, emb)
    else:
        EmbeddingSet.load(parted).save(emb)  # the merged layout (embed --merge)
    claimed = json.loads((emb / claims).read_text())
    claimed["dim"] = 32  # the vectors are 64-dimensional
    (emb / claims).write_text(json.dumps(claimed))
    index = ["index", "build", "--embeddings", str(emb), "--out", str(tmp_path / "index")]
    for argv in (["eval", "--embeddings", str(emb)], index):
        assert main(argv) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{emb / claims}" in line and "32" in line and "64" in line


def test_a_failed_resume_into_a_new_folder_leaves_no_folder(synth_shards, tmp_path, capsys):
    run = tmp_path / "new-run"
    argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run), "log.wandb=disabled"]
    assert main([*argv, "--resume", "latest"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not run.exists(), "a refused start leaves no run folder holding only .lock"
