"""Embedding model: tiny SwinV2 (64 px), projection/normalisation, export round trip, local pretrained files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from torch import nn

from retrieval.config.io import to_dict
from retrieval.config.schema import ConfigError, ModelConfig
from retrieval.errors import UserError
from retrieval.model.files import export_model, load_exported
from retrieval.model.network import build_model, maybe_compile
from retrieval.train.optim import param_groups

TINY = tiny_model()["kwargs"]  # configs/tiny.yaml's SwinV2 settings
NAME = tiny_model()["name"]
FEATURES = 24 * 8  # pooled width of the 4-stage tiny SwinV2


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig(name=NAME, kwargs=dict(TINY)), **changes)


def images(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_swinv2_raw_features_normalised() -> None:
    model = build_model(tiny())
    assert isinstance(model.head, nn.Identity) and model.embed_dim == FEATURES
    out = model(images())
    assert out.shape == (3, FEATURES)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.data_config["input_size"] == (3, 64, 64)  # the size built, not timm's pretrained 256
    assert {"interpolation", "mean", "std", "crop_pct"} <= model.data_config.keys()


def test_projection_head_and_no_normalisation() -> None:
    model = build_model(tiny(embed_dim=16, normalize=False))
    assert isinstance(model.head, nn.Linear) and model.head.in_features == FEATURES and model.embed_dim == 16
    out = model(images())
    assert out.shape == (3, 16) and not torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-3)


def test_training_options_build_and_backprop() -> None:
    model = build_model(tiny(embed_dim=8, grad_checkpointing=True, channels_last=True, drop_path_rate=0.1))
    assert maybe_compile(model, tiny()) is model  # compile=False leaves it alone
    model(images(2)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_names_and_kwargs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean"):
        build_model(tiny(name="swinv2_tiny_window8_265"))
    with pytest.raises(ConfigError, match="model.kwargs.num_classes"):
        build_model(tiny(kwargs={**TINY, "num_classes": 5}))
    with pytest.raises(ConfigError, match="model.kwargs"):
        build_model(tiny(kwargs={**TINY, "not_a_timm_kwarg": 1}))


# ---------------------------------------------------------------------------------------------
# export / load_exported


class _Wrapper(nn.Module):  # stands in for DDP / DeepSpeed's `.module`
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_export_round_trip_from_run_dir_folder_and_file(tmp_path: Path) -> None:
    cfg = tiny(embed_dim=16, pretrained=True, pretrained_file="/nowhere/w.safetensors")
    model = build_model(tiny(embed_dim=16)).eval()
    weights = export_model(_Wrapper(model), cfg, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.safetensors", "model.yaml"]  # no temps
    saved = yaml.safe_load((tmp_path / "run" / "model.yaml").read_text())
    assert saved["pretrained"] is False and saved["pretrained_file"] is None and saved["embed_dim"] == 16
    tensors = load_file(str(weights))
    assert tensors.keys() == model.state_dict().keys()  # no "module." prefix
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
    x = images()
    with torch.no_grad():
        expected = model(x)
        for where in (tmp_path / "run", str(weights)):
            loaded, loaded_cfg = load_exported(where)
            assert not loaded.training and loaded_cfg.embed_dim == 16 and loaded_cfg.pretrained_file is None
            assert torch.equal(loaded(x), expected)


def test_export_given_state_dict_strips_wrapper_prefixes(tmp_path: Path) -> None:
    """accelerate.get_state_dict / compiled DDP models name keys `_orig_mod.module.…`; the export must not."""
    model = build_model(tiny(embed_dim=8)).eval()
    wrapped = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}
    export_model(model, tiny(embed_dim=8), tmp_path, state_dict=wrapped)
    loaded, _ = load_exported(tmp_path / "model.safetensors")
    assert same_weights(loaded, model)


def test_load_exported_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_exported(tmp_path / "missing")
    with pytest.raises(UserError, match="holds no model.safetensors"):
        load_exported(tmp_path)
    export_model(build_model(tiny(embed_dim=8)), tiny(embed_dim=8), tmp_path / "a")
    (tmp_path / "a" / "model.yaml").write_text(yaml.safe_dump(to_dict(tiny(embed_dim=4))))
    with pytest.raises(UserError, match="head.weight: expected"):
        load_exported(tmp_path / "a")
    (tmp_path / "a" / "model.yaml").unlink()
    with pytest.raises(UserError, match="model.yaml.*is missing"):
        load_exported(tmp_path / "a" / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# local pretrained files (offline)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file_loads_offline(tmp_path: Path, offline: None, suffix: str) -> None:
    source = build_model(tiny()).backbone
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = build_model(tiny(pretrained_file=str(path), embed_dim=8))
    assert same_weights(loaded.backbone, source)


def test_pretrained_file_with_classifier_head(tmp_path: Path, offline: None) -> None:
    full = timm.create_model(NAME, pretrained=False, num_classes=10, **TINY)  # holds head.fc.weight/bias
    save_file(full.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = build_model(tiny(pretrained_file=str(tmp_path / "w.safetensors"))).backbone
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_pretrained_file_at_another_img_and_window_size(tmp_path: Path, offline: None) -> None:
    """SwinV2's continuous position bias (cpb_mlp) has no size-dependent weights: 64 px/window 4 -> 128/8."""
    source = build_model(tiny()).backbone
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    cfg = tiny(kwargs={**TINY, "img_size": 128, "window_size": 8}, pretrained_file=str(tmp_path / "w.safetensors"))
    model = build_model(cfg)
    assert same_weights(model.backbone, source)
    assert model.data_config["input_size"] == (3, 128, 128)
    assert model(images(1, size=128)).shape == (1, FEATURES)


def test_pretrained_file_of_another_architecture_names_keys(tmp_path: Path, offline: None) -> None:
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError) as err:
        build_model(tiny(pretrained_file=str(tmp_path / "other.safetensors")))
    msg = str(err.value)
    assert "other.safetensors" in msg and NAME in msg
    assert "missing (expected but not found: patch_embed.proj.weight" in msg
    assert "7 unexpected (found but not expected: " in msg and "0.weight" in msg
    assert "expected 83 keys, found 7" in msg


def test_pretrained_file_with_other_shapes_names_them(tmp_path: Path, offline: None) -> None:
    wider = build_model(tiny(kwargs={**TINY, "embed_dim": 32})).backbone
    save_file(wider.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(
        UserError,
        match=r"with another shape \(patch_embed.proj.weight: expected \(24, 3, 4, 4\), "
        r"found \(32, 3, 4, 4\)",
    ):
        build_model(tiny(pretrained_file=str(tmp_path / "wide.safetensors")))


def test_pretrained_file_missing_or_unreadable(tmp_path: Path, offline: None) -> None:
    with pytest.raises(UserError, match="nope.safetensors' does not exist"):
        build_model(tiny(pretrained_file=str(tmp_path / "nope.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        build_model(tiny(pretrained_file=str(tmp_path / "junk.safetensors")))


# ---------------------------------------------------------------------------------------------
# optimizer groups


def test_param_groups_split_lr_and_decay() -> None:
    model = build_model(tiny(embed_dim=8))
    groups = param_groups(model, lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(names[id(p)].startswith("head.") for p in by_name["head_decay"]["params"])
    assert not any(n.endswith(".bias") or "norm" in n or "logit_scale" in n or "cpb_mlp" in n for n in decayed)
    assert "backbone.layers.0.blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    assert {g["lr"] for g in groups if g["name"].startswith("head")} == {1e-3}
    assert {g["lr"] for g in groups if g["name"].startswith("backbone")} == {1e-4}
    torch.optim.AdamW(groups)  # accepted as is


def test_param_groups_without_head() -> None:
    groups = param_groups(build_model(tiny()), lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)
    assert {g["name"] for g in groups} == {"backbone_decay", "backbone_no_decay"}


def test_pretrained_file_resamples_vit_position_embedding(tmp_path: Path, offline: None) -> None:
    """Absolute position tables are resampled by timm's checkpoint filter (here 4x4 -> 8x8 patches)."""
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    cfg = ModelConfig(
        name="vit_tiny_patch16_224",
        kwargs={**kwargs, "img_size": 64},
        pretrained_file=str(tmp_path / "vit.safetensors"),
    )
    model = build_model(cfg)
    assert model.backbone.pos_embed.shape == (1, 1 + 8 * 8, 24)
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model(images(1, size=64)).shape == (1, 24)
