"""What dist reads from launchers: the precision `accelerate launch --mixed_precision` / a profile sets (taken by
`auto`, a conflict is one line), and the world of a plain `srun` step (tests/test_slurm.py runs one for real)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _launch import accelerate_cmd, cpu_env, run
from conftest import TINY, embed_args

from retrieval import dist
from retrieval.cli import main
from retrieval.errors import UserError


@pytest.mark.parametrize(
    "ours,launcher,cuda,expected",
    [
        ("auto", None, False, "no"),
        ("auto", None, True, "bf16"),
        ("auto", "no", True, "bf16"),  # accelerate exports `no` when nothing was said
        ("auto", "bf16", False, "bf16"),
        ("auto", "fp16", True, "fp16"),
        ("bf16", "bf16", True, "bf16"),
        ("no", "no", True, "no"),
        ("fp16", None, True, "fp16"),
    ],
)
def test_auto_takes_the_launchers_precision(ours, launcher, cuda, expected, monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if launcher is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert dist.resolve_precision(ours, cuda) == expected


def test_a_precision_conflict_is_one_line(synth_shards: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match="train.precision=bf16, but the launcher asks for mixed_precision fp16"):
        dist.resolve_precision("bf16", True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UserError, match="'fp8' is not supported"):
        dist.resolve_precision("auto", True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    argv = embed_args(TINY, synth_shards, tmp_path / "e", "--precision", "fp16", "--workers", "0", untrained=True)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "retrieval embed: error: --precision=fp16, but the launcher asks for mixed_precision bf16"
    )
    assert not (tmp_path / "e").exists()  # refused before any work


@pytest.mark.dist
def test_accelerate_launch_mixed_precision_reaches_auto(synth_shards: Path, tmp_path: Path) -> None:
    """`accelerate launch --mixed_precision bf16 -m retrieval embed` (our --precision auto) embeds in bf16."""
    argv = embed_args(TINY, synth_shards, tmp_path / "e", "--workers", "0", split="val", untrained=True)
    proc = run(accelerate_cmd(1, argv, extra=["--cpu", "--mixed_precision", "bf16"]), env=cpu_env())
    assert "1 process(es), mixed precision bf16" in proc.stderr, proc.stderr[-3000:]


def test_slurm_world_from_a_plain_srun_step(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    step = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242"}
    step |= {"SLURM_STEP_ID": "3", "SLURM_STEP_NODELIST": "gpu[07-08,12],cpu1", "SLURM_NTASKS": "16"}
    for name, value in step.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x2)")
    world = dist.slurm_world()
    assert world == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + (4242 * 97 + 3) % 20000),
    }
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert dist.slurm_world()["MASTER_ADDR"] == "10.0.0.1"  # the user's own wins
    monkeypatch.setenv("RANK", "0")
    assert dist.slurm_world() == {}  # a launcher set the world: Slurm's variables are not consulted
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # a batch script's shell: SLURM_NTASKS alone is not a step
    assert dist.slurm_world() == {}
    assert dist.first_host("node1") == "node1" and dist.first_host("a[3-4]") == "a3"
