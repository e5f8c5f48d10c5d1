"""``retrieval synth-sop``: the exact SOP layout, determinism, and that retrieval on it needs learning."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model, tiny_timm_kwargs
from PIL import Image

from retrieval.cli import main
from retrieval.data.sop import read_sop
from retrieval.data.synth import SUPER_CLASSES, parse_images_per_class, synth_sop
from retrieval.errors import UserError

ORDER = [
    "bicycle",
    "cabinet",
    "chair",
    "coffee_maker",
    "fan",
    "kettle",
    "lamp",
    "mug",
    "sofa",
    "stapler",
    "table",
    "toaster",
]


def plain_read(txt: Path) -> list[tuple[int, int, int, str]]:
    """An independent reader of the official format: the exact header, then 4 space-separated columns."""
    lines = txt.read_text().split("\n")
    assert lines[0] == "image_id class_id super_class_id path" and lines[-1] == ""
    rows = []
    for line in lines[1:-1]:
        a, b, c, d = line.split(" ")
        rows.append((int(a), int(b), int(c), d))
    return rows


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "sop"
    assert (
        main(["synth-sop", str(root), "--classes", "30", "--images-per-class", "2-5", "--seed", "7", "--size", "48"])
        == 0
    )
    return root


def test_layout_is_official_sop(synth):
    assert list(SUPER_CLASSES) == ORDER
    assert sorted(p.name for p in synth.iterdir() if p.is_dir()) == sorted(f"{n}_final" for n in ORDER)
    train, test = plain_read(synth / "Ebay_train.txt"), plain_read(synth / "Ebay_test.txt")
    info = plain_read(synth / "Ebay_info.txt")
    train_classes, test_classes = sorted({r[1] for r in train}), sorted({r[1] for r in test})
    assert train_classes == list(range(1, 16)) and test_classes == list(range(16, 31))  # test ids follow train
    assert [r[0] for r in train] == list(range(1, len(train) + 1))
    assert [r[0] for r in test] == list(range(1, len(test) + 1))
    assert [r[1:] for r in info] == [r[1:] for r in train + test]
    assert {r[2] for r in train} == set(range(1, 13)) and {r[2] for r in test} == set(range(1, 13))
    for _, _, super_id, path in train + test:
        assert re.fullmatch(rf"{ORDER[super_id - 1]}_final/\d{{12}}_\d+\.JPG", path), path
        assert (synth / path).is_file()
    for rows in (train, test):
        per_class = {}
        for _, c, s, path in rows:
            per_class.setdefault(c, set()).add((s, path.split("/")[1].split("_")[0]))
        assert all(len(v) == 1 for v in per_class.values())  # one product id and super class per class
        assert all(2 <= sum(r[1] == c for r in rows) <= 5 for c in per_class)
    with Image.open(synth / train[0][3]) as im:
        assert im.format == "JPEG" and max(im.size) == 48


def test_parses_with_read_sop(synth):
    train, test, skipped = read_sop(synth)
    assert skipped == [] and len(train) == len(plain_read(synth / "Ebay_train.txt"))
    assert not {r.class_id for r in train} & {r.class_id for r in test}
    assert {r.super_class_id for r in train + test} == set(range(1, 13))


def test_deterministic_bytes_for_a_seed(synth, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth_sop(a, 30, (2, 5), seed=7, size=48, workers=2)
    assert tree_digest(a) == tree_digest(synth)  # same seed, 2 workers vs 1: identical files
    synth_sop(b, 30, (2, 5), seed=8, size=48)
    assert tree_digest(b) != tree_digest(a)


def test_arguments_and_refusals(tmp_path):
    assert parse_images_per_class("6") == (6, 6) and parse_images_per_class("2-12") == (2, 12)
    for bad in ("1", "5-3", "x"):
        with pytest.raises(UserError, match="--images-per-class"):
            parse_images_per_class(bad)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    assert main(["synth-sop", str(tmp_path / "busy"), "--classes", "4"]) == 2
    with pytest.raises(UserError, match="not a synth-sop output"):
        synth_sop(tmp_path / "busy", 4, (2, 2), force=True)
    synth_sop(tmp_path / "ok", 4, (2, 2), size=32)
    synth_sop(tmp_path / "ok", 4, (2, 2), size=32, force=True)  # replacing its own output is fine
    for bad in (0, 4):
        with pytest.raises(UserError, match="--train-classes: expected 1..3"):
            synth_sop(tmp_path / "ok", 4, (2, 2), size=32, force=True, train_classes=bad)


def test_train_classes_sets_the_split(tmp_path):
    """--train-classes N: the first N classes are train (ids 1..N), the rest test; both cover the super classes."""
    assert main(["synth-sop", str(tmp_path), "--classes", "40", "--train-classes", "28", "--size", "32"]) == 0
    train, test = plain_read(tmp_path / "Ebay_train.txt"), plain_read(tmp_path / "Ebay_test.txt")
    assert sorted({r[1] for r in train}) == list(range(1, 29)) and sorted({r[1] for r in test}) == list(range(29, 41))
    assert {r[2] for r in train} == set(range(1, 13)) and {r[2] for r in test} == set(range(1, 13))


def _test_pixels(root: Path, px: int) -> tuple[np.ndarray, np.ndarray]:
    rows = plain_read(root / "Ebay_test.txt")
    x = np.stack([np.asarray(Image.open(root / r[3]).convert("RGB").resize((px, px)), np.float32) / 255 for r in rows])
    return x, np.array([r[1] for r in rows])


def recall_at_1(feats: np.ndarray, labels: np.ndarray) -> float:
    f = feats.reshape(len(feats), -1).astype(np.float64)
    f = f - f.mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)  # the query itself is excluded by index
    return float((labels[sim.argmax(1)] == labels).mean())


@pytest.fixture(scope="module")
def hard_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hard") / "sop"
    synth_sop(root, 120, (4, 6), seed=0, size=64, workers=2)
    return root


def test_raw_pixels_do_not_solve_it(hard_set):
    x, labels = _test_pixels(hard_set, 32)
    r1 = recall_at_1(x, labels)
    assert 0 < r1 < 0.15, r1  # chance is ~4/300; measured 0.02-0.05


@pytest.mark.slow
def test_random_tiny_swinv2_does_not_solve_it(hard_set):
    import timm
    import torch

    x, labels = _test_pixels(hard_set, 64)
    torch.manual_seed(0)
    model = timm.create_model(
        tiny_model()["name"],
        **tiny_timm_kwargs(),
    ).eval()
    t = (torch.from_numpy(x).permute(0, 3, 1, 2) - 0.45) / 0.225
    with torch.no_grad():
        feats = model(t).numpy()
    assert recall_at_1(feats, labels) < 0.15
