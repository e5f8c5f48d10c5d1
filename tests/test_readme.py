"""The README stays true: its CPU command blocks run, and its config reference equals the dataclasses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.config.reference import reference_markdown

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _reference_section(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_reference() -> None:
    """Regenerate the README's config reference: `python tests/test_readme.py`."""
    text = README.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{START}\n{reference_markdown()}{END}{tail}")


def test_config_reference_matches_dataclasses():
    # a comment continued on the next line is part of the field's meaning
    assert "so a capped run continues exactly when resumed with a higher cap" in reference_markdown()
    assert _reference_section(README.read_text()) == reference_markdown(), (
        "README config reference is stale: run `python tests/test_readme.py`"
    )


def _runnable_blocks() -> list[str]:
    return re.findall(r"<!-- cpu-runnable -->\s*```bash\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_runnable_blocks():
    assert _runnable_blocks(), "no block marked <!-- cpu-runnable --> in README.md"


@pytest.mark.parametrize("index", range(len(_runnable_blocks())))
def test_readme_cpu_block_runs(index, tmp_path):
    script = "set -euo pipefail\n" + _runnable_blocks()[index]
    env = dict(
        os.environ,
        WORK=str(tmp_path),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"README block {index} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


if __name__ == "__main__":
    write_reference()
