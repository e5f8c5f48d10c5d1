"""Torch threads and loader workers sized from the CPUs a process really has (issue 29 point 11): its affinity,
a cgroup quota, the ranks on its machine; the user's OMP_NUM_THREADS kept. Measured figure: README (CPU threads)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from retrieval import cpus


def _cgroup(tmp_path, text: str, v1: bool = False):
    tmp_path.mkdir()
    if v1:
        (tmp_path / "cpu.cfs_quota_us").write_text(text.split()[0])
        (tmp_path / "cpu.cfs_period_us").write_text(text.split()[1])
    else:
        (tmp_path / "cpu.max").write_text(text + "\n")
    return tmp_path


@pytest.fixture
def no_launcher(monkeypatch):
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMP_NUM_THREADS", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def test_a_cgroup_quota_caps_the_cpus(tmp_path, no_launcher):
    affinity = len(os.sched_getaffinity(0))
    assert cpus.cpu_quota(_cgroup(tmp_path / "a", "max 100000")) is None
    assert cpus.available_cpus(tmp_path / "a") == affinity
    assert cpus.cpu_quota(_cgroup(tmp_path / "b", "150000 100000")) == 1.5
    assert cpus.available_cpus(tmp_path / "b") == 1  # a container of 1.5 CPUs: one thread busy, not the host's
    assert cpus.cpu_quota(_cgroup(tmp_path / "c", "50000 100000", v1=True)) == 0.5
    assert cpus.available_cpus(tmp_path / "c") == 1  # never 0


def test_workers_take_a_cpu_each_and_threads_the_rest(tmp_path, monkeypatch, no_launcher):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    root = tmp_path  # no quota
    assert cpus.cpu_share(None, root) == cpus.CpuShare(cpus=16, ranks=1, workers=4, threads=12)
    assert cpus.cpu_share(1, root).threads == 15  # workers set by the config: the threads follow
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks on this machine: 2 CPUs each
    assert cpus.cpu_share(None, root) == cpus.CpuShare(cpus=16, ranks=8, workers=1, threads=1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "16(x2)")  # Slurm's form for 2 nodes of 16 tasks
    assert cpus.cpu_share(None, root) == cpus.CpuShare(cpus=16, ranks=16, workers=0, threads=1)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's (and launch_env's) choice stands
    assert cpus.cpu_share(2, root).threads == 3


def test_the_choice_is_applied_and_logged_once(tmp_path, monkeypatch, caplog, no_launcher):
    """Two cores, one rank, one loader worker: one torch thread (torch's default would be 2, beside the worker)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpus, "CGROUP", str(tmp_path))
    before = torch.get_num_threads()
    caplog.set_level(logging.INFO, logger="retrieval.cpus")
    try:
        share = cpus.use_cpu_share(1, "train")
        assert (share.workers, share.threads, torch.get_num_threads()) == (1, 1, 1)
        cpus.use_cpu_share(4, "embed")
    finally:
        torch.set_num_threads(before)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "train: 2 CPU(s) for this process (affinity, cgroup quota), 1 rank(s) on this machine: 2 per rank, "
        "1 loader worker(s) + 1 torch thread(s) each"
    )
    assert "embed: 4 loader worker(s) per rank on 2 CPU(s) per rank compete with the model" in lines[-1]
