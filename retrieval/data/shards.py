"""``retrieval shards build|verify|merge-stats``: WebDataset shards from SOP, a manifest or an image folder.

    retrieval shards build --sop-root /data/Stanford_Online_Products --out /data/sop-shards --workers 16
    retrieval shards build --manifest catalogue.csv --out shards/mine --val-classes 0.1 --test-classes 0.5
    retrieval shards build --image-folder photos/ --out shards/photos
    retrieval shards verify /data/sop-shards
    # Slurm job array (slurm/shards.sbatch does this): task i of n builds every n-th shard, then one merge
    retrieval shards build --sop-root ... --out DIR --part 3/8  &&  retrieval shards merge-stats DIR

Output (the contract in ``shards/README.md``): ``DIR/{train,val,test}-NNNNNN.tar`` with samples
``<image_id:09d>.{jpg,cls,json}``, ``DIR/stats.json`` and ``DIR/sizes.json``. Train and val shards
hold whole classes (a class never spans two shards), classes in an order shuffled by ``--seed``, so a
streaming reader can form P×K batches; test shards are in image_id order.

Each shard is one unit of work for a process pool: written to a unique ``.NAME.*.tmp``, summarised in
``DIR/.build/NAME.json``, then renamed into place. A rerun keeps the finished shards and builds the rest,
so a killed build resumes; ``DIR/.build/plan.json`` pins the plan's digest so a rerun with other options
cannot mix two plans in one folder. Tars are byte-identical for the same input and options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np

from retrieval.data.inshop import load_inshop
from retrieval.data.shard_writer import ShardJob, read_json, sidecar_path, write_shard
from retrieval.data.sop import ALL_SPLITS, EVAL_SPLITS, Catalogue, Record, load_catalogue
from retrieval.errors import UserError
from retrieval.util import progress_bar, write_atomic

# spawn, not fork: a fork of a process that already runs torch/OpenMP threads can hang in the child.
_SPAWN = multiprocessing.get_context("spawn")
log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the bytes of a shard change for the same options
# ~6 MB shards of SOP-sized JPEGs: enough shards for common worlds (ranks x workers) and still long sequential reads
DEFAULT_SHARD_SIZE = 256


# ------------------------------------------------------------------------------------------- planning


def plan_split(records: list[Record], split: str, shard_size: int, seed: int) -> list[list[Record]]:
    """Cut one split into shards of at most ``shard_size`` samples.

    Train/val: whole classes, in an order shuffled by (seed, split); a class larger than ``shard_size``
    gets a shard of its own (over the limit) rather than being cut. Test: image_id order.
    """
    if split in EVAL_SPLITS:
        ordered = sorted(records, key=lambda r: r.image_id)
        return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]
    by_class: dict[int, list[Record]] = defaultdict(list)
    for rec in sorted(records, key=lambda r: r.image_id):
        by_class[rec.class_id].append(rec)
    class_ids = sorted(by_class)
    order = np.random.default_rng([seed, ALL_SPLITS.index(split)]).permutation(len(class_ids))
    shards: list[list[Record]] = [[]]
    for i in order:
        group = by_class[class_ids[i]]
        if shards[-1] and len(shards[-1]) + len(group) > shard_size:
            shards.append([])
        shards[-1].extend(group)
    big = sum(len(g) > shard_size for g in by_class.values())
    if big:
        log.warning(
            "%s: %d class(es) have more than --shard-size %d images; each fills a shard alone", split, big, shard_size
        )
    return [s for s in shards if s]


def plan_jobs(cat: Catalogue, out_dir: Path, options: dict) -> tuple[list[ShardJob], str]:
    """All shard jobs of a build, in split then index order, and the digest that identifies the plan."""
    plans = {s: plan_split(cat.splits[s], s, options["shard_size"], options["seed"]) for s in cat.splits}
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **options}, sort_keys=True).encode())
    for split in plans:
        for shard in plans[split]:
            h.update(json.dumps([split, [asdict(r) for r in shard]]).encode())
    digest = h.hexdigest()[:16]
    jobs = [
        ShardJob(
            f"{split}-{i:06d}.tar",
            split,
            tuple(shard),
            str(cat.root),
            str(out_dir),
            options["max_side"],
            options["quality"],
            digest,
        )
        for split in plans
        for i, shard in enumerate(plans[split])
    ]
    return jobs, digest


# ------------------------------------------------------------------------------------------- building


def _write_json(path: Path, obj: dict) -> None:
    """Atomic write (unique temp name: several array tasks may write the same file at once), the umask's mode."""
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def _claim_out_dir(out: Path, plan: dict) -> None:
    """Create ``out`` and pin the plan; refuse a folder that holds another build (or unknown shards)."""
    (out / ".build").mkdir(parents=True, exist_ok=True)
    previous = read_json(out / ".build" / "plan.json")
    if previous is not None and previous.get("digest") != plan["digest"]:
        raise UserError(
            f"{out}: holds a build made from other inputs or options (plan {previous.get('digest')}, "
            f"now {plan['digest']}); use another --out or delete that folder"
        )
    if previous is None and any(out.glob("*.tar")):
        raise UserError(f"{out}: contains .tar files not written by `retrieval shards build`; use an empty --out")
    _write_json(out / ".build" / "plan.json", plan)


def is_finished(job: ShardJob) -> bool:
    """A shard is finished when its tar has its final name and its sidecar belongs to this plan."""
    side = read_json(sidecar_path(job.out_dir, job.name))
    return (Path(job.out_dir) / job.name).is_file() and side is not None and side.get("digest") == job.digest


def _run_jobs(jobs: list[ShardJob], workers: int) -> None:
    """Write the shards, in a process pool when ``workers > 1``; a bar counts the images of finished shards against
    the build's total (also in a log file: a 124k-image build ran 133 s without a line)."""
    # Not routed through retrieval.dist.is_main(): the builder never runs under a distributed launcher (Slurm
    # array tasks are independent processes), and importing torch would cost seconds per command.
    bar = progress_bar(sum(len(job.records) for job in jobs), f"shards ({len(jobs)} to write)", "img")
    try:
        if workers <= 1:
            for job in jobs:
                write_shard(job)
                bar.update(len(job.records))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_SPAWN) as pool:
                futures = {pool.submit(write_shard, job): len(job.records) for job in jobs}
                for fut in as_completed(futures):
                    fut.result()
                    bar.update(futures[fut])
    finally:
        bar.close()


def parse_part(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8): this task builds shards 3, 11, 19, ... of the global shard list."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--part: expected i/n (e.g. 0/8), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--part: expected 0 <= i < n, got {text!r}")
    return i, n


def _claim(cat: Catalogue, out: Path, options: dict) -> list[ShardJob]:
    """Plan the shards and claim ``out`` for this plan (a folder built with another plan is refused)."""
    jobs, digest = plan_jobs(cat, out, options)
    plan = {
        "digest": digest,
        "format": FORMAT_VERSION,
        "config": {"source": cat.source, **options},
        "shards": {s: [j.name for j in jobs if j.split == s] for s in cat.splits},
        "catalogue_skipped": cat.skipped,
    }
    _claim_out_dir(out, plan)
    return jobs


def _build_part(out: Path, jobs: list[ShardJob], part: tuple[int, int], workers: int) -> None:
    i, n = part
    mine = jobs[i::n]  # round-robin: every part gets a mix of train and test shards
    todo = [j for j in mine if not is_finished(j)]
    log.info(
        "%s: %d shards in the plan, %d in part %d/%d, %d already finished, building %d with %d worker(s)",
        *(out, len(jobs), len(mine), i, n, len(mine) - len(todo), len(todo), workers),
    )
    _run_jobs(todo, workers)


def build(
    *,
    out: str | Path,
    sop_root: str | None = None,
    inshop_root: str | None = None,
    manifest: str | None = None,
    image_folder: str | None = None,
    workers: int = 1,
    max_side: int = 256,
    quality: int = 90,
    shard_size: int = DEFAULT_SHARD_SIZE,
    val_classes: int | float = 0.2,
    test_classes: int | float = 0.5,
    seed: int = 0,
    on_missing: str = "error",
    part: tuple[int, int] = (0, 1),
) -> dict | None:
    """Build (part of) a shard folder; returns stats.json's content once every shard exists, else None."""
    if max_side < 8 or not 1 <= quality <= 95 or shard_size < 1:
        raise UserError(
            f"expected --max-side >= 8, 1 <= --quality <= 95, --shard-size >= 1; got {max_side}, "
            f"{quality}, {shard_size}"
        )
    t0 = time.perf_counter()
    if inshop_root is not None:
        cat = load_inshop(inshop_root, val_classes=val_classes, seed=seed, on_missing=on_missing)
    else:
        cat = load_catalogue(
            sop_root=sop_root,
            manifest=manifest,
            image_folder=image_folder,
            val_classes=val_classes,
            test_classes=test_classes,
            seed=seed,
            on_missing=on_missing,
        )
    out = Path(out)
    options = {  # everything that decides the shards' bytes: a rebuild with other options is refused
        "max_side": max_side,
        "quality": quality,
        "shard_size": shard_size,
        "val_classes": val_classes,
        "test_classes": test_classes if cat.source["kind"] not in ("sop", "inshop") else None,
        "seed": seed,
        "on_missing": on_missing,
    }
    jobs = _claim(cat, out, options)
    _build_part(out, jobs, part, workers)
    i, n = part
    log.info("part %d/%d done in %.1f s", i, n, time.perf_counter() - t0)
    if n > 1:
        log.info("run `retrieval shards merge-stats %s` once every part has finished", out)
        return None
    return merge_stats(out)


# -------------------------------------------------------------------------------------------- merging


def merge_stats(out: str | Path) -> dict:
    """Combine the per-shard summaries into ``stats.json`` and ``sizes.json``; every shard must exist."""
    out = Path(out)
    plan = read_json(out / ".build" / "plan.json")
    if plan is None:
        raise UserError(f"{out}/.build/plan.json: not found; run `retrieval shards build ... --out {out}` first")
    missing, stats, sizes = [], {}, {}
    for split in plan["shards"]:
        entry = {
            "samples": 0,
            "classes": 0,
            "shards": len(plan["shards"][split]),
            "bytes": 0,
            "skipped": list(plan["catalogue_skipped"].get(split, [])),
            "seconds": 0.0,
            "shard_samples": {},
            "shard_bytes": {},
        }
        classes: set[int] = set()
        for name in plan["shards"][split]:
            side = read_json(sidecar_path(out, name))
            if side is None or side.get("digest") != plan["digest"] or not (out / name).is_file():
                missing.append(name)
                continue
            entry["samples"] += side["samples"]
            entry["bytes"] += side["bytes"]
            entry["skipped"] += side["skipped"]
            entry["seconds"] = round(entry["seconds"] + side["seconds"], 3)
            entry["shard_samples"][name] = side["samples"]
            entry["shard_bytes"][name] = side["bytes"]  # checked before training and embedding (data/check.py)
            classes.update(side["classes"])
        entry["classes"] = len(classes)
        stats[split] = entry
        sizes.update(entry["shard_samples"])
    if missing:
        raise UserError(
            f"{out}: {len(missing)} shard(s) not built yet ({', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}); run the missing --part tasks or rerun the build"
        )
    stats["config"] = {**plan["config"], "digest": plan["digest"], "format": plan["format"]}
    _write_json(out / "stats.json", stats)
    _write_json(out / "sizes.json", sizes)
    for split in plan["shards"]:
        s = stats[split]
        log.info(
            "%s: %d samples, %d classes, %d shards, %.1f MB, %d skipped",
            split,
            s["samples"],
            s["classes"],
            s["shards"],
            s["bytes"] / 1e6,
            len(s["skipped"]),
        )
    return stats
