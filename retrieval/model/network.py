"""The embedding model: a timm backbone's pooled features -> optional linear projection -> L2 normalisation.

    model = build_model(cfg.model)            # any timm name; cfg.model.kwargs go to timm.create_model
    emb = model(images)                       # B x model.embed_dim, unit length when cfg.model.normalize

Pretrained weights: ``model.pretrained=true`` asks timm (HF hub or its local cache; set ``HF_HUB_OFFLINE=1`` on
machines without network so a cache miss fails in a second instead of hanging). ``model.pretrained_file`` loads a
local ``.safetensors``/``.pth`` offline through timm's ``pretrained_cfg_overlay=dict(file=...)``, so timm's own
checkpoint filter still converts formats and resizes what depends on ``img_size`` (patch embeddings, absolute
position embeddings; SwinV2's continuous position bias has no size-dependent weights, so another ``img_size`` or
``window_size`` loads as is). Because timm loads non-strictly whenever the classifier is dropped (``num_classes=0``),
a file of the wrong architecture would load silently; :func:`check_pretrained_file` therefore compares keys and
shapes first and raises a :class:`UserError` naming expected vs found keys. A ``pretrained_file`` wins over
``pretrained``.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

from retrieval.config.schema import Config, ConfigError, ModelConfig
from retrieval.errors import UserError

log = logging.getLogger(__name__)

_RESERVED_KWARGS = ("num_classes", "pretrained", "pretrained_cfg_overlay", "drop_path_rate")


class EmbeddingModel(nn.Module):
    """Backbone pooled features, projected by ``head`` (Linear or Identity), L2-normalised when ``normalize``."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        embed_dim: int,
        normalize: bool,
        data_config: dict[str, Any],
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embed_dim = embed_dim
        self.normalize = normalize
        self.data_config = data_config
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        emb = self.head(self.backbone(images))
        if emb.dtype in (torch.float16, torch.bfloat16):
            emb = emb.float()  # distances for mining/ranking in fp32 even under autocast
        return F.normalize(emb, dim=-1) if self.normalize else emb


def initial_model(cfg: Config) -> EmbeddingModel:
    """The run's model at its starting weights: seeded, so `retrieval embed --untrained` rebuilds it exactly."""
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model)


def build_model(cfg: ModelConfig, scratch_init: bool = True) -> EmbeddingModel:
    """The model described by ``cfg``, with pretrained weights when ``cfg.pretrained``/``cfg.pretrained_file``.

    ``scratch_init=False`` keeps timm's own initialisation when no weights are loaded (a zero-shot baseline of
    timm's architecture exactly as ``timm.create_model`` makes it); see :func:`_scratch_init` for the default."""
    backbone = _create_backbone(cfg, scratch_init)
    feat_dim = int(backbone.num_features)
    if cfg.embed_dim is None:
        head, embed_dim = nn.Identity(), feat_dim
    else:
        head, embed_dim = nn.Linear(feat_dim, cfg.embed_dim), cfg.embed_dim
    if cfg.grad_checkpointing:
        try:
            backbone.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError) as e:
            raise ConfigError(f"model.grad_checkpointing: {cfg.name} does not support it ({e})") from None
    model = EmbeddingModel(backbone, head, embed_dim, cfg.normalize, _data_config(backbone, cfg), cfg.channels_last)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``torch.compile(model)`` when ``cfg.compile``; exports unwrap it again (``_orig_mod``)."""
    return torch.compile(model) if cfg.compile else model


def _timm_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    for key in _RESERVED_KWARGS:
        if key in cfg.kwargs:
            raise ConfigError(f"model.kwargs.{key}: set by the model builder, remove it from model.kwargs")
    return {**cfg.kwargs, "num_classes": 0, "drop_path_rate": cfg.drop_path_rate}


def _create_backbone(cfg: ModelConfig, scratch_init: bool = True) -> nn.Module:
    kwargs = _timm_kwargs(cfg)
    _check_name(cfg.name)
    if cfg.pretrained_file:
        path = check_pretrained_file(cfg.pretrained_file, cfg.name, kwargs)
        log.info("loading %s weights from %s", cfg.name, path)
        return _create(cfg.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    if cfg.pretrained:
        try:
            return _create(cfg.name, pretrained=True, **kwargs)
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as e:  # network, cache miss, HF_HUB_OFFLINE: all mean "no weights here"
            raise UserError(
                f"model.pretrained: could not get pretrained weights for {cfg.name!r} from the HF hub "
                f"or its cache ({type(e).__name__}: {e}); offline, set model.pretrained_file to a "
                "local .safetensors/.pth, or fill the HF cache and set HF_HUB_OFFLINE=1"
            ) from None
    backbone = _create(cfg.name, pretrained=False, **kwargs)
    return _scratch_init(backbone) if scratch_init else backbone


def _scratch_init(backbone: nn.Module) -> nn.Module:
    """SwinV2 from scratch: residual post-norm gains to 1 instead of timm's 0.

    timm (like the official SwinV2 code) zero-initialises every block's ``norm1``/``norm2`` weight, so at init each
    block is the identity and its attention/MLP weights get no gradient until those gains have grown (about lr per
    AdamW step): in a short from-scratch run the network stays a stack of linear patch projections and the triplet
    loss collapses the embeddings (measured: tiny demo SwinV2, 600 steps, test Recall@1 0.012 with zero gains vs
    0.05-0.08 with gains of 1). Pretrained weights overwrite these gains, so this only changes from-scratch models.
    """
    for module in backbone.modules():
        if type(module).__name__ == "SwinTransformerV2Block":
            for norm in (module.norm1, module.norm2):
                nn.init.ones_(norm.weight)
    return backbone


def _create(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:  # an unknown keyword in model.kwargs
        raise ConfigError(f"model.kwargs: timm model {name!r} rejected them ({e})") from None


def _check_name(name: str) -> None:
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    raise ConfigError(f"model.name: unknown timm model {name!r}" + (f" (did you mean {close}?)" if close else ""))


def _data_config(backbone: nn.Module, cfg: ModelConfig) -> dict[str, Any]:
    """timm's data config, with ``input_size`` of the model as built (timm reports the pretrained size even
    when ``img_size`` was overridden)."""
    size = cfg.kwargs.get("img_size") or getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    args: dict[str, Any] = {}
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        args["input_size"] = (int(cfg.kwargs.get("in_chans", 3)), int(h), int(w))
    return dict(resolve_data_config(args=args, model=backbone))


# ---------------------------------------------------------------------------------------------
# Local pretrained files


def check_pretrained_file(path: str | os.PathLike, name: str, timm_kwargs: dict[str, Any]) -> Path:
    """Raise a UserError unless ``path`` holds weights for ``timm.create_model(name, **timm_kwargs)``.

    The file goes through timm's checkpoint filter for the architecture (format conversion, size-dependent
    resampling) exactly as timm would load it; the classifier keys are dropped (``num_classes=0``). The
    comparison runs against a meta-device model, so it costs no memory for the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"model.pretrained_file: {str(path)!r} does not exist (expected a .safetensors or .pth "
            "file of weights for model.name)"
        )
    if (path.parent / "model.yaml").is_file():  # model.files.CONFIG_NAME (files imports this module): a whole model
        raise UserError(
            f"model.pretrained_file: {str(path)!r} is a model exported by `retrieval train` (model.yaml beside it: "
            f"backbone and head), not a backbone's weights; start a new run from it with "
            f"model.init_from={path.parent}"
        )
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as e:  # truncated, not a checkpoint, pickled objects refused by weights_only
        raise UserError(
            f"model.pretrained_file: cannot read {str(path)!r} as a .safetensors or torch "
            f"checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.pretrained_file: {str(path)!r} does not hold a state dict of tensors")
    try:
        with torch.device("meta"):  # shapes only: no memory, no init time
            reference = timm.create_model(name, pretrained=False, **timm_kwargs)
    except Exception:  # a model whose __init__ needs real values (e.g. .item()): build it on the CPU
        reference = timm.create_model(name, pretrained=False, **timm_kwargs)
    found = _filtered(state, name, reference)
    for classifier in _as_tuple(reference.pretrained_cfg.get("classifier")):
        found.pop(f"{classifier}.weight", None)
        found.pop(f"{classifier}.bias", None)
    problem = describe_mismatch(reference.state_dict(), found)
    if problem:
        user_kwargs = {k: v for k, v in timm_kwargs.items() if k not in _RESERVED_KWARGS}
        raise UserError(
            f"model.pretrained_file: {str(path)!r} does not fit model.name={name!r} with "
            f"model.kwargs={user_kwargs}: {problem}"
        )
    return path


def _filtered(state: dict[str, torch.Tensor], name: str, reference: nn.Module) -> dict[str, torch.Tensor]:
    """Apply the architecture's ``checkpoint_filter_fn`` (what timm applies when loading pretrained weights)."""
    try:
        module = sys.modules[timm.models.model_entrypoint(name).__module__]
    except (RuntimeError, KeyError):
        return dict(state)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return dict(state)
    try:
        return dict(filter_fn(dict(state), reference))
    except Exception as e:  # a filter that cannot run on meta tensors: compare the raw keys instead
        log.debug("checkpoint filter of %s failed on the meta model (%s); comparing raw keys", name, e)
        return dict(state)


def describe_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], show: int = 5) -> str:
    """Empty when keys and shapes agree; else counts and a few names of missing/unexpected/other-shape keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in expected
        if k in found and tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    if not (missing or unexpected or reshaped):
        return ""

    def few(items: list[str]) -> str:
        return ", ".join(items[:show]) + (", ..." if len(items) > show else "")

    parts = [f"expected {len(expected)} keys, found {len(found)}"]
    if missing:
        parts.append(f"{len(missing)} missing (expected but not found: {few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (found but not expected: {few(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} with another shape ({few(reshaped)})")
    return "; ".join(parts)


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    return (x,) if isinstance(x, str) else tuple(x)


# ---------------------------------------------------------------------------------------------
# Wrappers


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/DeepSpeed (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
