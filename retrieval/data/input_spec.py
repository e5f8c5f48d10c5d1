"""What a model expects of its input images (:class:`InputSpec`): owned by the data side, as timm's data config is.

Built once from the model (timm's data config) and the run's ``data`` section, exported beside the weights as
``input.json``, and handed to every transform: training, validation, ``embed``, search, the service and export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from retrieval.config.schema import DataConfig
from retrieval.errors import UserError


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model expects of its input images: one object from training to embedding, search and export.

    Built once from the model (timm's data config) and the run's ``data`` section; every transform (train, eval,
    search, export) takes it, so a model trained with one resize filter or size is never embedded with another.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"InputSpec.size: expected a positive size, got {self.size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"InputSpec.crop_pct: expected a value in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"InputSpec.interpolation: expected bicubic or bilinear, got {self.interpolation!r}")

    @classmethod
    def of(cls, model: Any, data: DataConfig | None = None) -> InputSpec:
        """``model``'s pretrained input (its ``data_config``, timm's), with ``data.img_size``/``data.interpolation``
        applied."""
        dc = model.data_config
        data = data or DataConfig()
        return cls(
            size=int(data.img_size or dc["input_size"][-1]),
            mean=tuple(float(x) for x in dc["mean"]),
            std=tuple(float(x) for x in dc["std"]),
            crop_pct=float(dc.get("crop_pct", 0.875)),
            interpolation=data.interpolation,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InputSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"input spec: unknown keys {sorted(unknown)} (expected {sorted(known)})")
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def with_size(self, size: int | None) -> InputSpec:
        return dataclasses.replace(self, size=size) if size else self
