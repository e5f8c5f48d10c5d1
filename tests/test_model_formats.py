"""`retrieval export`: the timm folder loads in plain timm and the ONNX file in onnxruntime, both giving our
embeddings to 1e-5; config.json is timm's hub format with our input spec; NaN weights are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _api_fixture import export_tiny
from PIL import Image
from safetensors.torch import load_file, save_file

from retrieval.cli import main
from retrieval.model.files import load_exported, read_input_spec


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("export") / "model")


def _ours(model_dir: Path, x: torch.Tensor, normalized: bool) -> np.ndarray:
    model = load_exported(model_dir)[0]
    with torch.no_grad():
        return (model(x) if normalized else model.head(model.backbone(x))).numpy()


def test_timm_folder_loads_in_plain_timm(exported: Path, tmp_path: Path) -> None:
    import timm

    out = tmp_path / "timm"
    assert main(["export", str(exported), "--format", "timm", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    spec = read_input_spec(exported / "model.safetensors")
    assert config["architecture"] == "swinv2_tiny_window8_256" and config["num_classes"] == 64
    assert config["num_features"] == 192 and config["model_args"]["window_size"] == 4
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, spec.size, spec.size] and pcfg["mean"] == list(spec.mean)
    assert pcfg["std"] == list(spec.std) and pcfg["crop_pct"] == spec.crop_pct
    assert pcfg["interpolation"] == spec.interpolation and pcfg["classifier"] == "head.fc"
    assert config["retrieval"] == {"normalize": True, "embed_dim": 64}

    x = torch.randn(3, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    expected = _ours(exported, x, normalized=False)  # timm has no L2 normalisation: the projection's output
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    overlay = timm.create_model(
        config["architecture"],
        pretrained=True,
        num_classes=64,
        pretrained_cfg_overlay={"file": str(out / "model.safetensors"), "num_classes": 64},  # else timm drops head.fc
        **{k: v for k, v in config["model_args"].items() if k != "num_classes"},
    ).eval()
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(overlay(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert timm.data.resolve_data_config(model=net)["input_size"] == (3, spec.size, spec.size)

    # and back: our Python API takes the timm folder, prepares images the same way, normalises as config.json says
    from retrieval import Embedder

    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    pil = [Image.fromarray((255 * im.permute(1, 2, 0).numpy()).astype(np.uint8)) for im in images]
    back, ours = Embedder.load(out), Embedder.load(exported)
    assert back.spec == ours.spec
    np.testing.assert_allclose(back.embed(pil), ours.embed(pil), rtol=1e-5, atol=1e-5)


def test_onnx_matches_pytorch_at_any_batch(exported: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert main(["export", str(exported), "--format", "onnx", "--out", str(out)]) == 0
    assert read_input_spec(out / "model.onnx") == read_input_spec(exported / "model.safetensors")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (1, 5):  # exported with a batch of 2: the batch axis is dynamic
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        got = session.run(["embeddings"], {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, _ours(exported, x, normalized=True), rtol=1e-5, atol=1e-5)


def test_nan_weights_are_refused(exported: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.yaml", "input.json"):
        (broken / name).write_text((exported / name).read_text())
    state = load_file(str(exported / "model.safetensors"))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(broken / "model.safetensors"))
    for fmt in ("timm", "onnx"):
        assert main(["export", str(broken), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        err = capsys.readouterr().err
        assert "weight 'head.weight' holds NaN or inf" in err and "model.safetensors" in err
        assert not list((tmp_path / fmt).glob("*")) if (tmp_path / fmt).exists() else True


def test_every_command_takes_a_timm_export_folder(exported: Path, synth_shards: Path, tmp_path: Path) -> None:
    """One loader: `retrieval embed --model` takes the timm folder too, and embeds what our own export embeds."""
    from conftest import embed_args

    from retrieval.embed.embeddings import EmbeddingSet

    out = tmp_path / "timm"
    assert main(["export", str(exported), "--format", "timm", "--out", str(out)]) == 0
    for name, model in (("ours", exported), ("timm", out)):
        argv = embed_args(model, synth_shards, tmp_path / f"emb-{name}", "--num-workers", "0", split="val")
        assert main(argv) == 0
    ours, timm_ = EmbeddingSet.load(tmp_path / "emb-ours"), EmbeddingSet.load(tmp_path / "emb-timm")
    assert np.array_equal(ours.ids, timm_.ids) and len(ours) > 10
    np.testing.assert_allclose(timm_.vectors32(), ours.vectors32(), rtol=1e-5, atol=1e-5)
    assert timm_.meta["format"] == "timm" and timm_.meta["model_sha256"] == _sha256(out / "model.safetensors")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
