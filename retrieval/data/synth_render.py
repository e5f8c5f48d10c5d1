"""Drawing the synthetic products of :mod:`retrieval.data.synth`: archetypes per super class, products per class,
views per image. Pure functions of their seeds (per-class and per-image generators, no global state)."""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageChops, ImageDraw

PART_KINDS = ("rect", "rounded", "ellipse", "polygon", "ring", "bar")
PATTERNS = ("plain", "stripes", "dots", "checker")
JPEG_QUALITY = 90


# ------------------------------------------------------------------------------------------ products


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def archetype(seed: int, super_id: int) -> dict:
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


def product(seed: int, class_index: int, arch: dict) -> dict:
    """A class: the archetype with its own proportions, colours, pattern and logo marks."""
    rng = np.random.default_rng([seed, 1, class_index])

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
