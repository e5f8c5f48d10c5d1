"""slurm/train.sbatch on a real single-node Slurm (slurmctld + slurmd on localhost, started by .ci/slurm-up.sh).

The scripts run unchanged: CPU-only differences are sbatch options and environment variables set here
(--gres=none, --cpus-per-task, ACCELERATE_USE_CPU=1, NPROC_PER_NODE=2, LAUNCH_PROFILE=launch/cpu_2proc.yaml).
The preemption test sends USR1 to the batch shell the way Slurm's own `--signal=B:USR1@120` does
(`scancel --batch --signal=USR1`), then checks that the job requeued itself and resumed to the same weights
as an uninterrupted run. The static checks at the bottom need no Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from retrieval.embed.embeddings import EmbeddingSet

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "slurm" / "train.sbatch"
# 8 optimizer steps over 2 epochs: long enough to signal mid-run, short enough for CI.
OVERRIDES = [
    "log.wandb=disabled",
    "data.num_workers=0",
    "train.log_every=1",
    "train.deterministic=true",
    "train.epochs=2",
    "data.steps_per_epoch=4",
    "train.eval_every=1",
]
STEPS = 8


def _slurm_conf() -> str | None:
    """SLURM_CONF of the local test cluster (from the env, or the file .ci/slurm-up.sh writes)."""
    if os.environ.get("SLURM_CONF"):
        return os.environ["SLURM_CONF"]
    state = Path(os.environ.get("RETRIEVAL_SLURM_DIR") or Path(tempfile.gettempdir()) / "retrieval-slurm")
    env_file = state / "slurm.env"
    if env_file.is_file():
        m = re.search(r"SLURM_CONF=(\S+)", env_file.read_text())
        return m.group(1) if m else None
    return None


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    conf = _slurm_conf()
    if not shutil.which("sbatch") or conf is None:
        pytest.skip("no local Slurm: start one with .ci/slurm-up.sh (.ci/run does it)")
    env = dict(os.environ, SLURM_CONF=conf)
    ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        pytest.skip(f"local Slurm not answering (SLURM_CONF={conf}): {ping.stdout.strip()} {ping.stderr.strip()}")
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{venv_bin}:{env.get('PATH', '')}",
        VIRTUAL_ENV=sys.prefix,  # the job uses this interpreter's environment
        ACCELERATE_USE_CPU="1",
        NPROC_PER_NODE="2",
        LAUNCH_PROFILE="launch/cpu_2proc.yaml",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    return env


def _submit(env: dict[str, str], log: Path, script: str, *args: str, wait: bool = False) -> str:
    """sbatch with the CPU-only options; returns the job id (with wait: after the job ended, checking its status)."""
    flags = ["--parsable", "--gres=none", "--cpus-per-task=2", "--time=10", f"--output={log}"]
    flags += ["--wait"] if wait else []  # sbatch --wait exits with the job's exit status
    proc = subprocess.run(
        ["sbatch", *flags, str(REPO / "slurm" / script), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"sbatch {script}: {proc.stderr}\n{log.read_text()[-6000:] if log.exists() else ''}"
    return proc.stdout.strip().split(";")[0]


def _train_args(run_dir: Path, shards: Path) -> list[str]:
    return ["configs/tiny.yaml", "--shards", str(shards), "--run-dir", str(run_dir), *OVERRIDES]


def _job(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _train_steps(run_dir: Path) -> list[int]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if x["kind"] == "train"]


@pytest.fixture(scope="module")
def reference_run(slurm_env, synth_shards, tmp_path_factory) -> Path:
    """One uninterrupted job, submitted as a user would: `sbatch --wait` returns the job's exit status."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    run_dir = tmp / "run"
    _submit(slurm_env, tmp / "job.out", "train.sbatch", *_train_args(run_dir, synth_shards), wait=True)
    return run_dir


@pytest.mark.slurm
def test_train_job_writes_run(reference_run: Path) -> None:
    run = reference_run
    assert _train_steps(run) == list(range(1, STEPS + 1))
    assert (run / "model.safetensors").is_file() and (run / "final" / "model.safetensors").is_file()
    assert (run / (run / "latest").read_text().strip() / "trainer_state.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights_agree"] and not summary["preempted"] and summary["global_step"] == STEPS
    job_log = next(run.glob("slurm-*.out")).read_text()  # the job's log is linked into the run folder
    assert "1 node(s) x 2 process(es)" in job_log
    assert "--num_processes 2" in job_log and "--resume auto" in job_log


@pytest.mark.slurm
def test_preempted_job_requeues_and_resumes(slurm_env, synth_shards, reference_run, tmp_path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit(slurm_env, log, "train.sbatch", *_train_args(run_dir, synth_shards))
    try:
        _wait_for_step(run_dir, 1, log)  # early: 7 steps of margin for the signal to arrive
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True)
        info = _wait_for_end(slurm_env, job)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-6000:]}"
    assert int(info["Restarts"]) == 1, f"no requeue (did the signal come after training ended?)\n{text[-6000:]}"
    assert "requeueing job" in text and "start (restart 1)" in text and "resumed from" in text
    # Each step once: the requeued job continued from the checkpoint, neither from scratch nor repeating.
    assert _train_steps(run_dir) == list(range(1, STEPS + 1))
    assert not (run_dir / "preempted").exists()
    ref, got = _final_weights(reference_run), _final_weights(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert (ref[k] == got[k]).all(), f"{k}: preempted+resumed run differs from the uninterrupted one"


@pytest.mark.slurm
def test_embed_job(slurm_env, synth_shards, reference_run, tmp_path) -> None:
    """slurm/embed.sbatch: rank-sharded embedding under accelerate launch, then index build and eval."""
    out, log = tmp_path / "emb", tmp_path / "job.out"
    env = dict(slurm_env, EMBED_ARGS="--workers 0 --batch-size 32")
    job = _submit(env, log, "embed.sbatch", str(reference_run), str(synth_shards), "test", str(out))
    info = _wait_for_end(env, job)  # polled: sbatch --wait's growing poll interval costs ~15 s here
    assert info["ExitCode"] == "0:0", log.read_text()[-6000:]
    es = EmbeddingSet.load(out)  # parts or merged: the set's own reader
    stats = json.loads((synth_shards / "stats.json").read_text())
    ids = es.ids
    assert len(ids) == len(set(ids.tolist())) == stats["test"]["samples"], es.meta
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["recall@1"] <= 1
    index = out.with_name(out.name + "-index")  # beside the set: a re-embed replaces the set folder whole
    assert index.is_dir() and any(index.iterdir())


@pytest.mark.slurm
def test_failed_job_ends_with_the_workers_one_line_error(slurm_env, tmp_path) -> None:
    """A bad --shards: the job log's last line is the trainer's clear error (after accelerate's ChildFailedError
    block), and the job's exit code is 2, as for a one-process run."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit(slurm_env, log, "train.sbatch", *_train_args(run_dir, tmp_path / "no-shards"))
    info = _wait_for_end(slurm_env, job)
    text = log.read_text()
    assert info["ExitCode"] == "2:0", f"{info}\n{text[-6000:]}"
    last = text.strip().splitlines()[-1]
    assert last.startswith("retrieval train: error:") and "no-shards" in last, text[-6000:]


def _wait_for_step(run_dir: Path, step: int, log: Path, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (run_dir / "metrics.jsonl").is_file() and any(s >= step for s in _train_steps(run_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"training never reached step {step}:\n{log.read_text()[-4000:] if log.exists() else ''}")


def _wait_for_end(env: dict[str, str], job: str, timeout: float = 400) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = _job(env, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish in {timeout} s: {_job(env, job)}")


# ---------------------------------------------------------------------------------------------
# Static checks (no Slurm needed): the scripts parse and carry the options the issue requires.


@pytest.mark.parametrize("script", ["train.sbatch", "embed.sbatch", "_common.sh"])
def test_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / "slurm" / script)], check=True)


def test_train_sbatch_options() -> None:
    opts = re.findall(r"^#SBATCH (\S+)", TRAIN.read_text(), flags=re.M)
    for required in ("--ntasks-per-node=1", "--requeue", "--open-mode=append"):
        assert required in opts
    for prefix in ("--nodes=", "--gres=gpu:", "--cpus-per-task=", "--signal=B:USR1@"):
        assert any(o.startswith(prefix) for o in opts), prefix


@pytest.mark.slurm
def test_plain_srun_forms_the_world(slurm_env, synth_shards, tmp_path) -> None:
    """`srun -n 2 python -m retrieval train ...` with no launcher (one task per process, the DINOv2/OpenCLIP habit):
    dist forms a 2-rank world from SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID and trains."""
    import torch

    env = dict(slurm_env)
    if not torch.cuda.is_available():
        env.pop("ACCELERATE_USE_CPU")  # a CPU-only host needs no launcher variable either
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "retrieval", "train", "--config", *_train_args(run_dir, synth_shards)]
    argv += ["train.epochs=1", "data.steps_per_epoch=2"]  # after OVERRIDES: these win
    proc = subprocess.run(
        ["srun", "-n", "2", "--cpus-per-task=1", "--time=10", *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "world=2 per-rank batch=32" in proc.stderr and "2 process(es)" in proc.stderr, proc.stderr[-6000:]
    assert _train_steps(run_dir) == [1, 2]
    state = json.loads((run_dir / (run_dir / "latest").read_text().strip() / "trainer_state.json").read_text())
    assert state["world_size"] == 2, state
