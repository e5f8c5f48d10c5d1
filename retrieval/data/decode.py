"""Image bytes -> an RGB PIL image: the one decoder of the catalogue and of its queries.

The loader (training, validation and ``retrieval embed``), :class:`~retrieval.embed.embedder.Embedder` (the
Python API and ``retrieval search``), the service (``retrieval serve``) and the report's thumbnails all decode
here, so a catalogue image queried through any of them is prepared exactly as it was when its stored vector was
made, and finds itself first with cosine 1 (to float rounding).

Every image is decoded at full size. ``Image.draft`` (libjpeg's 1/2, 1/4, 1/8 scale decode) was measured against
it and dropped: on 500 px JPEGs it decodes 2.0-2.9x faster when the model's input is a fifth to a quarter of the
stored size (64-128 px models), not at all from 224 px, and the shard builder's ``--max-side`` already shrinks
large photos once. In exchange its pixels differ from a full decode + resize: a catalogue drafted in the loader
and queried at full size lost up to 0.1 of cosine to itself (issue 29), and a PIL image a user already loaded
cannot be drafted at all, so keeping it "everywhere alike" was not possible. The figures are in the README
(Decoding).

The EXIF orientation is applied: the shard builder stores rotated photos upright, so the original file, queried,
must be turned the same way.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageOps

# a truncated JPEG must fail here, not decode to a grey block
Image.LOAD_TRUNCATED_IMAGES = False
EXIF_ORIENTATION = 0x0112


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened (or already loaded) PIL image as the catalogue saw it: upright by its EXIF orientation, RGB.

    Forces the full decode, so corrupt or truncated data raises here (``OSError``, ``SyntaxError``,
    ``ValueError``...), where the loader counts and skips it."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Image bytes (JPEG, PNG, WebP...) -> RGB at full size (:func:`to_rgb`)."""
    with Image.open(io.BytesIO(data)) as image:
        return to_rgb(image)


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path`` -> RGB, exactly as its bytes in a shard decode (:func:`decode_image`)."""
    return decode_image(Path(path).read_bytes())
