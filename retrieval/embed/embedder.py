"""Embed images with a trained model from Python: load once, embed many.

    embedder = Embedder.load("runs/sop")               # a run folder, an export folder, a timm export folder
    vectors = embedder.embed(["a.jpg", pil_image])     # N x embed_dim float32 numpy, unit rows when normalised

Each image is decoded and prepared exactly as the model's catalogue was (:mod:`retrieval.data.decode`, then its
:class:`~retrieval.data.input_spec.InputSpec`: size, crop, resize filter, mean/std), so a catalogue image embedded
here gets its stored vector back (cosine >= 0.9999) and any query is comparable with the index built by
``retrieval embed``.
Images may be paths, PIL images, or tensors already prepared by ``embedder.transform`` (C x H x W or a batch).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval.data.decode import read_image, to_rgb
from retrieval.data.transforms import eval_transform
from retrieval.errors import UserError
from retrieval.model.loading import LoadedModel, load_model
from retrieval.util import progress_bar

ImageLike = str | os.PathLike | Image.Image | torch.Tensor


def open_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` decoded as the catalogue's images were (:mod:`retrieval.data.decode`), or a UserError
    naming the file."""
    try:
        return read_image(path)
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError...)
        raise UserError(f"query {path}: cannot read the image ({type(e).__name__}: {e})") from None


class Embedder:
    """A model in eval mode on one device, its input transform, and a batch size."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 64, device: str | torch.device | None = None) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size: expected a positive integer, got {batch_size}")
        self.loaded = loaded
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = loaded.model.to(self.device).eval()
        self.spec = loaded.spec
        self.transform = eval_transform(loaded.spec)
        self.batch_size = batch_size

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        untrained: bool = False,
        batch_size: int = 64,
        device: str | None = None,
        pretrained: bool = False,
        pretrained_file: str | os.PathLike | None = None,
    ) -> Embedder:
        """Any model :func:`~retrieval.model.loading.load_model` takes: a run folder, an export folder or
        ``model.safetensors``, a timm export folder, a timm model name with ``pretrained``/``pretrained_file``
        (zero-shot), or (``untrained``) a config YAML."""
        return cls(load_model(model, untrained, pretrained, pretrained_file), batch_size, device)

    @property
    def dim(self) -> int:
        return int(self.model.embed_dim)

    def prepare(self, image: ImageLike) -> torch.Tensor:
        """One model input (3 x size x size) from a path, a PIL image or an already prepared tensor."""
        if isinstance(image, torch.Tensor):
            expected = (3, self.spec.size, self.spec.size)
            if tuple(image.shape) != expected:
                raise UserError(
                    f"tensor image: expected a prepared input of shape {expected}, got {tuple(image.shape)}"
                )
            return image.float()
        if isinstance(image, Image.Image):
            return self.transform(to_rgb(image))
        if isinstance(image, (str, os.PathLike)):
            return self.transform(open_image(Path(image)))
        raise UserError(f"image: expected a path, a PIL image or a tensor, got {type(image).__name__}")

    @torch.no_grad()
    def embed(self, images: ImageLike | Iterable[ImageLike], progress: bool = False) -> np.ndarray:
        """N x dim float32 embeddings of ``images`` (one image, a list, or an N x 3 x H x W tensor); ``progress``
        shows a bar in images (with a total when ``images`` has a length)."""
        total = len(images) if progress and isinstance(images, (list, tuple)) else None
        parts = []
        with progress_bar(total, "embed queries", "img", disable=not progress) as bar:
            for batch in self._batches(images):
                parts.append(self.model(batch.to(self.device)).float().cpu().numpy())
                bar.update(len(batch))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def _batches(self, images: ImageLike | Iterable[ImageLike]) -> Iterator[torch.Tensor]:
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, (str, os.PathLike, Image.Image, torch.Tensor)):
            images = [images]
        batch: list[torch.Tensor] = []
        for image in images:  # prepared one batch at a time: a long list of paths is never decoded whole
            batch.append(self.prepare(image))
            if len(batch) == self.batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)
