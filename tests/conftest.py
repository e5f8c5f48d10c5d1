"""What the tests share: the tiny model's settings (read from configs/tiny.yaml, never restated), the argument
lists of the commands they run most, and the session's synthetic shards. Test modules import the helpers with
``from conftest import ...`` (this folder is on ``sys.path``)."""

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")  # the tests' experiment config: a tiny SwinV2, trains in a minute
sys.path.insert(0, str(Path(__file__).resolve().parent))


def tiny_model() -> dict:
    """``model`` of configs/tiny.yaml: ``name`` and the timm ``kwargs`` of the tiny SwinV2."""
    return yaml.safe_load(Path(TINY).read_text())["model"]


def tiny_timm_kwargs() -> dict:
    """``timm.create_model(tiny_model()["name"], **tiny_timm_kwargs())``: the tiny backbone alone (pooled features)."""
    return {**tiny_model()["kwargs"], "pretrained": False, "num_classes": 0}


def embed_args(model, shards, out, *extra: str, split: str = "test", untrained: bool = False) -> list[str]:
    """``retrieval embed`` of ``split`` (``extra``: more options, e.g. ``--num-workers 0``)."""
    argv = ["embed", "--model", str(model), *(["--untrained"] if untrained else [])]
    return argv + ["--shards", str(shards), "--split", split, "--out", str(out), *extra]


def shards_build_args(sop, out, *extra: str) -> list[str]:
    """``retrieval shards build`` of a synthetic SOP folder (``extra``: e.g. ``--shard-size 40``)."""
    return ["shards", "build", "--sop-root", str(sop), "--out", str(out), *extra]


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """Tiny synthetic SOP catalogue written to shards once per session (train/val/test, several shards each)."""
    from retrieval.cli import main

    root = tmp_path_factory.mktemp("synth")
    sop, out = root / "sop", root / "shards"
    assert (
        main(["synth-sop", str(sop), "--classes", "80", "--images-per-class", "4-6", "--seed", "0", "--size", "80"])
        == 0
    )
    build = shards_build_args(sop, out, "--workers", "1", "--shard-size", "40", "--val-classes", "8", "--seed", "0")
    assert main(build) == 0
    return out
