"""One shard, start to finish: encode its images, write the tar atomically, check a written tar.

``verify`` (``retrieval shards verify``) lives here too: it reads shards back with the same rules.

A shard is the builder's unit of work (one process-pool task). Its bytes depend only on the records
and the encoding options: members are written in sample order with sorted extensions, mtime 0,
uid/gid 0, fixed user/group names and mode.

Why not ``webdataset.TarWriter``: it can be made deterministic (``mtime=0``; it sorts a sample's
members and writes USTAR), but ``import webdataset`` imports torch, ~4.5 s in every pool worker on
these machines, longer than encoding a whole shard. :class:`TarOut` writes the same layout (USTAR,
``<key>.<ext>`` members, sorted extensions) with :mod:`tarfile` alone; webdataset reads it as usual.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from retrieval.data.sop import EVAL_SPLITS, Record
from retrieval.errors import UserError
from retrieval.util import atomic_path

# a truncated JPEG must fail here, not decode to a grey block that poisons training
Image.LOAD_TRUNCATED_IMAGES = False
EXIF_ORIENTATION = 0x0112
TAR_USER = "retrieval"


class TarOut:
    """Minimal deterministic WebDataset tar writer (same member layout as ``webdataset.TarWriter``)."""

    def __init__(self, fileobj) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = TAR_USER
            self.tar.addfile(info, io.BytesIO(members[ext]))

    def __enter__(self) -> TarOut:
        return self

    def __exit__(self, *exc) -> None:
        self.tar.close()


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to write one shard (picklable, no open handles)."""

    name: str  # e.g. "train-000003.tar"
    split: str
    records: tuple[Record, ...]
    root: str  # dataset root the record paths are relative to
    out_dir: str
    max_side: int
    quality: int
    digest: str  # the build plan's digest, stored with the shard so a resume never mixes plans


def encode_image(path: str, max_side: int, quality: int) -> tuple[bytes, int, int]:
    """JPEG bytes of the image with its longer side <= ``max_side``, and the resulting width/height.

    A baseline RGB JPEG already within ``max_side`` (and not EXIF-rotated) passes through byte for byte:
    re-encoding would only lose quality and time. Anything else is decoded (with libjpeg's DCT scaling via
    ``draft`` for large JPEGs, a large speed-up on big photos), resized with a Lanczos filter and encoded.
    Raises on any unreadable or corrupt image; the caller records the reason.
    """
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        rotated = im.format == "JPEG" and im.getexif().get(EXIF_ORIENTATION, 1) != 1
        if im.format == "JPEG" and im.mode == "RGB" and max(w, h) <= max_side and not rotated:
            im.load()  # decode fully: a truncated file must be caught now, not by the trainer
            return data, w, h
        scale = min(1.0, max_side / max(w, h))
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
        if im.format == "JPEG" and not rotated:
            im.draft("RGB", target)
        im.load()
        im = ImageOps.exif_transpose(im) if rotated else im
        im = im.convert("RGB")
        if rotated:
            scale = min(1.0, max_side / max(im.size))
            target = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        if im.size != target:
            im = im.resize(target, Image.LANCZOS)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=quality)
        return out.getvalue(), im.width, im.height


def sample_key(image_id: int) -> str:
    return f"{image_id:09d}"


def _meta(rec: Record, width: int, height: int, split: str) -> bytes:
    return json.dumps(
        {
            "image_id": rec.image_id,
            "class_id": rec.class_id,
            "super_class_id": rec.super_class_id,
            "path": rec.path,
            "width": width,
            "height": height,
            "split": split,
        }
    ).encode("utf-8")


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is absent or unreadable (e.g. cut short by a kill)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sidecar_path(out_dir: str | Path, name: str) -> Path:
    """Where a finished shard's summary lives (``DIR/.build/<name>.json``); written just before the tar."""
    return Path(out_dir) / ".build" / f"{name}.json"


def write_shard(job: ShardJob) -> dict:
    """Encode and write one shard to a temporary name, then rename it into place; returns its summary.

    Corrupt or unreadable images are left out and listed in ``skipped`` (never fatal). The summary goes to
    the sidecar first and the tar is renamed last, so a tar under its final name always has a summary:
    that is what makes "finished" well defined for a resume after a kill.
    """
    t0 = time.perf_counter()
    out_dir = Path(job.out_dir)
    for stale in (
        *out_dir.glob(f".{job.name}*.tmp"),
        *sidecar_path(out_dir, job.name).parent.glob(f".{job.name}*.tmp"),
    ):
        stale.unlink(missing_ok=True)  # a killed build's temp files (unlink removes a symlink, never its target)
    # unique temp files created exclusively (mkstemp): a planted `.NAME.tmp` symlink is never followed
    with atomic_path(out_dir / job.name) as tmp:
        samples, classes, skipped = _write_tar(job, tmp)
        summary = {
            "name": job.name,
            "split": job.split,
            "samples": samples,
            "classes": sorted(classes),
            "bytes": tmp.stat().st_size,
            "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 3),
            "digest": job.digest,
        }
        with atomic_path(sidecar_path(out_dir, job.name)) as side_tmp:  # both in the umask's mode (atomic_path)
            side_tmp.write_text(json.dumps(summary, indent=1))
    return summary


def _write_tar(job: ShardJob, path: Path) -> tuple[int, set[int], list[dict]]:
    samples, classes, skipped = 0, set(), []
    with open(path, "wb") as f, TarOut(f) as tw:
        for rec in job.records:
            try:
                jpg, w, h = encode_image(os.path.join(job.root, rec.path), job.max_side, job.quality)
            except Exception as e:  # any decoder failure is a per-image skip, by design
                skipped.append({"path": rec.path, "reason": f"{type(e).__name__}: {e}"})
                continue
            tw.write(
                sample_key(rec.image_id),
                {"jpg": jpg, "cls": str(rec.class_id).encode("ascii"), "json": _meta(rec, w, h, job.split)},
            )
            samples += 1
            classes.add(rec.class_id)
    return samples, classes, skipped


def job_fields(job: ShardJob) -> dict:
    """The job as plain data (for the plan file), records included."""
    return {**asdict(job), "records": [asdict(r) for r in job.records]}


# ------------------------------------------------------------------------------------------- reading


def read_samples(tar_path: str | Path) -> list[dict]:
    """Group a shard's members by key, in tar order: ``[{"__key__", "jpg", "cls", "json"}, ...]``."""
    samples: list[dict] = []
    with tarfile.open(tar_path) as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tf.extractfile(member).read()
    return samples


def check_shard(tar_path: str | Path, split: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Decode every sample of one shard; returns (problems, [(image_id, class_id) in order])."""
    problems, rows = [], []
    name = Path(tar_path).name
    try:
        samples = read_samples(tar_path)
    except (tarfile.TarError, OSError) as e:
        return [f"{name}: unreadable tar ({e})"], []
    keys = [s["__key__"] for s in samples]
    if len(set(keys)) != len(keys):
        problems.append(f"{name}: duplicate sample keys")
    for s in samples:
        where = f"{name}:{s['__key__']}"
        if set(s) != {"__key__", "jpg", "cls", "json"}:
            problems.append(f"{where}: members {sorted(k for k in s if k != '__key__')}, expected cls, jpg, json")
            continue
        try:
            meta = json.loads(s["json"].decode("utf-8"))
            with Image.open(io.BytesIO(s["jpg"])) as im:
                im.load()
                size = im.size
        except Exception as e:  # report every kind of damage as a problem, keep checking the rest
            problems.append(f"{where}: cannot decode ({type(e).__name__}: {e})")
            continue
        if s["cls"].decode("ascii", "replace") != str(meta.get("class_id")):
            problems.append(f"{where}: cls {s['cls']!r} != json class_id {meta.get('class_id')}")
        if s["__key__"] != sample_key(int(meta.get("image_id", -1))):
            problems.append(f"{where}: key does not match json image_id {meta.get('image_id')}")
        if (meta.get("width"), meta.get("height")) != size:
            problems.append(f"{where}: json size {meta.get('width')}x{meta.get('height')} != image {size[0]}x{size[1]}")
        if meta.get("split") != split:
            problems.append(f"{where}: json split {meta.get('split')!r} in a {split} shard")
        rows.append((int(meta.get("image_id", -1)), int(meta.get("class_id", -1))))
    return problems, rows


# ---------------------------------------------------------------------------------------- verifying a folder


def _check_split(split: str, rows_by_shard: dict[str, list[tuple[int, int]]]) -> list[str]:
    """Order rules: train/val classes contiguous and inside one shard; test in image_id order; ids unique."""
    problems = []
    ids = [i for rows in rows_by_shard.values() for i, _ in rows]
    if len(set(ids)) != len(ids):
        problems.append(f"{split}: {len(ids) - len(set(ids))} duplicate image_id(s)")
    if split in EVAL_SPLITS:
        if ids != sorted(ids):
            problems.append(f"{split}: samples are not in image_id order")
        return problems
    home: dict[int, str] = {}
    for name, rows in rows_by_shard.items():
        seen_here: set[int] = set()
        for k, (_, cls) in enumerate(rows):
            if cls in home and home[cls] != name:
                problems.append(f"{name}: class {cls} also in {home[cls]} (a class must stay in one shard)")
            elif cls in seen_here and rows[k - 1][1] != cls:
                problems.append(f"{name}: class {cls} is not contiguous")
            home[cls] = name
            seen_here.add(cls)
    return problems


def verify(out: str | Path, workers: int = 1) -> tuple[list[str], dict]:
    """Decode every sample and check it against stats.json / sizes.json: ``(problems, stats)``."""
    out = Path(out)
    stats, sizes = read_json(out / "stats.json"), read_json(out / "sizes.json")
    if stats is None or sizes is None:
        raise UserError(f"{out}: stats.json or sizes.json missing or unreadable; build (or merge-stats) first")
    problems: list[str] = []
    splits = [s for s in stats if s != "config"]
    names = {split: sorted(p.name for p in out.glob(f"{split}-*.tar")) for split in splits}
    jobs = [(out / name, split) for split in splits for name in names[split]]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(check_shard, *zip(*jobs, strict=True))) if jobs else []
    else:
        results = [check_shard(path, split) for path, split in tqdm(jobs, unit="shard", desc="verify", disable=None)]
    found = {path.name: res for (path, _), res in zip(jobs, results, strict=True)}
    class_sets = {}
    for split in splits:
        expected = stats.get(split, {})
        planned = expected.get("shard_samples", {})
        if sorted(planned) != names[split]:
            problems.append(f"{split}: shards on disk {names[split]} != stats.json {sorted(planned)}")
        rows_by_shard = {}
        for name in names[split]:
            shard_problems, rows = found[name]
            problems += shard_problems
            rows_by_shard[name] = rows
            if len(rows) != planned.get(name, -1) or len(rows) != sizes.get(name, -1):
                problems.append(
                    f"{name}: {len(rows)} good samples, stats.json says {planned.get(name)}, "
                    f"sizes.json {sizes.get(name)}"
                )
        problems += _check_split(split, rows_by_shard)
        class_sets[split] = {c for rows in rows_by_shard.values() for _, c in rows}
        n = sum(len(r) for r in rows_by_shard.values())
        if n != expected.get("samples") or len(class_sets[split]) != expected.get("classes"):
            problems.append(
                f"{split}: {n} samples / {len(class_sets[split])} classes on disk, stats.json says "
                f"{expected.get('samples')} / {expected.get('classes')}"
            )
    pairs = [(a, b) for i, a in enumerate(splits) for b in splits[i + 1 :] if {a, b} != {"query", "gallery"}]
    for a, b in pairs:  # In-Shop's query and gallery share their classes: that is the protocol
        if class_sets[a] & class_sets[b]:
            problems.append(
                f"{a} and {b} share {len(class_sets[a] & class_sets[b])} class(es); splits must be class-disjoint"
            )
    return problems, stats
