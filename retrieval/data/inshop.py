"""In-Shop Clothes Retrieval (DeepFashion): its ``list_eval_partition.txt`` read directly.

    cat = load_inshop("In-shop Clothes Retrieval Benchmark", val_classes=0.2, seed=0)   # train / val / query / gallery

The list file (in the root or its ``Eval/`` folder) reads::

    52712
    image_name item_id evaluation_status
    img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train

Image paths are relative to the root or its ``Img/`` folder (whichever holds them). ``item_id`` ``id_00000002`` is
class 2; the category folder (``WOMEN/Dresses``) is the super class (sorted names -> 1..n); ``image_id`` is the
row's position in the list (1-based). The protocol: query images search the gallery; both hold the same items,
none of which is in train. ``val`` holds out ``val_classes`` of the train items, as for the other sources.
"""

from __future__ import annotations

import re
from pathlib import Path

from retrieval.data.sop import INSHOP_SPLITS, Catalogue, Record, _check_on_missing, _drop_missing, split_train_val
from retrieval.errors import UserError

LIST_FILE = "list_eval_partition.txt"
STATUSES = ("train", "query", "gallery")
_ITEM = re.compile(r"id_0*(\d+)")


def find_list(root: Path) -> Path:
    for candidate in (root / LIST_FILE, root / "Eval" / LIST_FILE):
        if candidate.is_file():
            return candidate
    raise UserError(f"{root}: no {LIST_FILE} (looked in {root} and {root / 'Eval'}); is this the In-Shop root?")


def _parse_row(fields: list[str], where: str) -> tuple[str, int, str]:
    if len(fields) != 3:
        raise UserError(f"{where}: expected 3 fields (image_name item_id evaluation_status), got {len(fields)}")
    path, item, status = fields
    m = _ITEM.fullmatch(item)
    if not m:
        raise UserError(f"{where}: item_id must look like id_00000002, got {item!r}")
    if status not in STATUSES:
        raise UserError(f"{where}: evaluation_status must be one of {', '.join(STATUSES)}, got {status!r}")
    if path.startswith("/") or ".." in Path(path).parts:
        raise UserError(f"{where}: image_name must be relative to the dataset root, got {path!r}")
    return path, int(m.group(1)), status


def read_inshop_list(txt: Path) -> dict[str, list[Record]]:
    """``{"train", "query", "gallery"}`` records of the list file, every line checked."""
    lines = txt.read_text(encoding="utf-8").splitlines()
    if len(lines) < 2 or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise UserError(f"{txt}:2: expected the header 'image_name item_id evaluation_status'")
    rows = [(_parse_row(line.split(), f"{txt}:{n}"), n) for n, line in enumerate(lines[2:], start=3) if line.strip()]
    if lines[0].strip().isdigit() and int(lines[0]) != len(rows):
        raise UserError(f"{txt}:1: announces {lines[0].strip()} images, the file lists {len(rows)}")
    categories = sorted({str(Path(path).parent.parent) for (path, _, _), _ in rows})
    super_of = {c: i for i, c in enumerate(categories, start=1)}
    out: dict[str, list[Record]] = {s: [] for s in STATUSES}
    for image_id, ((path, item, status), _) in enumerate(rows, start=1):
        out[status].append(Record(image_id, item, super_of[str(Path(path).parent.parent)], path))
    leaked = {r.class_id for r in out["train"]} & {r.class_id for s in ("query", "gallery") for r in out[s]}
    if leaked:
        raise UserError(f"{txt}: {len(leaked)} item(s) are in train and in query/gallery, e.g. {sorted(leaked)[:5]}")
    return out


def _image_root(root: Path, records: list[Record]) -> Path:
    probe = records[0].path if records else ""
    for candidate in (root, root / "Img"):
        if (candidate / probe).is_file():
            return candidate
    return root


def load_inshop(
    root: str | Path, val_classes: int | float = 0.2, seed: int = 0, on_missing: str = "error"
) -> Catalogue:
    """In-Shop split train / val / query / gallery (module docstring); missing images as for the other sources."""
    _check_on_missing(on_missing)
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected the In-Shop Clothes Retrieval root)")
    txt = find_list(root)
    parsed = read_inshop_list(txt)
    images = _image_root(root, [r for s in STATUSES for r in parsed[s]])
    train, val = split_train_val(parsed["train"], val_classes, seed)
    listed = {"train": train, "val": val, "query": parsed["query"], "gallery": parsed["gallery"]}
    splits, skipped = {}, {}
    for split in INSHOP_SPLITS:
        splits[split], skipped[split] = _drop_missing(listed[split], images, txt.name, on_missing)
    return Catalogue(images, splits, skipped, {"kind": "inshop", "path": str(root)})
