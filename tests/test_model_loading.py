"""The one model loader takes a timm model name (zero-shot): its vectors are timm's own pooled features, L2-normalised,
to 1e-5, with local weights (``--pretrained-file``, offline) or timm's random initialisation; every ``--model`` taker
(embed, Embedder.load, Searcher, export) gets the form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import embed_args
from safetensors.torch import save_file

from retrieval.cli import main
from retrieval.embed.embedder import Embedder
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.model.loading import load_model
from retrieval.search.searcher import Searcher

NAME = "test_vit"  # one of timm's own test models: 0.3 M parameters, a real ViT


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A local weights file of the architecture, classifier included, as the hub holds them."""
    torch.manual_seed(123)
    net = timm.create_model(NAME, pretrained=False)
    path = tmp_path_factory.mktemp("w") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _timm_features(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return F.normalize(net.eval()(x), dim=-1).numpy()


def _images(size: int) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_pretrained_file_gives_timms_pooled_features(weights: Path) -> None:
    embedder = Embedder.load(NAME, pretrained_file=weights)
    ref = timm.create_model(NAME, num_classes=0, pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    x = _images(embedder.spec.size)
    got = embedder.embed(x)
    np.testing.assert_allclose(got, _timm_features(ref, x), atol=1e-5, rtol=1e-5)
    assert got.shape == (4, ref.num_features) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert embedder.loaded.provenance["model_sha256"]  # an index built on it refuses other weights


def test_untrained_timm_name_is_timms_own_initialisation() -> None:
    loaded = load_model(NAME, untrained=True)
    torch.manual_seed(0)
    ref = timm.create_model(NAME, num_classes=0, pretrained=False)
    x = _images(loaded.spec.size)
    with torch.no_grad():
        got = loaded.model(x).numpy()
    np.testing.assert_allclose(got, _timm_features(ref, x), atol=1e-5, rtol=1e-5)
    assert loaded.provenance["untrained"] and loaded.provenance["model_sha256"] is None


def test_timm_name_needs_its_weights_and_flags_need_a_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--pretrained"):
        load_model(NAME)
    with pytest.raises(UserError, match="not a timm model name"):
        load_model(tmp_path, pretrained=True)
    with pytest.raises(UserError, match="timm model name with --pretrained"):
        load_model(tmp_path / "no-such-run")


def test_embed_index_search_and_export_a_timm_name(weights: Path, synth_shards: Path, tmp_path: Path) -> None:
    """`retrieval embed --model NAME --pretrained-file W`, an index over it, a Searcher that reloads the same
    zero-shot model from the index's provenance, and `export --model NAME ...` back through the loader."""
    emb, index = tmp_path / "emb", tmp_path / "index"
    argv = embed_args(NAME, synth_shards, emb, "--pretrained-file", str(weights), "--workers", "0")
    assert main(argv) == 0
    es = EmbeddingSet.load(emb)
    assert es.meta["zero_shot"] and es.meta["pretrained_file"] == str(weights) and es.dim == 64
    assert main(["index", "build", "--embeddings", str(emb), "--out", str(index)]) == 0
    image = str(synth_shards.parent / "sop" / es.paths[0])
    hit = Searcher(index).search([image], k=1)[0]["results"][0]
    assert hit["image_id"] == int(es.ids[0]) and hit["score"] == pytest.approx(1.0, abs=1e-4)

    out = tmp_path / "timm"
    export = ["export", "--model", NAME, "--pretrained-file", str(weights), "--format", "timm", "--out", str(out)]
    assert main(export) == 0
    x = _images(224)
    a, b = load_model(out).model, load_model(NAME, pretrained_file=weights).model
    with torch.no_grad():
        np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), atol=1e-5)


def test_config_yaml_with_pretrained_file_is_its_architecture_zero_shot(tmp_path: Path) -> None:
    """`--model configs/x.yaml --pretrained-file W`: the config's architecture (model.kwargs, data.img_size) with
    those weights, no projection (the seed's "pretrained" row of the config the fine-tuned row trains)."""
    from conftest import TINY, tiny_model, tiny_timm_kwargs

    torch.manual_seed(7)
    net = timm.create_model(tiny_model()["name"], **tiny_timm_kwargs())
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    loaded = load_model(TINY, pretrained_file=weights)
    x = _images(loaded.spec.size)
    with torch.no_grad():
        got = loaded.model(x).numpy()
    np.testing.assert_allclose(got, _timm_features(net, x), atol=1e-5, rtol=1e-5)
    assert loaded.model.embed_dim == net.num_features != 64  # the config's embed_dim projection is not there
    assert loaded.spec.size == 64 and loaded.provenance["model"] == TINY
