"""The run folder: the one place that knows its layout (``RunFolder``), and the trainer's resumable state.

Layout of ``runs/<name>``::

    config.yaml          the fully resolved config of the run (of its latest attempt)
    configs/attempt-N.yaml   the resolved config of every attempt: the fresh start is 1, each resume adds one
    .lock                exclusively flock-ed by rank 0 of the trainer using the folder (one trainer at a time)
    metrics.jsonl        one JSON object per line: {"kind": "train"|"val", "step": ..., ...}
    summary.json         written when a run (or one invocation of it) ends
    wandb_id             the run's wandb id: every resume/requeue logs into the same wandb run
    preempted            present while a preempted run waits to be resumed; holds the step
    latest               text file: "checkpoints/step_120" (the newest complete checkpoint)
    best                 text file: "checkpoints/step_80" (the checkpoint with the best validation metric)
    model.safetensors    the best model's export (+ model.yaml); the final weights when no validation ran
    model.yaml
    final/               the last step's export: model.safetensors + model.yaml
    checkpoints/
      step_120/                     accelerate save_state (model, optimizer, scheduler, scaler, RNG of every rank)
      step_120/ema.safetensors      the trainer's tensor states (EMA, cross-batch memory): retrieval.train.checkpoint
      step_120/trainer_state.json   epoch, step in epoch, global step, best metric: the data-stream position
      .tmp-step_160/                being written; renamed to step_160 only once every rank has finished

A checkpoint folder is renamed into place only after all ranks wrote their part, so a job killed mid-save
leaves at most a ``.tmp-*`` folder that is ignored and replaced; ``latest`` always names a complete
checkpoint. Every small file is written through :func:`retrieval.util.write_atomic`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retrieval import dist, util
from retrieval.config.io import config_yaml, load_config
from retrieval.config.schema import Config
from retrieval.errors import UserError
from retrieval.util import write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_DIRS = {"best": "", "final": "final"}  # export folders, relative to the run root
# the weights file of an export (retrieval.model.files.WEIGHTS_NAME; tests/test_run_folder.py holds them equal):
# named here too, so that the run folder, which the model loader reads, never imports the model package
EXPORT_WEIGHTS = "model.safetensors"


@dataclass
class TrainerState:
    """What a checkpoint adds to accelerate's own state: the position in the data stream and the selection."""

    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # micro-batches of that epoch already consumed (the data-stream position)
    global_step: int = 0  # optimizer steps done
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    world_size: int = 1  # the data position and the schedule are only valid for the same world and batch
    per_rank_batch: int = 0
    grad_accum: int = 1
    skipped: int = 0  # training samples the loader skipped so far (all ranks)
    samples_read: int = 0  # training samples read so far, skipped included (all ranks)
    samples_seen: int = 0  # training images consumed, all ranks: an elastic resume keeps it (issue 14)
    last_metric: float | None = None  # the latest validation's selection metric, and its step
    last_step: int | None = None
    val_queries: int = 0  # queries the latest validation scored (the metric's standard error)
    top_metric: float | None = None  # the highest validation so far (best_metric may be a later one within noise)

    def record_eval(self, value: float, queries: int = 0, select_last: bool = False) -> bool:
        """A validation's selection metric at ``global_step``: True if it becomes ``best`` (then remembered).

        ``best`` is the latest validation within one standard error of the highest so far
        (:func:`retrieval.util.standard_error` of the highest over ``queries``; no margin for 0 queries): a tie the
        val split cannot resolve goes to the longer-trained weights. With ``select_last`` every validation is the
        best (``train.select_metric: last``)."""
        self.last_metric, self.last_step, self.val_queries = value, self.global_step, queries
        top = self.top_metric if self.top_metric is not None else self.best_metric  # older states: no top_metric
        margin = util.standard_error(top, queries) if top is not None and queries > 0 else 0.0
        new_top = top is None or value > top
        improved = select_last or new_top or value >= top - margin
        self.top_metric = value if new_top else top
        if improved:
            self.best_metric, self.best_step = value, self.global_step
        # early stopping counts from the highest value: a plateau within the noise is no improvement
        self.evals_since_best = 0 if new_top or select_last else self.evals_since_best + 1
        return improved

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise UserError(f"checkpoint {folder} has no {STATE_FILE}: not a checkpoint written by `retrieval train`")
        return cls(**json.loads(path.read_text()))


class RunFolder:
    """A training run's folder: its config, metrics log, summary, checkpoints and exported models."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def preempted_path(self) -> Path:
        """Present while a preempted run waits for ``--resume`` (slurm/train.sbatch requeues on it)."""
        return self.path / "preempted"

    @property
    def checkpoints_path(self) -> Path:
        return self.path / "checkpoints"

    @classmethod
    def is_run(cls, path: str | os.PathLike) -> bool:
        """A folder with a resolved ``config.yaml``, i.e. one that ``retrieval train`` started."""
        return (Path(path) / "config.yaml").is_file()

    # ------------------------------------------------------------------------------------- config, logs

    def read_config(self) -> Config:
        if not self.config_path.is_file():
            raise UserError(f"{self.path}: no config.yaml (not a run folder written by `retrieval train`)")
        return load_config(self.config_path)

    def write_config(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, config_yaml(cfg))

    def read_summary(self) -> dict | None:
        if not self.summary_path.is_file():
            return None
        try:
            return json.loads(self.summary_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.summary_path}: not valid JSON (line {e.lineno}: {e.msg})") from None

    def read_config_text(self) -> str | None:
        """The resolved config as written (for people: the report shows it verbatim), or None."""
        return self.config_path.read_text() if self.config_path.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.summary_path, json.dumps(summary, indent=1))

    def read_metrics(self, notes: list[str] | None = None) -> list[dict]:
        """The records of ``metrics.jsonl`` in order. A line that is not a JSON object is skipped (and said in
        ``notes`` when given): a run killed mid-write leaves a truncated last line, and everything before it is still
        worth reading."""
        if not self.metrics_path.is_file():
            if notes is not None:
                notes.append(f"{self.metrics_path.name} not found: no curves.")
            return []
        records = []
        for n, line in enumerate(self.metrics_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON: skipped", self.metrics_path, n)
                if notes is not None:
                    notes.append(f"{self.metrics_path.name} line {n} is not JSON and was skipped.")
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def begin(self, cfg: Config, fresh: bool, resumed: TrainerState | None = None) -> None:
        """Create the folder, write the resolved config (and keep a copy per attempt under ``configs/``), clear a
        preemption mark. A fresh run drops the log lines of an earlier attempt that never checkpointed; a resume
        from a checkpoint drops the lines past it (the steps it is about to run again). Main process only."""
        self.write_config(cfg)
        self._keep_attempt_config()
        self.preempted_path.unlink(missing_ok=True)
        if fresh:
            self.metrics_path.unlink(missing_ok=True)
            self.wandb_id_path.unlink(missing_ok=True)  # a fresh start is a new wandb run too
        elif resumed is not None:
            self.truncate_metrics(resumed.global_step, resumed.samples_seen)

    def truncate_metrics(self, step: int, samples: int = 0) -> None:
        """Keep the records up to the checkpoint (and drop a line a kill cut short): a resume logs the rest again.

        By ``samples`` (images seen) where the records and the checkpoint carry it: an elastic resume renumbers the
        steps (1 process at step 100 is 2 processes at step 50), so cutting by step would keep 51-100 twice."""
        if not self.metrics_path.is_file():
            return

        def before(r: dict) -> bool:
            if samples and isinstance(r.get("samples"), int):
                return r["samples"] <= samples
            return int(r.get("step", 0)) <= step

        kept = [r for r in self.read_metrics() if before(r)]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    @property
    def attempts_path(self) -> Path:
        """``configs/attempt-N.yaml``: the resolved config of every invocation (fresh start and each resume)."""
        return self.path / "configs"

    def attempt_configs(self) -> list[Path]:
        return sorted(self.attempts_path.glob("attempt-*.yaml"), key=lambda p: int(p.stem.split("-")[1]))

    def _keep_attempt_config(self) -> None:
        self.attempts_path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.config_path, self.attempts_path / f"attempt-{len(self.attempt_configs()) + 1}.yaml")

    def lock(self) -> None:
        """Take the run folder for this process (rank 0 of a trainer) until it exits: an exclusive ``flock`` on
        ``.lock``, released by the OS however the process ends, so a killed trainer never leaves a stale lock."""
        try:
            self._lock_fd = util.lock(self.path / ".lock")
        except util.Busy as e:
            raise UserError(
                f"{self.path} is in use by another trainer (pid {e.holder}): one trainer per run folder; wait for it "
                "to end or stop it, then --resume auto"
            ) from None

    def unlock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def discard_if_only_lock(self) -> None:
        """Unlock, and remove the folder if it holds nothing but its lock (a start refused before writing)."""
        self.unlock()
        if self.path.is_dir() and [p.name for p in self.path.iterdir()] == [".lock"]:
            (self.path / ".lock").unlink()
            self.path.rmdir()

    @property
    def wandb_id_path(self) -> Path:
        return self.path / "wandb_id"

    def wandb_id(self) -> str:
        """The run's wandb id, made once and reused by every resume and requeue: one wandb run per training run
        (issue 14). Main process only."""
        if self.wandb_id_path.is_file():
            return self.wandb_id_path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        write_atomic(self.wandb_id_path, run_id)
        return run_id

    def mark_preempted(self, step: int) -> None:
        write_atomic(self.preempted_path, str(step))

    # ------------------------------------------------------------------------------------- checkpoints

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        return self._read_pointer("latest")

    def best(self) -> Path | None:
        """The checkpoint folder with the best validation metric so far, or None."""
        return self._read_pointer("best")

    def has_checkpoints(self) -> bool:
        """Whether a ``latest`` pointer exists at all (even one whose checkpoint is gone): a started run."""
        return (self.path / "latest").is_file()

    def save_checkpoint(
        self, accelerator, state: TrainerState, keep: int, needed: int = 0, extra: Callable[[Path], None] | None = None
    ) -> Path:
        """Save a complete checkpoint collectively (every rank must call it) and point ``latest`` at it.

        ``needed``: this rank's estimated bytes; every rank checks its free space first, and all fail together
        with one clear line (instead of torch's ``basic_ios::clear`` half-way through the write). ``extra(folder)``:
        every rank, after accelerate's files: the trainer's own files (its tensor states) into the same folder."""
        final = self.checkpoints_path / f"step_{state.global_step}"
        tmp = self.checkpoints_path / f".tmp-step_{state.global_step}"
        problems = [p for p in dist.all_gather_object(self.space_problem(tmp, needed)) if p]
        if problems:
            raise UserError(problems[0])
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with self.writing(tmp, needed):
            accelerator.save_state(str(tmp))  # every rank writes its RNG state; DeepSpeed ranks their shards
            if extra is not None:
                extra(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_atomic(tmp / STATE_FILE, json.dumps(asdict(state), indent=1))
            # never delete the folder `latest` may name before its replacement is in place
            old = self.checkpoints_path / f".old-step_{state.global_step}"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            self._write_pointer("latest", final)
            shutil.rmtree(old, ignore_errors=True)
            self._prune(keep)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # one line per checkpoint, not one per rank
            log.info("checkpoint written: %s", final)
        return final

    def space_problem(self, target: Path, needed: int) -> str | None:
        """The disk-full message if the filesystem of ``target`` has less than ``needed`` bytes free, else None."""
        free = util.free_bytes(target)
        return self.no_space(target, needed, free) if free < needed else None

    def no_space(self, target: Path, needed: int, free: int | None = None) -> str:
        have = f", {free / 2**20:.0f} MB free" if free is not None else ""
        return (
            f"no space left on device while writing {target} (needs ~{needed / 2**20:.0f} MB{have}): free some space "
            f"(or lower train.keep_checkpoints), then continue with --resume auto (run folder {self.path})"
        )

    @contextlib.contextmanager
    def writing(self, target: Path, needed: int):
        """Turn a disk-full failure while writing ``target`` into one clear :class:`UserError` with the resume hint."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            if util.is_disk_full(e):
                raise UserError(self.no_space(target, needed, util.free_bytes(target))) from e
            raise

    def mark_best(self, ckpt: Path) -> None:
        self._write_pointer("best", ckpt)

    def resolve_resume(self, resume: str | None) -> Path | None:
        """``auto``: latest if one exists else fresh; ``latest``: must exist; otherwise a checkpoint path."""
        if resume in (None, "", "none"):
            return None
        if resume in ("auto", "latest"):
            found = self.latest()
            if found is None and self.has_checkpoints():
                raise UserError(
                    f"{self.path / 'latest'} names a checkpoint that does not exist; pass --resume PATH to a "
                    f"checkpoints/step_N folder"
                )
            if found is None and resume == "latest":
                raise UserError(
                    f"--resume latest: no complete checkpoint under {self.path} (no valid 'latest' pointer)"
                )
            return found
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume {resume}: not a checkpoint folder (expected {path / STATE_FILE})")
        return path

    def _write_pointer(self, name: str, ckpt: Path) -> None:
        write_atomic(self.path / name, str(Path(ckpt).relative_to(self.path)))

    def _read_pointer(self, name: str) -> Path | None:
        pointer = self.path / name
        if not pointer.is_file():
            return None
        target = self.path / pointer.read_text().strip()
        return target if target.is_dir() else None

    def _prune(self, keep: int) -> None:
        protected = {self.best(), self.latest()}
        steps = sorted(
            (p for p in self.checkpoints_path.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1])
        )
        for old in steps[:-keep]:
            if old not in protected:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------- exported models

    def model_dir(self, which: str = "best") -> Path:
        """The export folder (``model.safetensors`` + ``model.yaml``): "best" is the run root, "final" ``final/``."""
        if which not in MODEL_DIRS:
            raise ValueError(f"model {which!r}: expected one of {sorted(MODEL_DIRS)}")
        sub = MODEL_DIRS[which]
        return self.path / sub if sub else self.path

    def has_model(self, which: str = "best") -> bool:
        return (self.model_dir(which) / EXPORT_WEIGHTS).is_file()
