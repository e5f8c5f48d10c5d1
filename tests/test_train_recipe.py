"""Recipes that learn more per image: layer-wise lr decay, weight EMA, timm's train augmentations (units).

The EMA through the trainer (bitwise resume, ZeRO-2 export) is in test_train.py and test_train_dist.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import _shardkit as sk
import numpy as np
import pytest
import torch
from conftest import TINY
from torchvision import transforms as T

from retrieval.config.io import load_config
from retrieval.config.schema import ConfigError, DataConfig
from retrieval.data import loader as L
from retrieval.data import transforms as tfm
from retrieval.data.decode import decode_image
from retrieval.data.input_spec import InputSpec
from retrieval.model.network import initial_model
from retrieval.train.optim import lr_lambda, param_groups, seek_schedule

REPO = Path(__file__).resolve().parents[1]
SPEC = InputSpec(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.875)
RECIPE = {"rand_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.5}

# ----------------------------------------------------------------------------------------- layer-wise lr decay


@pytest.fixture(scope="module")
def tiny_model():
    return initial_model(load_config(TINY))


def _by_param(groups: list[dict]) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_layer_decay_off_is_todays_groups(tiny_model):
    today = param_groups(tiny_model, 1e-3, 1e-4, 0.05)
    assert [g["name"] for g in today] == ["backbone_no_decay", "backbone_decay", "head_no_decay", "head_decay"]
    for off in (None, 1.0):
        groups = param_groups(tiny_model, 1e-3, 1e-4, 0.05, layer_decay=off)
        assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
            (g["name"], g["lr"], g["weight_decay"]) for g in today
        ]
        assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in today]


def test_layer_decay_scales_each_swinv2_layer(tiny_model):
    """Tiny SwinV2 (4 stages of 1 block): stem, 4 blocks (a stage's downsample goes with its block, the final norm with
    the last block). The last layer keeps backbone_lr, each earlier one x0.5; the head keeps lr; weight decay
    exactly as without decay."""
    lr, backbone_lr, decay = 1e-3, 1e-4, 0.5
    groups = param_groups(tiny_model, lr, backbone_lr, 0.05, layer_decay=decay)
    got = _by_param(groups)
    named = dict(tiny_model.named_parameters())
    assert set(got) == {id(p) for p in named.values()}, "every parameter in exactly one group"
    assert sum(len(g["params"]) for g in groups) == len(named)
    depth = {"patch_embed": 4, "layers.0": 3, "layers.1": 2, "layers.2": 1, "layers.3": 0, "norm": 0}
    for name, p in named.items():
        if name.startswith("head."):
            assert got[id(p)][0] == lr, name
            continue
        inner = name.removeprefix("backbone.")
        k = next(v for prefix, v in depth.items() if inner.startswith(prefix + "."))
        assert got[id(p)][0] == pytest.approx(backbone_lr * decay**k), name
    plain = _by_param(param_groups(tiny_model, lr, backbone_lr, 0.05))
    assert {k: wd for k, (_, wd) in got.items()} == {k: wd for k, (_, wd) in plain.items()}
    assert groups[0]["lr"] == backbone_lr, "group 0 (the logged lr) is still backbone_lr"
    assert len({g["name"] for g in groups}) == len(groups)


def test_the_schedule_scales_every_layer_group(tiny_model):
    """LambdaLR multiplies each group's own initial lr, so the decay ratios hold along warmup + cosine, also after
    an elastic resume's seek."""
    groups = param_groups(tiny_model, 1e-3, 1e-4, 0.05, layer_decay=0.75)
    initial = [g["lr"] for g in groups]
    f = lr_lambda(20, 5, 0.01)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, f)
    for step in range(1, 13):
        optimizer.step()  # no gradients: moves nothing, keeps torch's order check quiet
        scheduler.step()
        assert scheduler.get_last_lr() == pytest.approx([lr * f(step) for lr in initial], rel=1e-12)
    other = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.AdamW(param_groups(tiny_model, 1e-3, 1e-4, 0.05, layer_decay=0.75)), f
    )
    seek_schedule(other, 12)
    assert [g["lr"] for g in other.optimizer.param_groups] == pytest.approx(scheduler.get_last_lr(), rel=1e-12)


def test_recipe_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        load_config(TINY, ["optim.layer_decay=1.5"])
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(TINY, ["train.ema_decay=1"])
    with pytest.raises(ConfigError, match="data.rand_augment"):
        load_config(TINY, ["data.rand_augment=rand-x9"])
    with pytest.raises(ConfigError, match="data.rand_augment"):
        load_config(TINY, ["data.rand_augment=v0"])
    with pytest.raises(ConfigError, match="data.random_erasing"):
        load_config(TINY, ["data.random_erasing=2"])
    with pytest.raises(ConfigError, match="data.random_erasing_mode"):
        load_config(TINY, ["data.random_erasing_mode=zeros"])


# ----------------------------------------------------------------------------------------- augmentations


def _image():
    return decode_image(sk.jpeg_bytes(3, size=96))


def test_augmentations_off_is_todays_transform():
    """The plain path, step by step as before the recipe options existed: the same tensor for the same seed."""
    data = DataConfig(scale=(0.5, 1.0), color_jitter=0.2)
    today = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(0.5),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            T.ToTensor(),
            T.Normalize(mean=list(SPEC.mean), std=list(SPEC.std)),
        ]
    )
    img = _image()
    for seed in range(4):
        torch.manual_seed(seed)
        a = tfm.train_transform(SPEC, data)(img)
        torch.manual_seed(seed)
        assert torch.equal(a, today(img))


def test_rand_augment_and_erasing_give_other_valid_tensors():
    img = _image()
    plain, recipe = DataConfig(), DataConfig(**RECIPE)
    outs = []
    for seed in range(6):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        a = tfm.train_transform(SPEC, plain)(img)
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        b = tfm.train_transform(SPEC, recipe)(img)
        assert b.shape == a.shape == (3, 32, 32) and b.dtype == torch.float32 and torch.isfinite(b).all()
        outs.append(b)
        assert not torch.equal(a, b)
    assert len({x.sum().item() for x in outs}) == len(outs), "random per call"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("recipe-shards")
    sk.write_split(d, "train", [[(c, 4) for c in range(s * 6, s * 6 + 6)] for s in range(3)])
    return d


def _batches(d: Path, workers: int, start: int = 0, **data) -> list[torch.Tensor]:
    cfg = DataConfig(classes_per_batch=3, images_per_class=2, class_pool=6, num_workers=workers, seed=3, **data)
    return [b["image"] for b in L.train_loader(d, cfg, SPEC, L.EpochSpan(0, 4, start), L.Reader(0, 1))]


def test_recipe_batches_are_seeded_per_batch_and_leave_host_rngs_alone(shards):
    """RandAugment and timm's crop draw from Python's random and NumPy: the same (seed, epoch, rank, step) gives the
    same batch in-process, in a worker and on a resume, and the trainer's generators are left as they were."""
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = [random.random(), np.random.rand(), torch.rand(1).item()]
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    inproc = _batches(shards, 0, **RECIPE)
    assert [random.random(), np.random.rand(), torch.rand(1).item()] == expected
    worker = _batches(shards, 1, **RECIPE)
    tail = _batches(shards, 0, start=2, **RECIPE)
    assert all(torch.equal(a, b) for a, b in zip(inproc, worker, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(inproc[2:], tail, strict=True))
    plain = _batches(shards, 0)
    assert not any(torch.equal(a, b) for a, b in zip(inproc, plain, strict=True))


# ----------------------------------------------------------------------------------------- AdamW's kernels


def test_adamw_kernels_auto_is_fused_and_foreach_gives_the_for_loops_numbers():
    """`optim.implementation=auto` takes torch's fused AdamW (CPU too: 0.95 ms a step on the demo model against
    2.95 foreach and 3.27 for torch's CPU default, a Python loop over the tensors); it trains to within rounding of
    that loop, and foreach to bitwise its weights."""
    from retrieval.train.optim import build_optimizer

    cfg = load_config(TINY)
    weights = {}
    for impl in ("auto", "for_loop", "foreach"):
        torch.manual_seed(0)
        model = initial_model(cfg)
        optim_cfg = load_config(TINY, [f"optim.implementation={impl}"]).optim
        optimizer, schedule = build_optimizer(model, [], optim_cfg, 10)
        expected = {"auto": {"fused": True}, "for_loop": {"foreach": False}, "foreach": {"foreach": True}}[impl]
        assert all(optimizer.defaults[k] == v for k, v in expected.items()), optimizer.defaults
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
            schedule.step()
        weights[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(weights["foreach"], weights["for_loop"])
    assert torch.allclose(weights["auto"], weights["for_loop"], atol=1e-6)
    with pytest.raises(ConfigError, match="optim.implementation"):
        load_config(TINY, ["optim.implementation=fast"])
