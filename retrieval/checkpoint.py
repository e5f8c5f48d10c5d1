"""Run-folder checkpoints: atomic ``step_N`` folders, ``latest``/``best`` pointers, pruning, resume lookup.

Layout of ``runs/<name>/checkpoints``::

    step_120/            accelerate save_state (model, optimizer, scheduler, scaler, RNG of every rank)
    step_120/trainer_state.json   epoch, step in epoch, global step, best metric: the data-stream position
    .tmp-step_160/       being written; renamed to step_160 only once every rank has finished
    ../latest            text file: "checkpoints/step_120"
    ../best              text file: "checkpoints/step_80"

A folder is renamed into place only after all ranks wrote their part, so a job killed mid-save leaves
at most a ``.tmp-*`` folder that is ignored and replaced; ``latest`` always names a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from retrieval.errors import UserError

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # micro-batches of that epoch already consumed (the data-stream position)
    global_step: int = 0  # optimizer steps done
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    world_size: int = 1  # the data position and the schedule are only valid for the same world and batch
    per_rank_batch: int = 0
    grad_accum: int = 1

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        path = folder / STATE_FILE
        if not path.is_file():
            raise UserError(f"checkpoint {folder} has no {STATE_FILE}: not a checkpoint written by `retrieval train`")
        return cls(**json.loads(path.read_text()))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(accelerator, run_dir: Path, state: TrainerState, keep: int) -> Path:
    """Save a complete checkpoint collectively (every rank must call it) and point ``latest`` at it."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{state.global_step}"
    tmp = ckpt_root / f".tmp-step_{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its RNG state; DeepSpeed ranks their shards
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        # never delete the folder `latest` may name before its replacement is in place
        old = ckpt_root / f".old-step_{state.global_step}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        write_atomic(run_dir / "latest", str(final.relative_to(run_dir)))
        shutil.rmtree(old, ignore_errors=True)
        _prune(run_dir, keep)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # one line per checkpoint, not one per rank
        log.info("checkpoint written: %s", final)
    return final


def mark_best(run_dir: Path, checkpoint: Path) -> None:
    write_atomic(run_dir / "best", str(checkpoint.relative_to(run_dir)))


def read_pointer(run_dir: Path, name: str) -> Path | None:
    path = run_dir / name
    if not path.is_file():
        return None
    target = run_dir / path.read_text().strip()
    return target if target.is_dir() else None


def _prune(run_dir: Path, keep: int) -> None:
    protected = {read_pointer(run_dir, "best"), read_pointer(run_dir, "latest")}
    steps = sorted(
        (p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1])
    )
    for old in steps[:-keep]:
        if old not in protected:
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``auto``: latest if one exists else fresh; ``latest``: must exist; otherwise a checkpoint path."""
    if resume in (None, "", "none"):
        return None
    if resume in ("auto", "latest"):
        found = read_pointer(run_dir, "latest")
        if found is None and (run_dir / "latest").is_file():
            raise UserError(
                f"{run_dir / 'latest'} names a checkpoint that does not exist; pass --resume PATH to a "
                f"checkpoints/step_N folder"
            )
        if found is None and resume == "latest":
            raise UserError(f"--resume latest: no complete checkpoint under {run_dir} (no valid 'latest' pointer)")
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (expected {path / STATE_FILE})")
    return path
