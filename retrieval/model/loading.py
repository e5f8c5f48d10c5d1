"""THE model loader: every command and API that takes a model goes through :func:`load_model`.

    loaded = load_model("runs/sop")             # a run folder (its best export)
    loaded = load_model("exports/sop-timm")     # a folder written by `retrieval export --format timm`
    loaded = load_model("configs/x.yaml", untrained=True)   # an architecture at its seeded starting weights
    loaded = load_model("swinv2_base_window16_256", pretrained=True)           # zero-shot: timm's pooled features
    loaded = load_model("swinv2_base_window16_256", pretrained_file="w.safetensors")   # the same, offline
    loaded.model, loaded.spec, loaded.provenance  # eval-mode model, its InputSpec, where it came from (+ sha256)

Forms accepted, wherever a model is taken (``retrieval embed --model``, ``Embedder.load``, ``Searcher``,
``retrieval serve``, ``retrieval export``):

* a run folder (``config.yaml`` + ``model.safetensors``): its best export, with the run's input spec;
* an export folder or a ``model.safetensors`` path (``model.yaml`` beside it, ``input.json`` when written);
* a timm export folder (``config.json`` + ``model.safetensors``, :mod:`retrieval.model.formats`): timm's own
  model, L2-normalised as its ``config.json`` says;
* a timm model name (or ``hf-hub:org/name``) with ``pretrained`` (timm's hub or its cache) or ``pretrained_file``
  (a local ``.safetensors``/``.pth``): zero-shot, the backbone's pooled features (``num_classes=0``), no
  projection, L2-normalised (the seed table's "pretrained" row); with ``untrained``, timm's own random
  initialisation (seed 0) of that architecture; a config YAML with ``pretrained``/``pretrained_file``: the same
  for the config's architecture (``model.kwargs``) at its ``data.img_size``;
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
from retrieval.config.schema import Config, DataConfig, ModelConfig
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


def load_model(
    model_path: str | os.PathLike,
    untrained: bool = False,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
) -> LoadedModel:
    """The model at ``model_path`` in eval mode on the CPU (see the module docstring for the accepted forms).

    ``untrained`` rebuilds the architecture at its seeded starting weights (the seed table's "untrained" row).
    The input spec is the one the model was trained with: ``input.json`` beside the weights, else the run's
    config, else the model's defaults. ``pretrained``/``pretrained_file`` go with a timm model name or a config
    YAML (zero-shot: the config's architecture, ``model.kwargs`` and input size included, with those weights).
    """
    path = Path(model_path)
    if is_timm_name(model_path):
        return _load_timm_name(ModelConfig(name=str(model_path)), None, untrained, pretrained, pretrained_file)
    if path.suffix in (".yaml", ".yml") and (pretrained or pretrained_file):
        cfg = load_config(path)
        return _load_timm_name(cfg.model, cfg.data, False, pretrained, pretrained_file, str(path))
    if pretrained or pretrained_file:
        raise UserError(
            f"--pretrained/--pretrained-file: {model_path} is not a timm model name or a config YAML (they choose "
            "an architecture's weights; a run or export folder holds its own)"
        )
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
    ours = Path(source).exists() and parent.provenance.get("format") != "timm"  # a timm export or name: no loss
    loss = read_loss_state(source) if ours else None
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


# ------------------------------------------------------------------------------------------ a timm model name


def is_timm_name(model: str | os.PathLike) -> bool:
    """A timm model name (``swinv2_base_window16_256``) or hub id (``hf-hub:timm/...``), not a path on disk."""
    import timm

    text = str(model)
    if Path(text).exists():
        return False
    return text.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(text)


def _load_timm_name(
    arch: ModelConfig, data: DataConfig | None, untrained: bool, pretrained: bool, pretrained_file, source=None
) -> LoadedModel:
    """Zero-shot: timm's backbone of ``arch`` (name, kwargs) as it comes (pooled features, no projection,
    L2-normalised); ``data`` (a config's) sets the input size; ``source`` names the model in the provenance."""
    name = source or arch.name
    if not (untrained or pretrained or pretrained_file):
        raise UserError(
            f"--model {name}: a timm model name needs its weights: --pretrained (timm's hub or its cache), "
            "--pretrained-file FILE (a local .safetensors/.pth), or --untrained (timm's random initialisation)"
        )
    weights = None if untrained else (pretrained_file, pretrained)
    cfg = ModelConfig(
        name=arch.name,
        kwargs=dict(arch.kwargs),
        pretrained=bool(weights and pretrained),
        pretrained_file=str(pretrained_file) if weights and pretrained_file else None,
        embed_dim=None,
        normalize=True,
    )
    torch.manual_seed(0)  # untrained: timm's initialisation, the same for every call
    model = build_model(cfg, scratch_init=False).eval()
    check_finite_weights(model, pretrained_file or name)
    digest = None
    if cfg.pretrained_file:
        digest = file_sha256(cfg.pretrained_file)
    elif cfg.pretrained:
        digest = _state_sha256(model)  # hub weights have no file of ours: the tensors identify them
    provenance = {"model": name, "untrained": cfg.pretrained_file is None and not cfg.pretrained, "zero_shot": True}
    provenance.update(pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file, model_sha256=digest)
    return LoadedModel(model, _timm_spec(model, data), provenance, cfg)


def _timm_spec(model: EmbeddingModel, data: DataConfig | None) -> InputSpec:
    """A config's data section when given, else timm's own data config (its resize filter too, where ours has a
    choice)."""
    if data is not None:
        return InputSpec.of(model, data)
    dc = model.data_config
    interpolation = dc.get("interpolation") if dc.get("interpolation") in ("bilinear", "bicubic") else "bicubic"
    return InputSpec.of(model, DataConfig(interpolation=interpolation))


def _state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
