"""Two "nodes" on one host: two `accelerate launch` processes with --num_machines 2 rendezvous over 127.0.0.1.

This is exactly how a multi-node job starts (slurm/train.sbatch runs the same command once per node), minus
Slurm: one launcher per node, each with its --machine_rank, the same main address/port and the TOTAL
--num_processes, using the multi-node profile launch/ddp_multinode.yaml (on CPU: ACCELERATE_USE_CPU=1 and
--mixed_precision no). The run dir is shared, as on a cluster's shared filesystem.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from _launch import ACCELERATE, REPO, cpu_env, free_port

pytestmark = pytest.mark.dist

STEPS = 4
OVERRIDES = [
    "log.wandb=disabled",
    "data.num_workers=0",
    "train.log_every=1",
    "train.deterministic=true",
    "train.epochs=2",
    f"data.steps_per_epoch={STEPS // 2}",
    "train.eval_every=1",
]


def _node_cmd(rank: int, port: int, shards: Path, run_dir: Path) -> list[str]:
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO / "launch" / "ddp_multinode.yaml"),
        "--num_machines",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "-m",
        "retrieval",
        "train",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--shards",
        str(shards),
        "--run-dir",
        str(run_dir),
        *OVERRIDES,
    ]


def test_two_nodes_on_localhost(synth_shards: Path, tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    cwds = [tmp_path / "node0", tmp_path / "node1"]  # each "node" starts in its own folder
    procs = []
    for rank, cwd in enumerate(cwds):
        cwd.mkdir()
        procs.append(
            subprocess.Popen(
                _node_cmd(rank, port, synth_shards, run_dir),
                cwd=cwd,
                env=cpu_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"node {rank} failed ({p.returncode}):\n{out[-6000:]}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["weights_agree"] is True, "ranks on the two nodes ended with different weights"
    assert summary["global_step"] == STEPS and not summary["preempted"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # One writer: every step logged exactly once (a second writer would duplicate lines).
    assert [x["step"] for x in lines if x["kind"] == "train"] == list(range(1, STEPS + 1))
    assert len([x for x in lines if x["kind"] == "val"]) == 2
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "final" / "model.safetensors").is_file()
    latest = run_dir / (run_dir / "latest").read_text().strip()
    # The checkpoint holds both ranks' RNG states (assembled on the shared run dir), nothing half-written.
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in latest.iterdir()}
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    for cwd in cwds:  # nothing written relative to either node's working directory
        assert not any(cwd.iterdir()), f"{cwd} got {sorted(p.name for p in cwd.iterdir())}"
    assert "world=2" in outs[0] and "world=2" not in outs[1], "only rank 0 (node 0) logs the run header"
