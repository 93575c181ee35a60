"""ADE20K SceneParsing (``ADEChallengeData2016``, the 150-class benchmark).

Layout::

    root/
      images/{training,validation}/ADE_train_00000001.jpg ...
      annotations/{training,validation}/ADE_train_00000001.png ...
      objectInfo150.txt | objectInfo150.csv     (optional: the class names)

Annotation value 0 is "other" (ignore -> 255); values 1..150 are the classes 0..149.
Splits: ``train`` (training/), ``val`` (validation/), ``all``.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pixelwise.data.classes import IGNORE_INDEX, ClassInfo, classes_from_names
from pixelwise.data.formats.folder import FolderSegmentation, MaskCodec, check_ignore_share, pair_folder
from pixelwise.errors import DataError

__all__ = ["ADE_NUM_CLASSES", "ade20k_classes", "is_ade20k", "open_ade20k"]

ADE_NUM_CLASSES = 150
SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def is_ade20k(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "annotations").is_dir() and any(
        (root / "annotations" / d).is_dir() for d in ("training", "validation"))


def ade20k_classes(root: Path) -> list[ClassInfo]:
    """The 150 classes: names from ``objectInfo150.txt``/``.csv`` (first name of the ``Name``
    column) when present, else ``class_1`` .. ``class_150`` (their annotation values)."""
    for name in ("objectInfo150.txt", "objectInfo150.csv"):
        path = root / name
        if not path.is_file():
            continue
        delimiter = "\t" if name.endswith(".txt") else ","
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter=delimiter))
        names = [str(r.get("Name", "")).split(";")[0].strip() for r in rows]
        if len(names) != ADE_NUM_CLASSES or not all(names):
            raise DataError(path, f"expected {ADE_NUM_CLASSES} rows with a 'Name' column, got {len(names)}")
        return classes_from_names(names, background=False)
    return classes_from_names([f"class_{k}" for k in range(1, ADE_NUM_CLASSES + 1)], background=False)


def open_ade20k(root: str | Path, split: str, *, transforms=None, image_mode: str = "RGB") -> FolderSegmentation:
    """ADE20K SceneParsing ``split``: 150 classes, annotation 0 -> ignore."""
    root = Path(root)
    folders = ["training", "validation"] if split == "all" else [SPLITS.get(split, split)]
    pairs = []
    for folder in folders:
        if not (root / "images" / folder).is_dir():
            raise DataError(root / "images" / folder, f"split {split!r} not found",
                            "ADE20K has train (images/training) and val (images/validation)")
        pairs += pair_folder(root / "images" / folder, root / "annotations" / folder)
    lut = {0: IGNORE_INDEX, **{k: k - 1 for k in range(1, ADE_NUM_CLASSES + 1)}}
    codec = MaskCodec("index", ADE_NUM_CLASSES, IGNORE_INDEX, lut=lut, table="the ADE20K table (values 0..150)")
    check_ignore_share(root, [p.mask for p in pairs], codec)
    return FolderSegmentation(root, split, pairs, ade20k_classes(root), codec, transforms, image_mode, "ade20k")
