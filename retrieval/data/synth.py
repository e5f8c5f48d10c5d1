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

import argparse
import colorsys
import io
import logging
import multiprocessing as mp
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

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
PART_KINDS = ("rect", "rounded", "ellipse", "polygon", "ring", "bar")
PATTERNS = ("plain", "stripes", "dots", "checker")
JPEG_QUALITY = 90


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


# ------------------------------------------------------------------------------------------ products


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _archetype(seed: int, super_id: int) -> dict:
    """The style a super class's products share: body shape, part layout, colour family."""
    rng = np.random.default_rng([seed, 0, super_id])
    body = {
        "kind": str(rng.choice(PART_KINDS[:4])),
        "cx": 0.5,
        "cy": rng.uniform(0.45, 0.6),
        "w": rng.uniform(0.35, 0.65),
        "h": rng.uniform(0.3, 0.6),
        "sides": int(rng.integers(3, 8)),
    }
    parts = []
    for _ in range(int(rng.integers(2, 5))):
        angle = rng.uniform(0, 2 * np.pi)  # where the part sits around the body
        dist = rng.uniform(0.25, 0.5)
        parts.append(
            {
                "kind": str(rng.choice(PART_KINDS)),
                "cx": 0.5 + 0.6 * dist * np.cos(angle),
                "cy": body["cy"] + 0.6 * dist * np.sin(angle),
                "w": rng.uniform(0.08, 0.3),
                "h": rng.uniform(0.08, 0.3),
                "sides": int(rng.integers(3, 7)),
            }
        )
    return {
        "body": body,
        "parts": parts,
        "hue": (super_id - 1) / 12 + rng.uniform(-0.02, 0.02),
        "sat": rng.uniform(0.35, 0.9),
        "val": rng.uniform(0.45, 0.9),
    }


def _product(seed: int, cls: SynthClass, arch: dict) -> dict:
    """A class: the archetype with its own proportions, colours, pattern and logo marks."""
    rng = np.random.default_rng([seed, 1, cls.index])

    def jitter(p: dict) -> dict:
        return {
            **p,
            "cx": p["cx"] + rng.normal(0, 0.04),
            "cy": p["cy"] + rng.normal(0, 0.04),
            "w": p["w"] * rng.uniform(0.75, 1.3),
            "h": p["h"] * rng.uniform(0.75, 1.3),
        }

    hue = arch["hue"] + rng.normal(0, 0.05)
    body_col = _hsv(hue, arch["sat"] + rng.normal(0, 0.15), arch["val"] + rng.normal(0, 0.15))
    accent = _hsv(hue + rng.choice([0.5, 0.33, -0.33, 0.1]), rng.uniform(0.3, 1), rng.uniform(0.2, 1))
    parts = [jitter(p) for p in arch["parts"]]
    if rng.random() < 0.5:  # a class-specific extra part
        parts.append(
            jitter(
                {
                    "kind": str(rng.choice(PART_KINDS)),
                    "cx": rng.uniform(0.2, 0.8),
                    "cy": rng.uniform(0.15, 0.85),
                    "w": 0.15,
                    "h": 0.15,
                    "sides": 4,
                }
            )
        )
    part_cols = [
        accent if rng.random() < 0.5 else _hsv(hue + rng.normal(0, 0.08), rng.uniform(0.2, 0.9), rng.uniform(0.15, 0.8))
        for _ in parts
    ]
    marks = [
        (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.03, 0.08), int(rng.integers(0, 3)))
        for _ in range(int(rng.integers(1, 5)))
    ]
    return {
        "body": jitter(arch["body"]),
        "body_col": body_col,
        "parts": parts,
        "part_cols": part_cols,
        "pattern": str(rng.choice(PATTERNS)),
        "pattern_col": _hsv(hue + 0.5, rng.uniform(0, 1), rng.uniform(0, 1)),
        "period": rng.uniform(0.04, 0.12),
        "pattern_angle": rng.uniform(0, 180),
        "marks": marks,
        "mark_col": _hsv(rng.uniform(0, 1), 1.0, rng.uniform(0.5, 1)),
        "outline": rng.random() < 0.5,
    }


def _box(p: dict, c: int) -> tuple[float, float, float, float]:
    w, h = max(p["w"] * c, 2), max(p["h"] * c, 2)
    return p["cx"] * c - w / 2, p["cy"] * c - h / 2, p["cx"] * c + w / 2, p["cy"] * c + h / 2


def _draw_part(draw: ImageDraw.ImageDraw, p: dict, c: int, fill, outline=None) -> None:
    x0, y0, x1, y1 = _box(p, c)
    kind, width = p["kind"], max(1, c // 64)
    if kind == "rect":
        draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=width)
    elif kind == "rounded":
        draw.rounded_rectangle(
            (x0, y0, x1, y1), radius=min(x1 - x0, y1 - y0) / 4, fill=fill, outline=outline, width=width
        )
    elif kind == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline, width=width)
    elif kind == "polygon":
        draw.regular_polygon(
            ((x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2), p["sides"], fill=fill, outline=outline
        )
    elif kind == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(2, int(min(x1 - x0, y1 - y0) / 5)))
    else:  # bar: a thick line across the box, like a frame tube or a handle
        draw.line((x0, y0, x1, y1), fill=fill, width=max(2, int(min(x1 - x0, y1 - y0) / 3)))


def _pattern(prod: dict, c: int) -> Image.Image:
    """The body's surface pattern as an RGBA layer (transparent where the pattern is empty)."""
    layer = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    period, col = max(3, int(prod["period"] * c)), prod["pattern_col"] + (255,)
    if prod["pattern"] == "stripes":
        for x in range(-c, 2 * c, period):
            draw.line((x, -c, x + c, 2 * c), fill=col, width=max(1, period // 3))
        layer = layer.rotate(prod["pattern_angle"], resample=Image.NEAREST)
    elif prod["pattern"] == "dots":
        r = max(1, period // 4)
        for y in range(0, c, period):
            for x in range((y // period % 2) * period // 2, c, period):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=col)
    elif prod["pattern"] == "checker":
        for y in range(0, c, period):
            for x in range((y // period % 2) * period, c, 2 * period):
                draw.rectangle((x, y, x + period - 1, y + period - 1), fill=col)
    return layer


def render_object(prod: dict, c: int) -> Image.Image:
    """The product drawn once, front view, on a transparent c x c canvas."""
    obj = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    draw = ImageDraw.Draw(obj)
    outline = (20, 20, 20, 255) if prod["outline"] else None
    for p, col in zip(prod["parts"], prod["part_cols"], strict=True):
        if p["cy"] < prod["body"]["cy"]:  # parts above the body go behind it
            _draw_part(draw, p, c, col + (255,), outline)
    _draw_part(draw, prod["body"], c, prod["body_col"] + (255,), outline)
    if prod["pattern"] != "plain":
        mask = Image.new("L", (c, c), 0)
        _draw_part(
            ImageDraw.Draw(mask), {**prod["body"], "w": prod["body"]["w"] * 0.85, "h": prod["body"]["h"] * 0.85}, c, 255
        )
        layer = _pattern(prod, c)
        obj.paste(layer, (0, 0), ImageChops.darker(layer.getchannel("A"), mask))  # the pattern, inside the body
    bx0, by0, bx1, by1 = _box(prod["body"], c)
    for mx, my, r, kind in prod["marks"]:
        x, y, rr = (bx0 + bx1) / 2 + mx * (bx1 - bx0), (by0 + by1) / 2 + my * (by1 - by0), max(1.5, r * c)
        (draw.ellipse if kind == 0 else draw.rectangle)((x - rr, y - rr, x + rr, y + rr), fill=prod["mark_col"])
    for p, col in zip(prod["parts"], prod["part_cols"], strict=True):
        if p["cy"] >= prod["body"]["cy"]:
            _draw_part(draw, p, c, col + (255,), outline)
    return obj


# ---------------------------------------------------------------------------------------------- views


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Studio-like or coloured gradient with random clutter shapes."""
    sat = 0.1 if rng.random() < 0.4 else 0.6  # eBay-like near-white studio shots, or a coloured scene
    a = np.array(_hsv(rng.uniform(0, 1), rng.uniform(0, sat), rng.uniform(0.6, 1)), np.float32)
    b = np.array(_hsv(rng.uniform(0, 1), rng.uniform(0, sat), rng.uniform(0.4, 1)), np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None] * np.ones((1, w, 1), np.float32)
    bg = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(0, 5))):
        x, y, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * max(w, h)
        col = _hsv(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.2, 1))
        box = (x - s / 2, y - s / 2, x + s / 2, y + s / 2 * rng.uniform(0.3, 1.5))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse(box, fill=col)
        elif kind == 1:
            draw.rectangle(box, fill=col)
        else:
            draw.line(box, fill=col, width=max(1, int(s / 8)))
    return bg


def render_view(obj: Image.Image, rng: np.random.Generator, size: int) -> bytes:
    """One photo of the product: pose, scale, crop, background, lighting, occlusion; JPEG bytes."""
    aspect = rng.uniform(0.75, 1.33)
    w, h = (size, max(8, int(size / aspect))) if aspect >= 1 else (max(8, int(size * aspect)), size)
    if rng.random() < 0.5:
        obj = obj.transpose(Image.FLIP_LEFT_RIGHT)
    scale = rng.uniform(0.65, 1.1) * min(w, h) / obj.width
    squash = rng.uniform(0.65, 1.0)  # foreshortening of a turned object
    sx, sy = (squash, 1.0) if rng.random() < 0.5 else (1.0, squash)
    obj = obj.resize((max(4, int(obj.width * scale * sx)), max(4, int(obj.height * scale * sy))), Image.BILINEAR)
    obj = obj.rotate(rng.uniform(-40, 40), resample=Image.BILINEAR, expand=True)
    bg = _background(rng, w, h)
    # the centre may drift so that part of the object is cropped away
    x = int((w - obj.width) / 2 + rng.uniform(-0.25, 0.25) * w)
    y = int((h - obj.height) / 2 + rng.uniform(-0.25, 0.25) * h)
    bg.paste(obj, (x, y), obj)
    if rng.random() < 0.5:  # occluder in front of the object
        draw = ImageDraw.Draw(bg)
        ow, oh = rng.uniform(0.15, 0.4) * w, rng.uniform(0.15, 0.4) * h
        ox, oy = x + rng.uniform(0, obj.width) - ow / 2, y + rng.uniform(0, obj.height) - oh / 2
        col = _hsv(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 1))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((ox, oy, ox + ow, oy + oh), fill=col)
    arr = np.asarray(bg, dtype=np.float32)
    cast = rng.uniform(0.85, 1.15, size=3).astype(np.float32) * rng.uniform(0.75, 1.2)
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(-0.25, 0.25)
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None] * rng.uniform(-0.25, 0.25)
    arr = arr * cast * (1 + gx + gy) + rng.normal(0, 4, size=(1, 1, 3)).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


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
    prod = _product(seed, cls, _archetype(seed, cls.super_class_id))
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


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (the Stanford_Online_Products root)")
    parser.add_argument("--classes", type=int, default=200, help="classes in all, split about half train/half test")
    parser.add_argument(
        "--train-classes",
        type=int,
        default=None,
        help="how many of --classes are train (default: half, as SOP); the rest are test",
    )
    parser.add_argument("--images-per-class", default="2-12", help="K or LO-HI (uniform per class); SOP has 2..12")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="longer image side in pixels")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering classes in parallel")
    parser.add_argument("--force", action="store_true", help="replace a previous synth-sop output in OUT")
    parser.add_argument(
        "--query-views",
        type=int,
        default=0,
        help="also render N new photos of every test product into OUT/queries (not in the catalogue; queries.txt)",
    )


def run(args: argparse.Namespace) -> int:
    counts = synth_sop(
        args.out,
        args.classes,
        parse_images_per_class(args.images_per_class),
        args.seed,
        args.size,
        max(1, args.workers),
        args.force,
        args.query_views,
        args.train_classes,
    )
    log.info(
        "wrote %d images to %s: train %d classes / %d images, test %d classes / %d images",
        counts["images"],
        args.out,
        counts["train_classes"],
        counts["train_images"],
        counts["test_classes"],
        counts["test_images"],
    )
    if counts["query_images"]:
        log.info("and %d held-out query views of the test products (%s/queries.txt)", counts["query_images"], args.out)
    return 0
