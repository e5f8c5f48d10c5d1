"""A trained model in other ecosystems' formats: a timm hub folder and ONNX (``retrieval export``).

    export_timm("runs/sop", "out/timm")     # config.json + model.safetensors: timm.create_model("local-dir:out/timm")
    export_onnx("runs/sop", "out/onnx")     # model.onnx (dynamic batch axis) + input.json
    load_model("out/timm")                  # back as our model (retrieval.model.loading takes such a folder anywhere)

timm: our ``EmbeddingModel`` is timm's classifier with ``num_classes=embed_dim``. timm's SwinV2 (like most timm
models) ends in ``forward_head``: global pooling, then ``head.fc``; our backbone is built with ``num_classes=0``
(``head.fc`` is Identity) and our projection ``head`` is a Linear on the pooled features, so ``head.weight`` /
``head.bias`` become ``head.fc.weight`` / ``head.fc.bias`` and the timm model outputs our embedding *before* the L2
normalisation (timm has no such layer; normalise its output yourself, as our ``normalize`` flag in config.json
says). ``config.json`` is written by timm's own ``save_for_hf`` (architecture, num_classes, num_features,
model_args, pretrained_cfg with our :class:`~retrieval.data.input_spec.InputSpec`), so ``timm.models.push_to_hub`` works on
the folder unchanged.

ONNX: the whole ``EmbeddingModel`` (normalisation included: the vectors our index holds), input ``images``
(N x 3 x size x size, normalised as ``input.json`` says), output ``embeddings``, batch axis dynamic.

A model with NaN or inf weights is refused (by the loader): an export is what other people run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import UserError, require
from retrieval.model.files import INPUT_NAME
from retrieval.model.loading import LoadedModel, load_model
from retrieval.model.network import EmbeddingModel
from retrieval.util import write_atomic

log = logging.getLogger(__name__)

FORMATS = ("timm", "onnx")
ONNX_NAME = "model.onnx"


def export(model_path: str | os.PathLike, fmt: str, out: str | os.PathLike, **weights: Any) -> Path:
    """Export the model of a run folder / export folder (any form :func:`load_model` takes, ``weights`` its
    keyword arguments) as ``fmt`` into ``out``; returns the folder."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return (export_timm if fmt == "timm" else export_onnx)(model_path, out, **weights)


# ---------------------------------------------------------------------------------------------------- timm


def timm_state_dict(model: EmbeddingModel) -> dict[str, torch.Tensor]:
    """Our weights under timm's names: ``backbone.X`` -> ``X``, projection ``head`` -> ``head.fc``."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            state[key.removeprefix("backbone.")] = value
        elif key.startswith("head."):
            state["head.fc." + key.removeprefix("head.")] = value
    return state


def timm_model(loaded: LoadedModel, model_name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """timm's own model (``num_classes=embed_dim``) holding our weights, strictly loaded."""
    import timm

    model = loaded.model
    num_classes = model.embed_dim if isinstance(model.head, torch.nn.Linear) else 0
    net = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    net.load_state_dict(timm_state_dict(model), strict=True)
    return net.eval()


def export_timm(model_path: str | os.PathLike, out: str | os.PathLike, **weights: Any) -> Path:
    """``out/config.json`` + ``out/model.safetensors`` in timm's hub format (see the module docstring)."""
    from timm.models import save_for_hf

    loaded = load_model(model_path, **weights)
    cfg = loaded.config
    net = timm_model(loaded, cfg.name, dict(cfg.kwargs))
    spec = loaded.spec
    data_config = {
        "input_size": (3, spec.size, spec.size),
        "mean": spec.mean,
        "std": spec.std,
        "crop_pct": spec.crop_pct,
        "crop_mode": "center",
        "interpolation": spec.interpolation,
    }
    extra = {
        "pretrained_cfg": {"tag": "retrieval"},  # not the ImageNet weights the architecture's default tag names
        "retrieval": {"normalize": bool(loaded.model.normalize), "embed_dim": loaded.model.embed_dim},
    }
    out = Path(out)
    with _staging(out) as stage:
        save_for_hf(net, str(stage), extra, dict(cfg.kwargs), safe_serialization=True, data_config=data_config)
    log.info("timm export of %s written to %s", model_path, out)
    return out


# ---------------------------------------------------------------------------------------------------- onnx


def export_onnx(model_path: str | os.PathLike, out: str | os.PathLike, opset: int = 18, **weights: Any) -> Path:
    """``out/model.onnx`` (input ``images``, output ``embeddings``, dynamic batch) + ``out/input.json``."""
    for module in ("onnx", "onnxscript"):  # torch.onnx's exporter imports them deep inside, as a traceback
        require(module, "export", "ONNX export")
    loaded = load_model(model_path, **weights)
    model, spec = loaded.model.eval(), loaded.spec
    example = torch.zeros(2, 3, spec.size, spec.size)
    out = Path(out)
    with _staging(out) as stage:
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(
            model,
            (example,),
            str(stage / ONNX_NAME),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        write_atomic(stage / INPUT_NAME, json.dumps(spec.to_dict(), indent=1) + "\n")
    log.info("ONNX export of %s written to %s", model_path, out / ONNX_NAME)
    return out


class _staging:
    """A temporary folder beside ``out`` whose files replace those of ``out`` one by one on success: a failed
    export leaves ``out`` as it was, a reader never sees a half-written file."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=".export-", dir=self.out))
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for f in sorted(self.path.iterdir()):
                    os.replace(f, self.out / f.name)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)
