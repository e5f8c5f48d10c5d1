import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
    assert (
        main(
            [
                "shards",
                "build",
                "--sop-root",
                str(sop),
                "--out",
                str(out),
                "--workers",
                "1",
                "--shard-size",
                "40",
                "--val-classes",
                "8",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    return out
