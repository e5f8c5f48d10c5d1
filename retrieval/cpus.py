"""The CPUs a process really has, and the torch threads and loader workers sized from them.

``os.cpu_count()`` and torch's default thread count see the host's cores: a container limited to 2 CPUs on a
64-core host, or 8 ranks sharing one machine, would each start one thread per core and loader workers beside them,
and fight over the CPUs (issue 29: 1-process CPU training ran at 26 images/s with torch's default threads beside
its loader worker, 185 with one). Here the affinity mask and the cgroup quota give the CPUs, the ranks on the
machine share them (read through :mod:`retrieval.dist`, the one module that reads the launcher's environment),
loader workers take one each and torch's intra-op threads the rest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from retrieval import dist

log = logging.getLogger(__name__)


CGROUP = "/sys/fs/cgroup"
MAX_AUTO_WORKERS = 4  # the old fixed default; more workers than that buy little per rank and cost memory each


def _cgroup_dirs(root: Path) -> list[Path]:
    """The cgroup folders that may cap this process: the root's and, under cgroup v2/v1, its own (/proc/self/cgroup)."""
    dirs = [root, root / "cpu", root / "cpu,cpuacct"]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if controllers in ("", "cpu", "cpu,cpuacct", "cpuacct,cpu") and rel.strip("/"):
                dirs += [root / rel.strip("/"), root / "cpu" / rel.strip("/"), root / "cpu,cpuacct" / rel.strip("/")]
    except (OSError, ValueError):
        pass
    return dirs


def cpu_quota(root: str | os.PathLike | None = None) -> float | None:
    """CPUs a cgroup quota allows this process (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cfs_period_us``; the
    smallest found), None when unlimited. A container limited to 2 CPUs on a 64-core host sees 64 in ``os``."""
    quotas = []
    for folder in _cgroup_dirs(Path(root or CGROUP)):
        try:
            if (folder / "cpu.max").is_file():
                quota, period = (folder / "cpu.max").read_text().split()[:2]
                if quota != "max":
                    quotas.append(int(quota) / int(period))
            elif (folder / "cpu.cfs_quota_us").is_file():
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                if quota > 0:
                    quotas.append(quota / int((folder / "cpu.cfs_period_us").read_text()))
        except (OSError, ValueError):
            continue
    return min(quotas) if quotas else None


def available_cpus(root: str | os.PathLike | None = None) -> int:
    """CPUs this process may run on: its affinity mask (Slurm's and taskset's), capped by the cgroup quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, min(cpus, int(quota))) if quota is not None else max(1, cpus)


def local_world_size() -> int:
    """Ranks on this machine: torchrun's/accelerate's LOCAL_WORLD_SIZE, else Slurm's tasks per node, else 1."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = (dist.env(key) or "").split("(")[0]  # Slurm writes "4(x2)" for 2 nodes of 4
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


@dataclass(frozen=True)
class CpuShare:
    """One rank's share of the machine: its CPUs, the loader workers it runs and the torch threads left to it."""

    cpus: int  # available to the process (affinity, cgroup quota)
    ranks: int  # on this machine
    workers: int  # loader worker processes of this rank (each keeps about one CPU busy decoding)
    threads: int  # torch intra-op threads of this rank

    def describe(self, what: str, omp: str | None) -> str:
        per_rank = max(1, self.cpus // self.ranks)
        threads = f"{self.threads} torch thread(s)" + (f" (OMP_NUM_THREADS={omp})" if omp else "")
        return (
            f"{what}: {self.cpus} CPU(s) for this process (affinity, cgroup quota), {self.ranks} rank(s) on this "
            f"machine: {per_rank} per rank, {self.workers} loader worker(s) + {threads} each"
        )


def cpu_share(workers: int | None, root: str | os.PathLike | None = None) -> CpuShare:
    """Size loader workers (``None``: auto, at most :data:`MAX_AUTO_WORKERS`) and torch threads from the CPUs this
    rank really has: the workers take one CPU each, the threads the rest (at least 1). On 2 cores, 1-process CPU
    training ran at 26 images/s with torch's default of one thread per core beside its loader worker, 185 with one
    (issue 29). ``OMP_NUM_THREADS``, when set (``launch_env`` sets 1 for CPU jobs), is the user's: kept."""
    ranks = local_world_size()
    per_rank = max(1, available_cpus(root) // ranks)
    if workers is None:
        workers = max(0, min(MAX_AUTO_WORKERS, per_rank - 1))
    omp = dist.env("OMP_NUM_THREADS") or ""
    threads = int(omp) if omp.isdigit() and int(omp) > 0 else max(1, per_rank - workers)
    return CpuShare(available_cpus(root), ranks, workers, threads)


def use_cpu_share(workers: int | None, what: str) -> CpuShare:
    """:func:`cpu_share`, applied: torch's intra-op threads set, the choice logged once (by local rank 0)."""
    share = cpu_share(workers)
    torch.set_num_threads(share.threads)
    if dist.local_rank() == 0:
        log.info(share.describe(what, dist.env("OMP_NUM_THREADS")))
        if share.workers >= max(1, share.cpus // share.ranks):
            log.warning(
                "%s: %d loader worker(s) per rank on %d CPU(s) per rank compete with the model for them",
                what,
                share.workers,
                max(1, share.cpus // share.ranks),
            )
    return share
