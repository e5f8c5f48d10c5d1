"""Embed a split rank-sharded: every rank embeds its own shards, rank 0 completes the embeddings set.

    embed_to_folder(accelerator, load_model("runs/sop"), spec, EmbedJob(shards, "test", Path("emb-test")), stats)
    local = embed_split(model, shards, "val", spec, 64, 2, device)     # in memory (the trainer's validation)

``retrieval embed`` and the trainer's validation both run :func:`embed_split`. With a part writer each rank streams
its rows into ``parts/`` as they come (memory stays one part whatever the split's size); rank 0 then checks
against ``stats.json`` that no image is missing or duplicated and writes the manifest and ``meta.json`` last
(:func:`finish_folder`), so a folder without ``meta.json`` is incomplete. The result is an
:class:`~retrieval.embed.embeddings.EmbeddingSet`, which lives apart so that its readers never import torch.

``OUT`` is written as one unit (:func:`new_set`): rank 0 holds its lock (a second ``embed`` into it is refused
before any work) and the ranks write into a stage folder beside it, which replaces ``OUT`` with one rename once
the set is complete and reads back whole. The set that was there stays complete until then, whatever fails or
is killed; what was derived from it (``eval``'s ``metrics.json`` in the folder) goes with it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrieval import dist, util
from retrieval.data.input_spec import InputSpec
from retrieval.data.loader import Reader, eval_loader
from retrieval.data.source import split_entry
from retrieval.embed.embeddings import COLUMNS, EmbeddingSet, PartWriter
from retrieval.errors import UserError
from retrieval.model.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class EmbedJob:
    """What ``retrieval embed`` writes: which split of which shards, into which folder, how."""

    shards: str
    split: str
    out: Path
    dtype: str = "float32"  # stored embedding dtype: float32 | float16
    batch_size: int = 128
    num_workers: int = 4
    part_rows: int = 65536  # rows per part file (a rank holds one part in memory)
    merge: bool = False  # one file per column at the end instead of parts
    label_key: str | None = None
    allow_commands: bool = False  # --allow-listed-commands: stats.json may list pipe: URLs (the user's opt-in)


def autocast(device: torch.device, mixed_precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def _embedded_batches(
    model: torch.nn.Module, loader, device: torch.device, mixed_precision: str, progress: tuple, counts: dict
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], list[str]]]:
    """``(vectors, columns, paths)`` per batch; ``counts["skipped"]`` accumulates undecodable images; ``progress``
    is (split, images this rank expects) for the bar."""
    model.eval()
    split, total = progress
    bar = util.progress_bar(total, f"embed {split} (this rank)", "img", disable=not dist.is_main())
    for batch in loader:
        counts["skipped"] += int(batch.get("skipped", 0))
        bar.update(len(batch["label"]) + int(batch.get("skipped", 0)))
        if len(batch["label"]) == 0:
            continue
        with torch.no_grad(), autocast(device, mixed_precision):
            emb = model(batch["image"].to(device, non_blocking=True))
        columns = {"ids": batch["image_id"], "labels": batch["label"], "super_labels": batch["super_label"]}
        yield emb.float().cpu().numpy(), {k: v.numpy() for k, v in columns.items()}, list(batch["path"])
    bar.close()


def embed_split(
    model: torch.nn.Module,
    shards: str,
    split: str,
    spec: InputSpec,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    mixed_precision: str = "no",
    writer: PartWriter | None = None,
    label_key: str | None = None,
    batches: Iterable[dict] | None = None,
    allow_commands: bool = False,
) -> EmbeddingSet:
    """This rank's share of ``split`` (its ``meta`` holds ``skipped``, ``seconds``, ``count``).

    With ``writer`` (:meth:`EmbeddingSet.writer`) the rows go to parts on disk as they come and the returned set
    holds no rows (only its ``meta``): memory stays one part whatever the split's size. Without, they are
    gathered in memory (validation during training). Rank 0 shows a progress bar in images; its total is the
    split's size (stats.json) over the ranks. ``batches``: this rank's batches of the split, already prepared (the
    trainer's validation keeps them between validations); default: read from the shards.
    """
    world = dist.world_size()
    loader = batches
    if loader is None:
        reader = Reader(dist.rank(), world)
        loader = eval_loader(shards, split, spec, batch_size, num_workers, reader, label_key, allow_commands)
    total = -(-int(split_entry(shards, split).get("samples", 0)) // world) or None
    dim = int(getattr(model, "embed_dim", 0))
    out: dict[str, list] = {k: [] for k in ("embeddings", *COLUMNS)}
    paths: list[str] = []
    counts, start, rows = {"skipped": 0}, time.perf_counter(), 0
    for vectors, columns, batch_paths in _embedded_batches(
        model, loader, device, mixed_precision, (split, total), counts
    ):
        rows += len(vectors)
        if writer is not None:
            writer.add(vectors, columns, batch_paths)
            continue
        out["embeddings"].append(vectors)
        for k in COLUMNS:
            out[k].append(columns[k])
        paths.extend(batch_paths)
    meta = {"skipped": counts["skipped"], "seconds": time.perf_counter() - start, "count": rows}
    if writer is not None:
        writer.close(meta)
    arrays = {k: np.concatenate(v) if v else _empty(k, dim) for k, v in out.items()}
    return EmbeddingSet(arrays["embeddings"], arrays["ids"], arrays["labels"], arrays["super_labels"], paths, meta)


def _empty(key: str, dim: int) -> np.ndarray:
    return np.zeros((0, dim), np.float32) if key == "embeddings" else np.zeros(0, np.int64)


def gather_embeddings(local: EmbeddingSet) -> EmbeddingSet | None:
    """In-memory gather for validation: the merged set on rank 0, None on the others."""
    parts = dist.gather_object(local)
    return EmbeddingSet.merge(parts) if parts is not None else None


@contextlib.contextmanager
def new_set(out: Path, main: bool) -> Iterator[Path]:
    """The folder every rank writes the new set into. Rank 0 holds ``out``'s lock and a stage folder beside it
    (:func:`retrieval.util.new_version`) that replaces ``out`` when the block completes, and is removed if it fails;
    a refusal (``out`` in use, or not an embeddings folder) reaches every rank before any work."""
    with contextlib.ExitStack() as stack:
        stage, problem = None, None
        if main:
            try:
                EmbeddingSet.check_replaceable(out)
                stage = str(stack.enter_context(util.new_version(out)))
            except util.Busy as e:
                problem = f"{out} is being written or read by another process (pid {e.holder}): one `retrieval embed` "
                problem += (
                    "per folder, none while eval or index build read it; wait for it to end or choose another --out"
                )
            except UserError as e:
                problem = str(e)
        stage, problem = dist.broadcast_object((stage, problem))
        if problem:
            raise UserError(problem)
        yield Path(stage)


def embed_to_folder(accelerator, loaded: LoadedModel, spec: InputSpec, job: EmbedJob, stats: dict) -> None:
    """Every rank: embed this rank's share of ``job.split`` into parts of the new set; rank 0 then completes it
    (``stats``: the shards' ``stats.json``, checked against what was embedded) and switches it in as ``job.out``."""
    model = loaded.model.to(accelerator.device)
    with new_set(job.out, accelerator.is_main_process) as stage:
        writer = EmbeddingSet.writer(stage, accelerator.process_index, job.part_rows, job.dtype)
        local = embed_split(
            model,
            job.shards,
            job.split,
            spec,
            job.batch_size,
            job.num_workers,
            accelerator.device,
            accelerator.mixed_precision,
            writer,
            label_key=job.label_key,
            allow_commands=job.allow_commands,
        )
        count, seconds = local.meta["count"], local.meta["seconds"]
        rate = count / max(seconds, 1e-9)
        log.info("rank %d: %d images in %.1f s (%.1f images/s)", accelerator.process_index, count, seconds, rate)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            dim = int(getattr(model, "embed_dim", 0))
            finish_folder(job, stage, loaded.provenance, spec, (accelerator.num_processes, dim), stats[job.split])
        accelerator.wait_for_everyone()


def finish_folder(job: EmbedJob, folder: Path, provenance: dict, spec: InputSpec, shape: tuple, split_stats: dict):
    """Rank 0: the manifest, completeness against stats.json, ``meta.json`` last (and the merge when asked), then
    the set read back as its readers will (every vector finite and non-zero) before it may replace ``job.out``.
    ``shape``: (world size, dimension)."""
    world, dim = shape
    meta = {**provenance, "shards": str(job.shards), "split": job.split, "img_size": spec.size}
    meta.update(input=spec.to_dict(), world_size=world, layout="merged" if job.merge else "parts")
    summary = EmbeddingSet.finish_parts(folder, world, dim, job.dtype)
    _check_complete(summary["count"], summary["skipped"], split_stats, job)
    meta.update(
        set_id=uuid.uuid4().hex,  # which set a reader holds: a re-embed makes a new one
        skipped=summary["skipped"],
        seconds=round(summary["seconds"], 3),
        images_per_s=round(summary["count"] / max(summary["seconds"], 1e-9), 1),
    )
    EmbeddingSet.write_meta(folder, meta, summary["count"], dim, job.dtype)
    if job.merge:
        merged = EmbeddingSet.load(folder)
        merged.meta = meta
        merged.save(folder, dtype=job.dtype)
        EmbeddingSet.drop_parts(folder)
    EmbeddingSet.load(folder)  # refuses NaN or all-zero vectors: such a set must not replace a good one
    log.info("wrote %d embeddings (dim %d) to %s (%s)", summary["count"], dim, job.out, meta["layout"])


def _check_complete(count: int, skipped: int, split_stats: dict, job: EmbedJob) -> None:
    expected = int(split_stats["samples"])
    if count + skipped != expected:
        raise UserError(
            f"embedded {count} images (+{skipped} undecodable) of split "
            f"{job.split!r}, but {job.shards}/stats.json lists {expected}: shards changed or are incomplete"
        )
