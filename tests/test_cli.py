"""The command line: dotted overrides anywhere on the line, `train --print-config`, one name per meaning with every
old spelling still working (hidden from --help), and a missing optional extra as one line with exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from retrieval.cli import COMMANDS, main, parse


def test_overrides_before_between_and_after_options_all_apply(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["train", "train.epochs=3", "--config", TINY, "optim.lr=0.5", "--shards", str(tmp_path / "s")]
    argv += ["train.max_steps=7", "--resume", "auto", "log.wandb=disabled", "--print-config"]
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["epochs"] == 3 and cfg["optim"]["lr"] == 0.5 and cfg["train"]["max_steps"] == 7
    assert cfg["log"]["wandb"] == "disabled" and cfg["data"]["shards"] == str(tmp_path / "s")
    assert cfg["model"]["name"] == yaml.safe_load(Path(TINY).read_text())["model"]["name"]
    assert not (tmp_path / "s").exists() and not (tmp_path / "runs").exists()  # printed, nothing started


def test_print_config_names_a_bad_override(capsys) -> None:
    assert main(["train", "--config", TINY, "--print-config", "optim.lr=abc"]) == 2
    assert "optim.lr: expected a number, got 'abc'" in capsys.readouterr().err


# command, the new spelling, the old one: each pair must parse to the same arguments
RENAMED = [
    ("embed", ["--vector-dtype", "float16"], ["--dtype", "float16"]),
    ("embed", ["--workers", "3"], ["--num-workers", "3"]),
    ("eval", ["--query-embeddings", "q", "--gallery-embeddings", "g"], ["--queries", "q", "--gallery", "g"]),
    ("eval", ["--search-precision", "bf16"], ["--dtype", "bf16"]),
    ("report", ["--html", "r.html", "--num-queries", "4"], ["--out", "r.html", "--queries", "4"]),
    ("demo", ["--processes", "3"], ["--nproc", "3"]),
]
REQUIRED = {"embed": ["--model", "m", "--shards", "s", "--out", "o"], "report": ["--run-dir", "r"]}


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    module = importlib.import_module(COMMANDS[command][0])
    return parse(module, argparse.ArgumentParser(prog=f"retrieval {command}"), REQUIRED.get(command, []) + argv)


@pytest.mark.parametrize("command,new,old", RENAMED, ids=[f"{c}{o[0]}" for c, _, o in RENAMED])
def test_every_renamed_flag_keeps_its_old_spelling(command: str, new: list[str], old: list[str], capsys) -> None:
    expected, got = _parse(command, new), _parse(command, old)
    assert vars(got) == vars(expected) and vars(got) != vars(_parse(command, []))
    assert f"{old[0]} is now {new[0]}" in capsys.readouterr().err
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"retrieval {command}")
    module.add_arguments(parser)
    assert new[0] in parser.format_help() and old[0] + " " not in parser.format_help()  # hidden


def test_old_positionals_still_work(tmp_path: Path, capsys) -> None:
    """`export RUN` and `report RUN` (now --model / --run-dir): the same command, the same error for a bad folder."""
    for old, new in (
        (["export", str(tmp_path / "nope"), "--format", "timm", "--out", str(tmp_path / "o")], "--model"),
        (["report", str(tmp_path / "nope")], "--run-dir"),
    ):
        assert main(old) == 2
        err_old = capsys.readouterr().err
        assert main([old[0], new, *old[1:]]) == 2
        assert capsys.readouterr().err == err_old and "nope" in err_old


@pytest.mark.parametrize(
    "hidden,argv,extra",
    [
        (["starlette"], ["serve", "--index", "idx"], "serve"),
        (["onnxscript"], ["export", "--model", "m", "--format", "onnx", "--out", "o"], "export"),
        (["pyarrow"], ["embeddings", "export", "e", "--format", "parquet", "--out", "o"], "interop"),
    ],
    ids=["serve-starlette", "export-onnxscript", "export-pyarrow"],
)
def test_a_missing_extra_is_one_line_and_exit_2(hidden, argv, extra, tmp_path: Path, monkeypatch, capsys) -> None:
    from retrieval.embed.embeddings import EmbeddingSet

    EmbeddingSet(__import__("numpy").eye(3, dtype="float32"), [0, 1, 2], [0, 0, 1], [0, 0, 0]).save(tmp_path / "e")
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m.split(".")[0] in hidden] + hidden:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` (and its submodules) fails as if not installed
    for cached in ("retrieval.search.serve", "retrieval.cli.serve"):
        monkeypatch.delitem(sys.modules, cached, raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install 'retrieval[{extra}]'" in err[0] and hidden[0] in err[0], err
