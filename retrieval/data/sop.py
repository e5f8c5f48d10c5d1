"""Catalogue readers: Stanford Online Products, a CSV/TSV manifest, an ImageFolder tree.

Every reader yields :class:`Record` rows whose ``path`` is relative to the dataset root, and every
split is *class-disjoint* (the SOP protocol: test classes are never seen in training). Bad input is a
:class:`~retrieval.errors.UserError` naming the file and line; a missing image file is either an
error or a counted skip (``on_missing="skip"``), so a half-synced copy of a catalogue can still be
sharded while the user sees exactly what was left out.

    train, test, skipped = read_sop("Stanford_Online_Products")
    train, val = split_train_val(train, val_classes=0.2, seed=0)
    cat = load_catalogue(manifest="my.csv", val_classes=0.1, test_classes=0.5, seed=0)
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.errors import UserError

log = logging.getLogger(__name__)

SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")
SOP_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
SPLITS = ("train", "val", "test")  # SOP, manifests, image folders
INSHOP_SPLITS = ("train", "val", "query", "gallery")  # In-Shop: query images search the gallery
ALL_SPLITS = ("train", "val", "test", "query", "gallery")
EVAL_SPLITS = ("test", "query", "gallery")  # sharded in image_id order (train and val: whole classes)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
ON_MISSING = ("error", "skip")


@dataclass(frozen=True)
class Record:
    """One catalogue image. ``path`` is relative to the dataset root (or absolute for manifests that say so)."""

    image_id: int
    class_id: int
    super_class_id: int
    path: str


@dataclass
class Catalogue:
    """A catalogue split three ways, with the images that were left out (``{"path", "reason"}``) per split."""

    root: Path
    splits: dict[str, list[Record]]
    skipped: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- SOP


def _parse_int(text: str, what: str, where: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{where}: {what} must be an integer, got {text!r}") from None
    if value < minimum:
        raise UserError(f"{where}: {what} must be >= {minimum}, got {value}")
    return value


def read_text_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The lines of a UTF-8 list file; bytes that are not UTF-8 are one clear error naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode(encoding).splitlines()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); re-save the file as UTF-8"
        ) from None


def read_sop_file(txt: Path) -> list[Record]:
    """Parse one official list file (``Ebay_train.txt`` / ``Ebay_test.txt``), checking every line."""
    if not txt.is_file():
        raise UserError(f"{txt}: not found (expected the official SOP list file)")
    records: list[Record] = []
    seen_ids: dict[int, int] = {}
    class_super: dict[int, int] = {}
    lines = read_text_lines(txt)
    if not lines or tuple(lines[0].split()) != SOP_HEADER:
        got = lines[0] if lines else "<empty file>"
        raise UserError(f"{txt}:1: expected the header {' '.join(SOP_HEADER)!r}, got {got!r}")
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue  # blank (e.g. trailing) lines carry no record
        fields = line.split()
        where = f"{txt}:{lineno}"
        if len(fields) != 4:
            raise UserError(
                f"{where}: expected 4 space-separated fields ({' '.join(SOP_HEADER)}), got {len(fields)}: {line!r}"
            )
        image_id = _parse_int(fields[0], "image_id", where, 1)
        class_id = _parse_int(fields[1], "class_id", where, 1)
        super_id = _parse_int(fields[2], "super_class_id", where, 0)
        path = fields[3]
        if os.path.isabs(path) or ".." in Path(path).parts:
            raise UserError(f"{where}: path must be relative to the dataset root, got {path!r}")
        if image_id in seen_ids:
            raise UserError(f"{where}: duplicate image_id {image_id} (first on line {seen_ids[image_id]})")
        if class_super.setdefault(class_id, super_id) != super_id:
            raise UserError(
                f"{where}: class_id {class_id} has super_class_id {super_id}, "
                f"but {class_super[class_id]} on an earlier line"
            )
        seen_ids[image_id] = lineno
        records.append(Record(image_id, class_id, super_id, path))
    return records


def _drop_missing(
    records: list[Record], root: Path, listed_in: str, on_missing: str
) -> tuple[list[Record], list[dict[str, str]]]:
    """Keep the records whose image file exists; a missing one is an error or a counted skip."""
    kept, skipped = [], []
    for rec in records:
        if (root / rec.path).is_file():
            kept.append(rec)
        elif on_missing == "error":
            raise UserError(
                f"{root / rec.path}: image file not found (listed in {listed_in}, image_id "
                f"{rec.image_id}); pass --on-missing skip to leave missing files out"
            )
        else:
            skipped.append({"path": rec.path, "reason": f"missing file (listed in {listed_in})"})
    if skipped:
        log.warning("%d image(s) listed in %s are missing and were skipped", len(skipped), listed_in)
    return kept, skipped


def _check_on_missing(on_missing: str) -> None:
    if on_missing not in ON_MISSING:
        raise UserError(f"on_missing: expected one of {list(ON_MISSING)}, got {on_missing!r}")


def _parse_sop(root: Path) -> dict[str, list[Record]]:
    """Parse both list files of an SOP tree and check that train and test classes are disjoint."""
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected the Stanford_Online_Products root)")
    parsed = {split: read_sop_file(root / name) for split, name in SOP_FILES.items()}
    overlap = sorted({r.class_id for r in parsed["train"]} & {r.class_id for r in parsed["test"]})
    if overlap:
        shown = ", ".join(map(str, overlap[:10])) + (" ..." if len(overlap) > 10 else "")
        raise UserError(
            f"{root}: {len(overlap)} class id(s) appear in both {SOP_FILES['train']} and "
            f"{SOP_FILES['test']} ({shown}); SOP's train and test classes must be disjoint"
        )
    return parsed


def read_sop(root: str | Path, on_missing: str = "error") -> tuple[list[Record], list[Record], list[dict[str, str]]]:
    """Read an official SOP tree: ``(train_records, test_records, skipped)``.

    ``skipped`` lists the missing image files (``{"path", "reason", "split"}``) when
    ``on_missing="skip"``. Train and test must not share a class id (the protocol's premise).
    """
    _check_on_missing(on_missing)
    root = Path(root)
    out, skipped = {}, []
    for split, records in _parse_sop(root).items():
        out[split], missing = _drop_missing(records, root, SOP_FILES[split], on_missing)
        skipped += [{**s, "split": split} for s in missing]
    return out["train"], out["test"], skipped


# ------------------------------------------------------------------------------------------ splitting


def _count(n_classes: int, amount: int | float, name: str) -> int:
    """Turn a count or a fraction of classes into a count, leaving at least one class on the other side."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise UserError(f"{name}: expected a number of classes or a fraction in [0, 1), got {amount!r}")
    if isinstance(amount, float):
        if not 0 <= amount < 1:
            raise UserError(f"{name}: a fraction must be in [0, 1), got {amount}")
        count = int(round(amount * n_classes))
    else:
        count = amount
    if count < 0 or (count > 0 and count >= n_classes):
        raise UserError(
            f"{name}: {count} classes requested but only {n_classes} available "
            "(at least one must stay on the other side)"
        )
    return count


def split_by_class(
    records: list[Record], amount: int | float, seed: int, name: str = "val_classes"
) -> tuple[list[Record], list[Record]]:
    """Split records into (rest, held_out) with ``amount`` classes held out; class-disjoint, deterministic.

    The held-out classes are the last ``amount`` of the sorted class ids shuffled by ``seed`` (as the seed
    design did: the first shuffled classes train, the others validate). Record order is kept on both sides.
    """
    classes = sorted({r.class_id for r in records})
    count = _count(len(classes), amount, name)
    order = np.random.default_rng(seed).permutation(len(classes))
    held = {classes[i] for i in order[len(classes) - count :]} if count else set()
    rest = [r for r in records if r.class_id not in held]
    return rest, [r for r in records if r.class_id in held]


def split_train_val(records: list[Record], val_classes: int | float, seed: int) -> tuple[list[Record], list[Record]]:
    """Class-disjoint train/val split: ``val_classes`` is a count or a fraction of the classes."""
    return split_by_class(records, val_classes, seed, "val_classes")


# ------------------------------------------------------------------------- manifest and image folder


def _label_map(values: list[str]) -> dict[str, int]:
    """Integer labels keep their value; any non-integer label maps all labels to 1..n in sorted order."""
    uniq = sorted(set(values))
    try:
        return {v: int(v) for v in uniq}
    except ValueError:
        return {v: i for i, v in enumerate(uniq, start=1)}


def _sniff_delimiter(path: Path, first: str) -> str:
    if path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first):
        return "\t"
    return ","


def read_manifest(path: str | Path, on_missing: str = "error") -> tuple[list[Record], list[dict[str, str]]]:
    """Read a CSV/TSV manifest ``path,label[,group]`` (header optional): ``(records, skipped)``.

    Image paths are relative to the manifest's folder (or absolute). ``image_id`` is the 1-based data
    row, ``super_class_id`` the group (0 without a group column). String labels/groups map to 1..n in
    sorted order, so the same manifest always yields the same ids.
    """
    _check_on_missing(on_missing)
    return _drop_missing(_parse_manifest(Path(path)), Path(path).parent, Path(path).name, on_missing)


def _parse_manifest(path: Path) -> list[Record]:
    if not path.is_file():
        raise UserError(f"{path}: manifest not found")
    lines = read_text_lines(path, "utf-8-sig")
    if not any(line.strip() for line in lines):
        raise UserError(f"{path}: manifest is empty (expected rows path,label[,group])")
    rows = list(csv.reader(lines, delimiter=_sniff_delimiter(path, lines[0])))
    start = 1 if rows and rows[0] and rows[0][0].strip().lower() == "path" else 0
    entries: list[tuple[int, str, str, str | None]] = []
    for lineno, row in enumerate(rows[start:], start=start + 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) not in (2, 3) or not row[0].strip() or not row[1].strip():
            raise UserError(f"{path}:{lineno}: expected path,label[,group], got {row!r}")
        entries.append((lineno, row[0].strip(), row[1].strip(), row[2].strip() if len(row) == 3 else None))
    if len({e[3] is None for e in entries}) > 1:
        raise UserError(f"{path}: some rows have a group column and some do not")
    labels = _label_map([e[2] for e in entries])
    groups = _label_map([e[3] for e in entries if e[3] is not None])
    return [
        Record(i, labels[lab], groups[grp] if grp is not None else 0, p)
        for i, (_, p, lab, grp) in enumerate(entries, start=1)
    ]


def read_image_folder(root: str | Path) -> list[Record]:
    """ImageFolder tree (``root/<class>/<image>``): classes are the sorted subfolder names -> 1..n."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected one subfolder per class)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    records: list[Record] = []
    for class_id, d in enumerate(class_dirs, start=1):
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                records.append(Record(len(records) + 1, class_id, 0, f.relative_to(root).as_posix()))
    if not records:
        raise UserError(f"{root}: no images found in class subfolders (extensions {', '.join(IMAGE_EXTS)})")
    return records


def load_catalogue(
    *,
    sop_root: str | Path | None = None,
    manifest: str | Path | None = None,
    image_folder: str | Path | None = None,
    val_classes: int | float = 0,
    test_classes: int | float = 0.5,
    seed: int = 0,
    on_missing: str = "error",
) -> Catalogue:
    """Read one source and split it train/val/test by classes.

    SOP keeps its official test file; manifests and image folders hold out ``test_classes`` first (the SOP
    protocol: test classes unseen in training), then ``val_classes`` of the remaining training classes.
    Splits are drawn from the *listed* images, before missing files are dropped, so the class split does
    not move when a few files go missing; each missing file is reported in the split it was listed in.
    """
    _check_on_missing(on_missing)
    if sum(x is not None for x in (sop_root, manifest, image_folder)) != 1:
        raise UserError("give exactly one of --sop-root, --manifest, --image-folder")
    if sop_root is not None:
        root, source, listed = Path(sop_root), {"kind": "sop", "path": str(sop_root)}, SOP_FILES["train"]
        parsed = _parse_sop(root)
        train, test = parsed["train"], parsed["test"]
    else:
        if manifest is not None:
            root, source, listed = (
                Path(manifest).parent,
                {"kind": "manifest", "path": str(manifest)},
                Path(manifest).name,
            )
            records = _parse_manifest(Path(manifest))
        else:
            root, source = Path(image_folder), {"kind": "image_folder", "path": str(image_folder)}
            listed, records = str(image_folder), read_image_folder(root)
        train, test = split_by_class(records, test_classes, seed, "test_classes")
    train, val = split_train_val(train, val_classes, seed)
    splits, skipped = {}, {}
    for split, records in (("train", train), ("val", val), ("test", test)):
        where = SOP_FILES["test"] if sop_root is not None and split == "test" else listed
        splits[split], skipped[split] = _drop_missing(records, root, where, on_missing)
    return Catalogue(root, splits, skipped, source)
