"""The train/eval transforms of the loader, the embedder and the service (decoding is :mod:`retrieval.data.decode`).

torchvision's v1 transforms are used: on PIL input (what the loader decodes to) they measured about
10 % faster than v2 here (RandomResizedCrop + flip + ColorJitter + ToTensor + Normalize, one thread,
64 and 224 px: 441 vs 519 and 1489 vs 1590 us/image).

With ``data.rand_augment`` or ``data.random_erasing`` set, the train transform is timm's own
(``transforms_imagenet_train``: RandomResizedCrop with the same scale/ratio/filter, flip, RandAugment, ToTensor,
Normalize, RandomErasing), so a recipe reads as timm users know it; ``data.color_jitter`` > 0 still applies then
(timm would drop it under RandAugment). timm's crop and RandAugment draw from Python's ``random`` and NumPy's global
generator, not torch's: the loader seeds those per batch too (see :mod:`retrieval.data.loader`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision import transforms as T

from retrieval.config.schema import DataConfig

if TYPE_CHECKING:  # the data layer only reads the spec's fields; it never builds a model
    from retrieval.data.input_spec import InputSpec

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}

Transform = Callable[[Image.Image], torch.Tensor]


def eval_min_side(img_size: int, crop_pct: float) -> int:
    """Shorter side after the eval Resize: decoding below it would upsample."""
    return int(img_size / crop_pct)


def train_transform(spec: InputSpec, data: DataConfig) -> Transform:
    """RandomResizedCrop(scale=data.scale) + horizontal flip(data.hflip) [+ ColorJitter] + ToTensor + Normalize;
    timm's train transform when RandAugment or random erasing is on."""
    if data.rand_augment or data.random_erasing > 0:
        return _timm_train_transform(spec, data)
    steps: list = [
        T.RandomResizedCrop(spec.size, scale=tuple(data.scale), interpolation=_INTERPOLATION[spec.interpolation]),
    ]
    if data.hflip > 0:
        steps.append(T.RandomHorizontalFlip(data.hflip))
    if data.color_jitter > 0:
        j = data.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [T.ToTensor(), T.Normalize(mean=list(spec.mean), std=list(spec.std))]
    return T.Compose(steps)


def _timm_train_transform(spec: InputSpec, data: DataConfig) -> Transform:
    from timm.data.transforms_factory import transforms_imagenet_train  # only runs that ask for it pay the import

    return transforms_imagenet_train(
        img_size=spec.size,
        scale=tuple(data.scale),
        ratio=(3 / 4, 4 / 3),  # torchvision's RandomResizedCrop default, as on the plain path
        hflip=data.hflip,
        color_jitter=data.color_jitter or None,  # None, not 0: a no-op ColorJitter would still draw random numbers
        force_color_jitter=data.color_jitter > 0,
        auto_augment=data.rand_augment,
        interpolation=spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        re_prob=data.random_erasing,
        re_mode=data.random_erasing_mode,
        re_count=1,
    )


def eval_transform(spec: InputSpec) -> Transform:
    """Resize(shorter side to size / crop_pct) + CenterCrop(size) + ToTensor + Normalize (timm's eval), with the
    spec's resize filter: the one the model was trained with."""
    return T.Compose(
        [
            T.Resize(eval_min_side(spec.size, spec.crop_pct), interpolation=_INTERPOLATION[spec.interpolation]),
            T.CenterCrop(spec.size),
            T.ToTensor(),
            T.Normalize(mean=list(spec.mean), std=list(spec.std)),
        ]
    )
