"""Fault campaign (``make faults``; not in the default test suite): kill a 2-process tiny run with SIGKILL at
random instants, resume each, and check what survived.

    python bench/faults.py --trials 20 --seed 0 [--work DIR]

One uninterrupted reference run first (``train.deterministic=true`` on CPU: bitwise reproducible). Then each
trial starts the same run, kills the whole launcher process group with SIGKILL at an instant (half of them
uniform over the run's duration, half right after an event in the run folder: a checkpoint being written or
renamed into place, ``latest``/``best`` rewritten, an export being written), resumes it with ``--resume auto``
and reports:

- resumed: the resume exited 0 and the run finished (summary.json, not preempted);
- final identical: final/model.safetensors equals the reference's byte for byte;
- best consistent: ``best`` names the checkpoint of the summary's best_step, model.safetensors holds exactly its
  weights, and best_step equals the reference's.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval import dist  # noqa: E402
from retrieval.run_folder import RunFolder  # noqa: E402

TINY = str(REPO / "configs" / "tiny.yaml")
RUN = [
    "log.wandb=disabled",
    "data.num_workers=0",
    "train.deterministic=true",
    "train.epochs=2",
    "data.steps_per_epoch=4",
    "train.checkpoint_every=3",
    "train.log_every=1",
]
EVENTS = {  # file-system signs of the windows worth killing in
    "checkpoint being written": lambda run: any(run.checkpoints_path.glob(".tmp-step_*")),
    "checkpoint in place": lambda run: run.latest() is not None,
    "best pointer": lambda run: run.best() is not None,
    "export being written": lambda run: any(run.path.glob(".model.safetensors.*")) or run.has_model("best"),
    "final export": lambda run: any((run.path / "final").glob("*")),
}


def _env() -> dict[str, str]:
    return dist.launch_env(cpu=True, WANDB_MODE="disabled", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def _cmd(shards: Path, run_dir: Path, resume: bool) -> list[str]:
    args = ["train", "--config", TINY, "--shards", str(shards), "--run-dir", str(run_dir), *RUN]
    return dist.accelerate_command(2, args + (["--resume", "auto"] if resume else []))


def _shards(work: Path) -> Path:
    out = work / "shards"
    if (out / "stats.json").is_file():
        return out
    py = [sys.executable, "-m", "retrieval"]
    subprocess.run(
        [*py, "synth-sop", str(work / "sop"), "--classes", "80", "--images-per-class", "4-6", "--size", "80"],
        check=True,
        env=_env(),
    )
    build = ["shards", "build", "--sop-root", str(work / "sop"), "--out", str(out), "--shard-size", "40"]
    subprocess.run([*py, *build, "--workers", "1", "--val-classes", "8"], check=True, env=_env())
    return out


def _run(shards: Path, run_dir: Path, resume: bool = False, log: Path | None = None) -> int:
    with open(log or os.devnull, "a") as f:
        return subprocess.run(_cmd(shards, run_dir, resume), env=_env(), stdout=f, stderr=f).returncode


def kill_after(proc: subprocess.Popen, states: list, delay: float, poll: float = 0.005) -> bool:
    """SIGKILL ``proc``'s process group ``delay`` seconds after each of ``states`` (predicates, in order) held once,
    or after its start when there are none; False if it ended first. Shared by the fault campaigns."""
    states, since = list(states), time.monotonic()
    while proc.poll() is None:
        while states and states[0]():
            states.pop(0)
            since = time.monotonic()
        if not states and time.monotonic() - since >= delay:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(poll)
    return False


def _killed_run(shards: Path, run_dir: Path, rng: random.Random, duration: float, log: Path) -> str:
    """Start the run and SIGKILL its whole process group at a random instant; returns where it was killed."""
    run = RunFolder(run_dir)
    event = rng.choice([None, *EVENTS]) if rng.random() < 0.5 else None
    delay = rng.uniform(0, 0.05) if event else rng.uniform(0.1, 1.0) * duration
    with open(log, "a") as f:
        proc = subprocess.Popen(_cmd(shards, run_dir, False), env=_env(), stdout=f, stderr=f, start_new_session=True)
    killed = kill_after(proc, [lambda: EVENTS[event](run)] if event else [], delay)
    where = f"after '{event}' +{delay * 1000:.0f} ms" if event else f"at {delay:.1f} s"
    return where if killed else where + " (the run had already ended)"


def _best_consistent(run: RunFolder, reference_best: int | None) -> bool:
    summary = run.read_summary() or {}
    best_step = summary.get("best_step")
    if best_step != reference_best:
        return False
    if best_step is None:
        return run.has_model("best")
    ckpt = run.checkpoints_path / f"step_{best_step}"
    if run.best() != ckpt or not run.has_model("best"):
        return False
    exported = load_file(str(run.model_dir("best") / "model.safetensors"))
    saved = {k.split("module.", 1)[-1]: v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    return exported.keys() == saved.keys() and all(np.array_equal(exported[k], saved[k]) for k in exported)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    shards, rng = _shards(work), random.Random(args.seed)
    reference = RunFolder(work / "reference")
    shutil.rmtree(reference.path, ignore_errors=True)
    t0 = time.monotonic()
    assert _run(shards, reference.path, log=work / "reference.log") == 0, f"reference run failed: {work}/reference.log"
    duration = time.monotonic() - t0
    ref_final = (reference.model_dir("final") / "model.safetensors").read_bytes()
    ref_best = reference.read_summary()["best_step"]
    print(f"reference run: {duration:.1f} s, best_step {ref_best}", flush=True)
    counts = {"resumed": 0, "final identical": 0, "best consistent": 0}
    for i in range(args.trials):
        run = RunFolder(work / f"trial-{i:02d}")
        shutil.rmtree(run.path, ignore_errors=True)
        log = work / f"trial-{i:02d}.log"
        where = _killed_run(shards, run.path, rng, duration, log)
        rc = _run(shards, run.path, resume=True, log=log)
        summary = run.read_summary() or {}
        ok = {
            "resumed": rc == 0 and bool(summary) and not summary.get("preempted"),
            "final identical": run.has_model("final")
            and (run.model_dir("final") / "model.safetensors").read_bytes() == ref_final,
            "best consistent": _best_consistent(run, ref_best),
        }
        for k, v in ok.items():
            counts[k] += bool(v)
        marks = " ".join(f"{k}={'yes' if v else 'NO'}" for k, v in ok.items())
        print(f"trial {i + 1:2d}/{args.trials}: killed {where}; resume rc={rc}; {marks}", flush=True)
        if all(ok.values()):
            shutil.rmtree(run.path, ignore_errors=True)
    n = args.trials
    print(", ".join(f"{k} {v}/{n}" for k, v in counts.items()), flush=True)
    if args.work is None and all(v == n for v in counts.values()):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(v == n for v in counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
