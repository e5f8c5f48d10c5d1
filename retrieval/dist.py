"""The one place that reads rank/world environment variables or calls ``torch.distributed``.

Everything else asks here: ``rank()``, ``world_size()``, ``is_main()``, ``barrier()``,
``all_gather_cat()``. The getters return single-process defaults when no process group exists,
so callers never branch on "am I distributed". Launchers (``accelerate launch``, ``torchrun``,
``srun`` via ``slurm/train.sbatch``) set the standard variables ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; for those scripts Slurm's variables are translated to launcher
flags in ``slurm/_common.sh``. Under plain ``srun`` with one task per process and no launcher (the DINOv2 /
OpenCLIP habit: ``srun -n 16 --ntasks-per-node 8 python -m retrieval train ...``), :func:`slurm_world` forms
the world from the step's variables here (:func:`make_accelerator` adopts it). The backend follows the device:
NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td

from retrieval.errors import UserError
from retrieval.util import free_port

log = logging.getLogger(__name__)


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    if is_dist():
        return td.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if is_dist():
        return td.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def node_rank() -> int:
    """Machine index: accelerate sets it per node; Slurm's SLURM_NODEID is the fallback."""
    for key in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def is_main() -> bool:
    return rank() == 0


def env(name: str, default: str | None = None) -> str | None:
    """Read one environment variable (library code asks here, never ``os.environ`` directly)."""
    return os.environ.get(name, default)


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def barrier() -> None:
    if is_dist():
        td.barrier()


def destroy() -> None:
    """Tear the process group down so the interpreter exits cleanly (no gloo/NCCL abort at exit)."""
    if is_dist():
        td.barrier()
        td.destroy_process_group()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order; the local slice keeps its gradient.

    Other ranks' slices arrive without gradient. A loss computed on the result is the same global
    loss on every rank, but each rank back-propagates only through its own slice; DDP then *averages*
    the per-rank gradients, which divides the true gradient by ``world_size``. Callers multiply such a
    loss by ``world_size()`` to get exactly the single-process gradient of the concatenated batch.
    All ranks must pass tensors of the same shape.
    """
    if not is_dist() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    td.all_gather(parts, x.contiguous())
    parts[rank()] = x  # keep the autograd graph of the local slice
    return torch.cat(parts, dim=0)


def all_gather_object(obj: Any) -> list[Any]:
    if not is_dist() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` on rank ``dst`` (None elsewhere): no rank but ``dst`` holds all of them."""
    if not is_dist() or world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    td.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist() or world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_dist() and world_size() > 1:
        x = x.clone()
        td.all_reduce(x, op=td.ReduceOp.SUM)
    return x


def all_reduce_min(x: torch.Tensor) -> torch.Tensor:
    if is_dist() and world_size() > 1:
        x = x.clone()
        td.all_reduce(x, op=td.ReduceOp.MIN)
    return x


def all_equal(values: Sequence[Any]) -> bool:
    blob = pickle.dumps(list(values))
    return all(b == blob for b in all_gather_object(blob))


# ---------------------------------------------------------------------------------------------
# The Accelerator: built here and nowhere else.


def uses_deepspeed() -> bool:
    """True when `accelerate launch` was given a DeepSpeed profile (it exports this variable)."""
    return env("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def resolve_precision(precision: str, cuda: bool, setting: str = "train.precision") -> str:
    """The mixed precision to run with, given ours (``setting`` names it in errors) and the launcher's.

    ``accelerate launch --mixed_precision bf16`` or a profile's ``mixed_precision: bf16`` reach the process as
    ``ACCELERATE_MIXED_PRECISION``. ``auto`` takes that value; without one, bf16 on CUDA and fp32 on CPU. The
    launcher exports ``no`` whenever neither its flag nor its profile says anything (and DeepSpeed profiles must be
    silent), so ``no`` reads as "not set": set ``train.precision=no`` to train in fp32 on a GPU. An explicit
    setting that differs from a launcher's bf16/fp16 is one clear error, not a silent pick of either."""
    launcher = (env("ACCELERATE_MIXED_PRECISION") or "no").lower()
    if precision == "auto":
        if launcher == "no":
            return "bf16" if cuda else "no"
        if launcher not in ("bf16", "fp16"):
            raise UserError(
                f"{setting}=auto: the launcher's mixed_precision {launcher!r} is not supported (no, bf16, fp16)"
            )
        return launcher
    if launcher != "no" and launcher != precision:
        raise UserError(
            f"{setting}={precision}, but the launcher asks for mixed_precision {launcher} (accelerate launch "
            f"--mixed_precision or its config file): make them agree, or set {setting}=auto to take the launcher's"
        )
    return precision


def record_error(message: str) -> None:
    """Under torch elastic (``accelerate launch``, ``torchrun``), hand the launcher this worker's one-line error.

    The launcher reports a failed worker in a ``ChildFailedError`` block whatever the worker does; with the error
    file it reads (``TORCHELASTIC_ERROR_FILE``) that block's root cause shows this line instead of "To enable
    traceback see ...". The launcher's own exit code is 1 for any failed worker, and its block comes last: a
    wrapper that owns the launch (``retrieval launch``, ``slurm/train.sbatch``) names a file in
    ``RETRIEVAL_ERROR_FILE`` and prints the line found there after the launcher is done, with exit code 2.
    """
    import json

    for name, text in (
        ("TORCHELASTIC_ERROR_FILE", json.dumps({"message": message, "timestamp": int(time.time())})),
        ("RETRIEVAL_ERROR_FILE", message + "\n"),
    ):
        path = env(name)
        if path:
            with contextlib.suppress(OSError):
                Path(path).write_text(text)


def exit_with_parent(poll_s: float = 1.0) -> None:
    """Under a launcher (``accelerate launch``, ``torchrun``), end this worker when the launcher dies.

    A launcher killed with SIGKILL cannot stop its workers; orphaned, they would hold the GPUs, the run folder's
    lock and the rendezvous port, or hang in a collective forever. A daemon thread polls the parent pid (a
    reparented process sees another one) and exits at once. Polling rather than ``PR_SET_PDEATHSIG``: that signal
    fires when the parent *thread* that forked us ends, which an elastic agent's helper thread may do while the
    launcher lives.
    """
    import threading

    if env("LOCAL_RANK") is None and env("TORCHELASTIC_RUN_ID") is None:
        return  # a plain process: its parent is a shell or a test, not a launcher
    if any(t.name == "exit-with-parent" for t in threading.enumerate()):
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                sys.stderr.write(f"rank {rank()}: the launcher (pid {parent}) died; exiting\n")
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def slurm_world() -> dict[str, str]:
    """The standard variables of a plain ``srun`` step with several tasks and no launcher, from Slurm's; ``{}``
    when a launcher set ``RANK``/``WORLD_SIZE``, outside a job step, or for one task.

    The step's own ``SLURM_STEP_NUM_TASKS`` sizes the world, not ``SLURM_NTASKS``: a batch script's shell has the
    allocation's ``SLURM_NTASKS`` too, and a process started there directly would wait for tasks that never come.
    ``MASTER_ADDR``: the step's first host unless set; ``MASTER_PORT``: unless set, derived from the job and step
    ids (the same in every task, another for each step)."""
    tasks = env("SLURM_STEP_NUM_TASKS")
    if env("RANK") is not None or env("WORLD_SIZE") is not None or tasks is None or int(tasks) < 2:
        return {}
    per_node = re.match(r"\d+", env("SLURM_STEP_TASKS_PER_NODE") or tasks)
    job, step = int(env("SLURM_JOB_ID") or 0), int(env("SLURM_STEP_ID") or 0)
    return {
        "RANK": env("SLURM_PROCID") or "0",
        "WORLD_SIZE": tasks,
        "LOCAL_RANK": env("SLURM_LOCALID") or "0",
        "LOCAL_WORLD_SIZE": per_node.group(0) if per_node else tasks,
        "MASTER_ADDR": env("MASTER_ADDR") or first_host(env("SLURM_STEP_NODELIST") or env("SLURM_NODELIST") or ""),
        "MASTER_PORT": env("MASTER_PORT") or str(20000 + (job * 97 + step) % 20000),
    }


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[07-09,12],cpu1`` -> ``gpu07`` (``scontrol show hostnames``)."""
    found = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not found:
        raise UserError(f"SLURM_STEP_NODELIST {nodelist!r}: no host in it; set MASTER_ADDR")
    prefix, ranges = found.groups()
    return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "")


def make_accelerator(
    precision: str,
    grad_accum: int,
    project_dir: str,
    log_with: list[str] | None = None,
    setting: str = "train.precision",
):
    """One Accelerator for training/embedding, whatever the launcher (python, accelerate, torchrun, srun).

    - plain ``srun`` without a launcher: the world comes from Slurm's variables (:func:`slurm_world`).
    - ``precision`` (``setting`` names it in errors) meets the launcher's (:func:`resolve_precision`).
    - gloo is forced on CPU: accelerate's DeepSpeed path otherwise counts one process (ENV-NOTES) and
      NCCL cannot run without CUDA.
    - ``step_scheduler_with_optimizer=False``: the trainer steps its per-optimizer-step schedule once per
      update; accelerate would otherwise step it ``num_processes`` times.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    exit_with_parent()
    os.environ.update(slurm_world())  # the standard variables accelerate and torch.distributed read
    # An explicit CPU request sets cpu=True, and so does a multi-process world on a host without CUDA (accelerate
    # would see one process); not with DeepSpeed, where accelerate rejects it and finds the CPU by itself.
    force_cpu = env("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")
    force_cpu |= not torch.cuda.is_available() and world_size() > 1 and not uses_deepspeed()
    cuda = torch.cuda.is_available() and not force_cpu
    mixed = resolve_precision(precision, cuda, setting)  # a conflict fails here, before any process group
    handlers = []
    if world_size() > 1:  # a backend in a single process makes accelerate expect a process group
        backend = backend_for("cuda" if cuda else "cpu")
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=30)))
    accelerator = Accelerator(
        cpu=force_cpu,
        mixed_precision=mixed,
        gradient_accumulation_steps=grad_accum,
        step_scheduler_with_optimizer=False,
        log_with=log_with,
        project_config=ProjectConfiguration(  # tensorboard writes under logging_dir/<project>
            project_dir=project_dir,
            logging_dir=str(Path(project_dir) / "tensorboard"),
            automatic_checkpoint_naming=False,
        ),
        kwargs_handlers=handlers,
    )
    if accelerator.is_main_process:
        log.info("%d process(es), mixed precision %s", accelerator.num_processes, accelerator.mixed_precision)
    return accelerator


def configure_deepspeed(accelerator, per_rank_batch: int, grad_accum: int, grad_clip: float | None) -> None:
    """No DataLoader goes through prepare(), so tell DeepSpeed the micro batch and clipping itself."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = per_rank_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = per_rank_batch * grad_accum * accelerator.num_processes
    if grad_clip is not None:
        ds["gradient_clipping"] = grad_clip


# ---------------------------------------------------------------------------------------------
# Launching child jobs (the demo, the benchmarks, the tests): one builder of the command line and environment.


def accelerate_command(
    nproc: int, args: list[str], config_file: str | None = None, extra: list[str] | None = None
) -> list[str]:
    """``accelerate launch ... -m retrieval ARGS`` on ``nproc`` processes of this machine, on a free port.

    Without a ``config_file`` several processes get ``--multi_gpu`` (with ``launch_env(cpu=True)`` that is gloo
    on CPU: ``--cpu --num_processes 2`` would start one process, ENV-NOTES).
    """
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch"]
    if config_file:
        cmd += ["--config_file", config_file]
    elif nproc > 1:
        cmd.append("--multi_gpu")
    cmd += ["--num_processes", str(nproc), "--num_machines", "1", "--main_process_port", str(free_port())]
    return cmd + list(extra or []) + ["-m", "retrieval", *args]


def launch_env(cpu: bool, **extra: str) -> dict[str, str]:
    """This process's environment for a child job: offline hub; on CPU, accelerate's CPU mode, one thread each."""
    child = dict(os.environ)
    child.setdefault("HF_HUB_OFFLINE", "1")
    if cpu:
        child.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    child.update(extra)
    return child
