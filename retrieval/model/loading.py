"""THE model loader: every command and API that takes a model goes through :func:`load_model`.

    loaded = load_model("runs/sop")             # a run folder (its best export)
    loaded = load_model("exports/sop-timm")     # a folder written by `retrieval export --format timm`
    loaded = load_model("configs/x.yaml", untrained=True)   # an architecture at its seeded starting weights
    loaded.model, loaded.spec, loaded.provenance  # eval-mode model, its InputSpec, where it came from (+ sha256)

Forms accepted, wherever a model is taken (``retrieval embed --model``, ``Embedder.load``, ``Searcher``,
``retrieval serve``, ``retrieval export``):

* a run folder (``config.yaml`` + ``model.safetensors``): its best export, with the run's input spec;
* an export folder or a ``model.safetensors`` path (``model.yaml`` beside it, ``input.json`` when written);
* a timm export folder (``config.json`` + ``model.safetensors``, :mod:`retrieval.model.formats`): timm's own
  model, L2-normalised as its ``config.json`` says;
* with ``untrained``: a config YAML or any of the above, rebuilt at its seeded starting weights (those of its
  ``model.init_from`` parent for a continued run: :func:`starting_model`).

Every loaded model is checked for NaN/inf weights (one check, here): a diverged model embeds every image to
garbage and an index over it answers nonsense. ``provenance["model_sha256"]`` identifies the weights file, so
an index can refuse queries embedded by another model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrieval.config.io import load_config
from retrieval.config.schema import Config, ModelConfig
from retrieval.data.input_spec import InputSpec
from retrieval.errors import UserError
from retrieval.model.files import CONFIG_NAME, load_exported, read_input_spec, read_loss_state, resolve_export
from retrieval.model.network import EmbeddingModel, build_model, describe_mismatch, initial_model
from retrieval.run_folder import RunFolder

TIMM_CONFIG, TIMM_WEIGHTS = "config.json", "model.safetensors"
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to embed with: weights, the input spec it was trained with, and where it came from."""

    model: torch.nn.Module
    spec: InputSpec
    provenance: dict[str, Any]
    config: ModelConfig | None = None  # the architecture (timm name and kwargs) the weights belong to


def load_model(model_path: str | os.PathLike, untrained: bool = False) -> LoadedModel:
    """The model at ``model_path`` in eval mode on the CPU (see the module docstring for the accepted forms).

    ``untrained`` rebuilds the architecture at its seeded starting weights (the seed table's "untrained" row).
    The input spec is the one the model was trained with: ``input.json`` beside the weights, else the run's
    config, else the model's defaults.
    """
    path = Path(model_path)
    if not untrained and is_timm_export(path):
        return _load_timm_export(path)
    return _load_ours(path, untrained)


def _load_ours(path: Path, untrained: bool) -> LoadedModel:
    cfg = _run_config(path, untrained)
    digest = None  # the identity of the weights (sha256 of model.safetensors); None for starting weights
    source = path
    if untrained and cfg is not None:
        model, spec, model_cfg = starting_model(cfg)[0], None, cfg.model
    else:
        model, model_cfg = load_exported(path)
        weights = source = resolve_export(path)[0]
        spec = read_input_spec(weights)
        if untrained:
            torch.manual_seed(0)
            model = build_model(model_cfg)
        else:
            digest = file_sha256(weights)
    spec = spec or InputSpec.of(model, cfg.data if cfg is not None else None)
    check_finite_weights(model, source)
    return LoadedModel(model, spec, {"model": str(path), "untrained": untrained, "model_sha256": digest}, model_cfg)


@dataclass
class Parent:
    """The trained model a new run starts from (``model.init_from``): where, its weights' sha256, its loss state."""

    path: str
    sha256: str
    loss: dict[str, torch.Tensor] | None  # {"proxies": C x d} when the parent trained proxy_anchor


def starting_model(cfg: Config) -> tuple[EmbeddingModel, Parent | None]:
    """The run's model at its starting weights: seeded (:func:`~retrieval.model.network.initial_model`), or those of
    ``model.init_from`` (a run folder or an export folder, through :func:`load_model` and its checks) for a run that
    continues a trained one. The parent must be the same architecture (keys and shapes compared, one line naming
    what differs) and, when ``model.init_sha256`` is set, the weights it names."""
    if not cfg.model.init_from:
        return initial_model(cfg), None
    source = cfg.model.init_from
    parent = load_model(source)
    digest = parent.provenance.get("model_sha256")
    if cfg.model.init_sha256 and cfg.model.init_sha256 != digest:
        raise UserError(
            f"model.init_from: {source} holds weights of sha256 {str(digest)[:12]}, model.init_sha256 says "
            f"{cfg.model.init_sha256[:12]}: the parent changed since this run started from it"
        )
    own = dataclasses.replace(cfg.model, pretrained=False, pretrained_file=None)  # the parent's weights replace them
    model = initial_model(dataclasses.replace(cfg, model=own))
    weights = parent.model.state_dict()
    problem = describe_mismatch(model.state_dict(), weights)
    if problem:
        raise UserError(f"model.init_from: {source} is not the architecture of this run's model section: {problem}")
    model.load_state_dict(weights, strict=True)
    loss = None if parent.provenance.get("format") == "timm" else read_loss_state(source)
    log.info("model: starting from the weights of %s (sha256 %s)", source, str(digest)[:12])
    return model, Parent(str(source), str(digest), loss)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_finite_weights(model: torch.nn.Module, source: str | os.PathLike) -> None:
    """Raise a UserError naming the first tensor that holds NaN or inf."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{source}: weight {name!r} holds NaN or inf: the model diverged in training; use another")


def _run_config(path: Path, untrained: bool) -> Config | None:
    if path.suffix in (".yaml", ".yml"):  # an experiment config: only meaningful at its starting weights
        if not untrained:
            raise UserError(
                f"--model {path}: a config file has no trained weights; add --untrained or pass "
                "a run folder / model.safetensors"
            )
        return load_config(path)
    return RunFolder(path).read_config() if RunFolder.is_run(path) else None


# ---------------------------------------------------------------------------------------------------- timm


def is_timm_export(folder: str | os.PathLike) -> bool:
    """A folder in timm's hub format (``config.json`` + ``model.safetensors``, no ``model.yaml`` of ours)."""
    folder = Path(folder)
    return (
        (folder / TIMM_CONFIG).is_file() and (folder / TIMM_WEIGHTS).is_file() and not (folder / CONFIG_NAME).exists()
    )


def _load_timm_export(folder: Path) -> LoadedModel:
    """A folder written by ``retrieval export --format timm`` (or pulled from the hub), back as our model."""
    import timm

    try:
        config = json.loads((folder / TIMM_CONFIG).read_text())
        pcfg, ours = config["pretrained_cfg"], config.get("retrieval", {})
        net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        spec = InputSpec(
            size=int(pcfg["input_size"][-1]),
            mean=tuple(pcfg["mean"]),
            std=tuple(pcfg["std"]),
            crop_pct=float(pcfg.get("crop_pct", 0.875)),
            interpolation=pcfg.get("interpolation", "bicubic"),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{folder / TIMM_CONFIG}: not a timm export ({type(e).__name__}: {e})") from None
    dim = int(config["num_classes"]) or int(config["num_features"])
    model = EmbeddingModel(net, torch.nn.Identity(), dim, bool(ours.get("normalize", True)), {}).eval()
    check_finite_weights(model, folder / TIMM_WEIGHTS)
    digest = file_sha256(folder / TIMM_WEIGHTS)
    return LoadedModel(
        model, spec, {"model": str(folder), "untrained": False, "format": "timm", "model_sha256": digest}
    )
