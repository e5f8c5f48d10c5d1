"""Catalogue readers: the official SOP lists, manifests, image folders, class-disjoint splits."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from retrieval.data.sop import (
    Record,
    load_catalogue,
    read_image_folder,
    read_manifest,
    read_sop,
    read_sop_file,
    split_train_val,
)
from retrieval.errors import UserError

HEADER = "image_id class_id super_class_id path\n"


def _sop(root: Path, train: list[str], test: list[str], make_files: bool = True) -> Path:
    """A hand-written SOP tree; each row is 'image_id class_id super_class_id path'."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        (root / name).write_text(HEADER + "".join(r + "\n" for r in rows))
        for r in rows if make_files else []:
            parts = r.split()
            if len(parts) == 4:
                (root / parts[3]).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8)).save(root / parts[3])
    return root


GOOD_TRAIN = [
    "1 1 1 bicycle_final/1_0.JPG",
    "2 1 1 bicycle_final/1_1.JPG",
    "3 2 2 cabinet_final/2_0.JPG",
    "4 2 2 cabinet_final/2_1.JPG",
]
GOOD_TEST = ["1 3 1 bicycle_final/3_0.JPG", "2 3 1 bicycle_final/3_1.JPG"]


def test_read_sop_good(tmp_path):
    train, test, skipped = read_sop(_sop(tmp_path / "sop", GOOD_TRAIN, GOOD_TEST))
    assert train[0] == Record(1, 1, 1, "bicycle_final/1_0.JPG")
    assert [r.class_id for r in train] == [1, 1, 2, 2] and [r.class_id for r in test] == [3, 3]
    assert skipped == []


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (["1 1 1"], "Ebay_train.txt:2: expected 4 space-separated fields"),
        (["1 1 1 a.JPG extra"], "Ebay_train.txt:2: expected 4"),
        (["1 x 1 a.JPG"], "Ebay_train.txt:2: class_id must be an integer, got 'x'"),
        (["0 1 1 a.JPG"], "Ebay_train.txt:2: image_id must be >= 1"),
        (GOOD_TRAIN[:2] + ["2 2 2 cabinet_final/2_0.JPG"], "Ebay_train.txt:4: duplicate image_id 2 (first on line 3)"),
        (["1 1 1 a.JPG", "2 1 2 b.JPG"], "Ebay_train.txt:3: class_id 1 has super_class_id 2"),
        (["1 1 1 /etc/passwd"], "Ebay_train.txt:2: path must be relative"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, train, message):
    root = _sop(tmp_path / "sop", train, GOOD_TEST, make_files=False)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_sop(root)


def test_unknown_header(tmp_path):
    root = _sop(tmp_path / "sop", GOOD_TRAIN, GOOD_TEST)
    (root / "Ebay_test.txt").write_text("id class super path\n1 3 1 bicycle_final/3_0.JPG\n")
    with pytest.raises(UserError, match=r"Ebay_test.txt:1: expected the header 'image_id class_id super_class_id"):
        read_sop(root)
    with pytest.raises(UserError, match="Ebay_train.txt: not found"):
        read_sop_file(tmp_path / "Ebay_train.txt")


def test_class_overlap_is_an_error(tmp_path):
    root = _sop(tmp_path / "sop", GOOD_TRAIN, ["1 2 2 cabinet_final/9_0.JPG"])
    with pytest.raises(UserError, match=r"1 class id\(s\) appear in both Ebay_train.txt and Ebay_test.txt \(2\)"):
        read_sop(root)


def test_missing_file_error_or_counted_skip(tmp_path):
    root = _sop(tmp_path / "sop", GOOD_TRAIN, GOOD_TEST)
    (root / "cabinet_final/2_1.JPG").unlink()
    with pytest.raises(UserError, match=r"cabinet_final/2_1.JPG: image file not found \(listed in Ebay_train.txt"):
        read_sop(root)
    train, test, skipped = read_sop(root, on_missing="skip")
    assert len(train) == 3 and len(test) == 2
    assert skipped == [
        {"path": "cabinet_final/2_1.JPG", "reason": "missing file (listed in Ebay_train.txt)", "split": "train"}
    ]
    with pytest.raises(UserError, match="on_missing"):
        read_sop(root, on_missing="ignore")


def _records(n_classes: int, per_class: int = 3) -> list[Record]:
    return [Record(c * per_class + i + 1, c + 1, 0, f"{c}/{i}.jpg") for c in range(n_classes) for i in range(per_class)]


def test_split_train_val_class_disjoint_and_deterministic():
    records = _records(20)
    train, val = split_train_val(records, 0.25, seed=3)
    assert len({r.class_id for r in val}) == 5 and len({r.class_id for r in train}) == 15
    assert not {r.class_id for r in val} & {r.class_id for r in train}
    assert sorted(train + val, key=lambda r: r.image_id) == records
    assert split_train_val(records, 5, seed=3) == (train, val)  # count == fraction here, same classes
    assert split_train_val(records, 5, seed=4)[1] != val
    assert split_train_val(records, 0, seed=3) == (records, [])
    with pytest.raises(UserError, match="val_classes: 20 classes requested but only 20"):
        split_train_val(records, 20, seed=0)
    with pytest.raises(UserError, match="fraction must be in"):
        split_train_val(records, 1.5, seed=0)


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 6), (200, 10, 10)).save(path)


def test_manifest_csv_with_header_and_string_labels(tmp_path):
    for name in ("a/1.jpg", "a/2.jpg", "b/1.png", "b/2.png"):
        _image(tmp_path / name)
    (tmp_path / "m.csv").write_text("path,label,group\na/1.jpg,shoe,x\na/2.jpg,shoe,x\nb/1.png,bag,y\nb/2.png,bag,y\n")
    records, skipped = read_manifest(tmp_path / "m.csv")
    # string labels map to 1..n in sorted order: bag=1, shoe=2; groups x=1, y=2
    assert records == [
        Record(1, 2, 1, "a/1.jpg"),
        Record(2, 2, 1, "a/2.jpg"),
        Record(3, 1, 2, "b/1.png"),
        Record(4, 1, 2, "b/2.png"),
    ]
    assert skipped == []


def test_manifest_tsv_without_header_integer_labels_and_errors(tmp_path):
    _image(tmp_path / "x.jpg")
    (tmp_path / "m.tsv").write_text("x.jpg\t7\nmissing.jpg\t9\n")
    records, skipped = read_manifest(tmp_path / "m.tsv", on_missing="skip")
    assert records == [Record(1, 7, 0, "x.jpg")] and skipped[0]["path"] == "missing.jpg"
    with pytest.raises(UserError, match="missing.jpg: image file not found"):
        read_manifest(tmp_path / "m.tsv")
    (tmp_path / "bad.csv").write_text("path,label\nx.jpg,1\nx.jpg\n")
    with pytest.raises(UserError, match=r"bad.csv:3: expected path,label\[,group\]"):
        read_manifest(tmp_path / "bad.csv")


def test_image_folder_and_catalogue_split(tmp_path):
    for c in range(6):
        for i in range(3):
            _image(tmp_path / "tree" / f"class{c}" / f"{i}.jpg")
    (tmp_path / "tree" / "class0" / "notes.txt").write_text("not an image")
    records = read_image_folder(tmp_path / "tree")
    assert len(records) == 18 and records[0] == Record(1, 1, 0, "class0/0.jpg")
    cat = load_catalogue(image_folder=tmp_path / "tree", val_classes=1, test_classes=0.5, seed=0)
    classes = {s: {r.class_id for r in recs} for s, recs in cat.splits.items()}
    assert [len(classes[s]) for s in ("train", "val", "test")] == [2, 1, 3]
    assert not (classes["train"] & classes["test"]) and not (classes["val"] & classes["test"])
    with pytest.raises(UserError, match="exactly one of"):
        load_catalogue(image_folder=tmp_path / "tree", manifest=tmp_path / "m.csv")
