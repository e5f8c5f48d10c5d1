"""A trained model as files: ``model.safetensors`` + ``model.yaml`` (+ ``input.json``), written and read here only.

    export_model(model, cfg.model, run_dir, spec=spec)  # run_dir/model.safetensors, model.yaml, input.json
    model, model_cfg = load_exported(run_dir)           # no DeepSpeed/accelerate, no original pretrained weights
    spec = read_input_spec(weights)                      # how the model's images must be prepared

Exports are byte-deterministic for the same weights (safetensors sorts its header; the YAML keeps the config's
field order), so a checksum identifies a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from retrieval.config.io import config_from_dict, to_dict
from retrieval.config.schema import ConfigError, ModelConfig
from retrieval.data.input_spec import InputSpec
from retrieval.errors import UserError
from retrieval.model.network import EmbeddingModel, build_model, describe_mismatch, unwrap
from retrieval.util import atomic_path, write_atomic

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.yaml"
INPUT_NAME = "input.json"
LOSS_NAME = "loss.safetensors"  # the loss's parameters (ProxyAnchor's proxies), when it has any
LOSS_MODULE = "loss"  # the trainer holds them in the model under this name: state-dict keys "loss.*"


def export_model(
    model: nn.Module,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    spec: InputSpec | None = None,
) -> Path:
    """Write ``out_dir/model.safetensors`` (float32, contiguous), ``out_dir/model.yaml`` and, given ``spec``,
    ``out_dir/input.json`` (how images must be prepared); return the weights path. The loss's parameters (keys
    ``loss.*``: ProxyAnchor's proxies, trained inside the model) go to ``out_dir/loss.safetensors``, without the
    prefix, so that ``model.safetensors`` stays the embedding model alone.

    ``state_dict`` overrides the model's own (pass ``accelerator.get_state_dict(model)`` under DeepSpeed ZeRO-3,
    where the parameters are partitioned). The yaml has ``pretrained: false`` and no ``pretrained_file``: the
    exported weights are complete, so loading never needs the original ones. Each file is written atomically,
    so a crash never leaves a truncated file under the final name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else unwrap(model).state_dict()
    tensors = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):  # DDP / DeepSpeed / torch.compile, in any nesting
            key = key.split(".", 1)[1]
        value = value.detach().to("cpu")
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[key] = (value.float() if value.is_floating_point() else value).contiguous().clone()
    export_cfg = dataclasses.replace(cfg, pretrained=False, pretrained_file=None)
    prefix = LOSS_MODULE + "."
    loss = {k.removeprefix(prefix): tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
    weights = out_dir / WEIGHTS_NAME
    for path, part in ((weights, tensors), (out_dir / LOSS_NAME, loss)):
        if part:
            with atomic_path(path) as tmp:
                # one metadata key: safetensors keeps metadata in a hash map, so several keys come out in varying
                # order and two exports of the same weights would differ byte-wise (the model name is in model.yaml)
                save_file(part, str(tmp), metadata={"format": "pt"})
    write_atomic(out_dir / CONFIG_NAME, yaml.safe_dump(to_dict(export_cfg), sort_keys=False))
    if spec is not None:
        write_atomic(out_dir / INPUT_NAME, json.dumps(spec.to_dict(), indent=1) + "\n")
    return weights


def read_loss_state(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The loss's exported parameters (``{"proxies": C x d}`` for proxy_anchor) of an export folder or run dir, or
    None when the loss had none."""
    weights, _ = resolve_export(path)
    loss = weights.parent / LOSS_NAME
    return load_file(str(loss)) if loss.is_file() else None


def read_input_spec(weights: str | os.PathLike) -> InputSpec | None:
    """The ``input.json`` written beside exported weights, or None (exports from before it existed)."""
    path = Path(weights).parent / INPUT_NAME
    if not path.is_file():
        return None
    try:
        return InputSpec.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a valid input spec ({e})") from None


def resolve_export(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, yaml) for a run dir, an export folder, or a ``model.safetensors`` path."""
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(
                f"{str(path)!r} holds no {WEIGHTS_NAME} (expected a run dir or an export folder with "
                f"{WEIGHTS_NAME} + {CONFIG_NAME}, written by `retrieval train` or export_model)"
            )
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{str(path)!r}: expected a .safetensors file, a run dir or an export folder")
        weights = path
    else:
        raise UserError(
            f"model {str(path)!r} does not exist (expected a run dir, an export folder, a {WEIGHTS_NAME} file, "
            "or a timm model name with --pretrained / --pretrained-file)"
        )
    config = weights.parent / CONFIG_NAME
    if not config.is_file():
        raise UserError(f"{str(config)!r} is missing: {weights.name} needs the {CONFIG_NAME} written beside it")
    return weights, config


def load_exported(path: str | os.PathLike) -> tuple[EmbeddingModel, ModelConfig]:
    """The exported model in eval mode on CPU, and its config; plain torch + timm, no DeepSpeed/accelerate."""
    weights, config = resolve_export(path)
    try:
        values = yaml.safe_load(config.read_text()) or {}
        cfg = config_from_dict({"model": values}).model
    except (yaml.YAMLError, ConfigError) as e:
        raise UserError(f"{str(config)!r}: not a valid model config ({e})") from None
    cfg = dataclasses.replace(cfg, pretrained=False, pretrained_file=None)
    model = build_model(cfg)
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise UserError(f"{str(weights)!r}: cannot read as safetensors ({type(e).__name__}: {e})") from None
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise UserError(f"{str(weights)!r} does not match the model in {str(config)!r}: {problem}")
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg
