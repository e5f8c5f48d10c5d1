"""``retrieval synth-sop OUT``: a synthetic catalogue in the exact Stanford Online Products layout.

    retrieval synth-sop data/synth --classes 200 --images-per-class 2-12 --seed 0 --size 128

Writes ``OUT/{bicycle,...,toaster}_final/<productid>_<n>.JPG`` plus ``Ebay_train.txt``,
``Ebay_test.txt`` and ``Ebay_info.txt`` (header ``image_id class_id super_class_id path``). As in SOP,
about half of the classes are train (ids 1..Ntrain), the rest test (ids following); super_class_id is
1..12 in folder order and each split's classes are grouped by super class.

Images are procedurally rendered "products". Each super class has an archetype (a composition of
parts and a colour family); each class instantiates it with its own proportions, colours, surface
pattern and small "logo" marks, so classes of one super class look alike and differ in details (hard
negatives, like SOP). Each image is another view: pose (rotation, flip, squash), scale, crop and
translation, cluttered background, lighting and colour cast, occlusion. Raw pixels and an untrained
network retrieve the right product only rarely, so retrieval needs learning.

``--query-views N`` also renders N further photos of every test product into ``OUT/queries/`` (listed in
``OUT/queries.txt``, an SOP-format list): new photos of catalogue products that
are not in the catalogue, the natural input of ``retrieval search``.

Everything is a pure function of the seed (per-class and per-image generators, no global state), so
files are byte-identical between runs and whatever the number of workers.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.data.synth_render import archetype, product, render_object, render_view
from retrieval.errors import UserError

log = logging.getLogger(__name__)

SUPER_CLASSES = (
    "bicycle",
    "cabinet",
    "chair",
    "coffee_maker",
    "fan",
    "kettle",
    "lamp",
    "mug",
    "sofa",
    "stapler",
    "table",
    "toaster",
)
HEADER = "image_id class_id super_class_id path"
QUERY_DIR = "queries"


@dataclass(frozen=True)
class SynthClass:
    """One product: its ids, file names and the parameters every view of it is drawn from."""

    index: int  # 0-based over all classes, train first
    class_id: int
    super_class_id: int
    product_id: int
    n_images: int

    @property
    def folder(self) -> str:
        return f"{SUPER_CLASSES[self.super_class_id - 1]}_final"

    def path(self, n: int) -> str:
        return f"{self.folder}/{self.product_id}_{n}.JPG"

    def query_path(self, n: int) -> str:
        return f"{QUERY_DIR}/{self.folder}/{self.product_id}_q{n}.JPG"


# --------------------------------------------------------------------------------------------- layout


def parse_images_per_class(text: str) -> tuple[int, int]:
    """``"6"`` -> (6, 6); ``"2-12"`` -> (2, 12). A class needs at least 2 images (a query and a match)."""
    try:
        lo, hi = (int(x) for x in text.split("-", 1)) if "-" in text else (int(text),) * 2
    except ValueError:
        raise UserError(f"--images-per-class: expected K or LO-HI (e.g. 6 or 2-12), got {text!r}") from None
    if not 2 <= lo <= hi:
        raise UserError(f"--images-per-class: expected 2 <= LO <= HI, got {text!r}")
    return lo, hi


def split_point(n_classes: int, train_classes: int | None) -> int:
    """How many of the classes are train: ``train_classes``, or ceil(N/2) (SOP: 11,318 train, 11,316 test)."""
    if n_classes < 2:
        raise UserError(f"--classes: expected at least 2 (one train and one test class), got {n_classes}")
    if train_classes is None:
        return (n_classes + 1) // 2
    if not 1 <= train_classes < n_classes:
        raise UserError(f"--train-classes: expected 1..{n_classes - 1} (of --classes {n_classes}), got {train_classes}")
    return train_classes


def plan_classes(n_classes: int, images_per_class: tuple[int, int], seed: int, n_train: int) -> list[SynthClass]:
    """Class ids, super classes, product ids and image counts; the first ``n_train`` (:func:`split_point`) are
    train, as in SOP.

    Within each split the classes run through the 12 super classes in folder order (contiguous blocks,
    like SOP's lists).
    """
    rng = np.random.default_rng([seed, 2])
    counts = rng.integers(images_per_class[0], images_per_class[1] + 1, size=n_classes)
    product_ids: list[int] = []
    seen: set[int] = set()
    while len(product_ids) < n_classes:  # 12-digit eBay-like listing ids, unique
        pid = int(rng.integers(110_000_000_000, 400_000_000_000))
        if pid not in seen:
            seen.add(pid)
            product_ids.append(pid)
    out = []
    for i in range(n_classes):
        j, n = (i, n_train) if i < n_train else (i - n_train, n_classes - n_train)
        out.append(SynthClass(i, i + 1, j * len(SUPER_CLASSES) // n + 1, product_ids[i], int(counts[i])))
    return out


def _render_class(job: tuple[int, SynthClass, int, str, int]) -> int:
    """Worker: draw every image of one class (and its query views) and write the files; returns the catalogue count."""
    seed, cls, size, out, query_views = job
    prod = product(seed, cls.index, archetype(seed, cls.super_class_id))
    obj = render_object(prod, size)
    for n in range(cls.n_images):
        data = render_view(obj, np.random.default_rng([seed, 3, cls.index, n]), size)
        (Path(out) / cls.path(n)).write_bytes(data)
    for n in range(query_views):  # another stream of views ([seed, 4, ...]): never a catalogue image
        data = render_view(obj, np.random.default_rng([seed, 4, cls.index, n]), size)
        (Path(out) / cls.query_path(n)).write_bytes(data)
    return cls.n_images


def _write_lists(out: Path, classes: list[SynthClass], n_train: int) -> None:
    """Ebay_train.txt / Ebay_test.txt (image ids restart at 1 in each, as in SOP) and Ebay_info.txt (all)."""
    info = [HEADER]
    for name, part in (("Ebay_train.txt", classes[:n_train]), ("Ebay_test.txt", classes[n_train:])):
        lines = [HEADER]
        for cls in part:
            for n in range(cls.n_images):
                row = f"{cls.class_id} {cls.super_class_id} {cls.path(n)}"
                lines.append(f"{len(lines)} {row}")
                info.append(f"{len(info)} {row}")
        (out / name).write_text("\n".join(lines) + "\n", encoding="ascii")
    (out / "Ebay_info.txt").write_text("\n".join(info) + "\n", encoding="ascii")


def _write_queries(out: Path, test_classes: list[SynthClass], query_views: int) -> None:
    """queries.txt: the held-out views of the test products, SOP-list shaped."""
    lines = [HEADER]
    for cls in test_classes:
        for n in range(query_views):
            lines.append(f"{len(lines)} {cls.class_id} {cls.super_class_id} {cls.query_path(n)}")
    (out / "queries.txt").write_text("\n".join(lines) + "\n", encoding="ascii")


def _prepare_out(out: Path, force: bool, query_views: int) -> None:
    """Refuse to mix with unrelated files; with ``force`` remove only what a previous synth-sop wrote."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out}: exists and is not empty; pass --force to replace a previous synth-sop output")
        if not (out / "Ebay_info.txt").is_file():
            raise UserError(f"{out}: not a synth-sop output (no Ebay_info.txt); refusing to delete anything there")
        for name in SUPER_CLASSES:
            shutil.rmtree(out / f"{name}_final", ignore_errors=True)
        shutil.rmtree(out / QUERY_DIR, ignore_errors=True)
        (out / "queries.txt").unlink(missing_ok=True)
    for name in SUPER_CLASSES:
        (out / f"{name}_final").mkdir(parents=True, exist_ok=True)
        if query_views:
            (out / QUERY_DIR / f"{name}_final").mkdir(parents=True, exist_ok=True)


def synth_sop(
    out: str | Path,
    classes: int,
    images_per_class: tuple[int, int] = (2, 12),
    seed: int = 0,
    size: int = 128,
    workers: int = 1,
    force: bool = False,
    query_views: int = 0,
    train_classes: int | None = None,
) -> dict[str, int]:
    """Write a synthetic SOP tree to ``out``; returns counts (classes and images per split, query views)."""
    if size < 16:
        raise UserError(f"--size: expected at least 16 px, got {size}")
    if query_views < 0:
        raise UserError(f"--query-views: expected 0 or more, got {query_views}")
    out = Path(out)
    n_train = split_point(classes, train_classes)
    plan = plan_classes(classes, images_per_class, seed, n_train)
    _prepare_out(out, force, query_views)
    jobs = [(seed, cls, size, str(out), query_views if i >= n_train else 0) for i, cls in enumerate(plan)]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:  # fork can hang under torch threads
            total = sum(pool.imap_unordered(_render_class, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        total = sum(map(_render_class, jobs))
    _write_lists(out, plan, n_train)
    if query_views:
        _write_queries(out, plan[n_train:], query_views)
    counts = {
        "train_classes": n_train,
        "test_classes": classes - n_train,
        "images": total,
        "train_images": sum(c.n_images for c in plan[:n_train]),
    }
    counts["test_images"] = total - counts["train_images"]
    counts["query_images"] = query_views * counts["test_classes"]
    return counts
