"""CVAT's "Segmentation mask 1.1" export.

Layout::

    root/
      labelmap.txt                          # label:color_rgb:parts:actions, one label a line
      JPEGImages/{name}.jpg                 # when exported with images
      SegmentationClass/{name}.png          # RGB: the label's colour per pixel
      SegmentationObject/{name}.png         # RGB: one colour per object (optional)
      ImageSets/Segmentation/default.txt    # every image of the task

CVAT exports a single subset (``default``): ``train`` and ``val`` are the automatic seeded
split of its ids (:func:`~pixelwise.data.formats.folder.auto_split`); a subset file of that
name (``train.txt`` from a task with subsets) is used as is.
"""
from __future__ import annotations

import os
from pathlib import Path

from pixelwise.data.formats.folder import (
    FolderSegmentation, Pair, auto_split, check_ignore_share, find_class_table, resolve_codec,
)
from pixelwise.errors import DataError

__all__ = ["is_cvat", "open_cvat"]


def is_cvat(root: Path) -> bool:
    return (root / "labelmap.txt").is_file() and (root / "SegmentationClass").is_dir()


def _read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read split file: {e}") from None
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def open_cvat(root: str | Path, split: str, *, transforms=None, image_mode: str = "RGB",
              with_instances: bool = False, val_fraction: float = 0.2, seed: int = 0,
              colors: str | os.PathLike | None = None) -> FolderSegmentation:
    """A CVAT Segmentation mask 1.1 folder, classes from ``labelmap.txt`` (or ``colors``)."""
    from pixelwise.data.formats.voc import _index_images

    root = Path(root)
    sets = root / "ImageSets" / "Segmentation"
    label_dir = root / "SegmentationClass"
    labelled = sorted(p.stem for p in label_dir.glob("*.png"))
    every = _read_ids(sets / "default.txt") if (sets / "default.txt").is_file() else labelled
    if (sets / f"{split}.txt").is_file():
        ids = _read_ids(sets / f"{split}.txt")
    else:
        ids = auto_split(every, split, val_fraction, seed)
    image_dir = root / "JPEGImages"
    if not image_dir.is_dir():
        raise DataError(image_dir, "image folder not found", "export the CVAT task with 'Save images' checked")
    images = _index_images(image_dir)
    pairs = []
    for sid in ids:
        if sid not in images:
            raise DataError(image_dir / sid, f"no image for id {sid!r}", f"expected {sid}.jpg or .png in {image_dir}")
        mask = label_dir / f"{sid}.png"
        if not mask.is_file():
            raise DataError(mask, f"mask of {sid!r} not found")
        inst = root / "SegmentationObject" / f"{sid}.png" if with_instances else None
        if inst is not None and not inst.is_file():
            raise DataError(inst, f"instance mask of {sid!r} not found")
        pairs.append(Pair(sid, images[sid], mask, inst))
    table = find_class_table(root, colors, names=("labelmap.txt",))
    all_masks = [label_dir / f"{sid}.png" for sid in every if (label_dir / f"{sid}.png").is_file()]
    classes, codec = resolve_codec(root, all_masks, table)
    check_ignore_share(root, all_masks, codec)
    return FolderSegmentation(root, split, pairs, classes, codec, transforms, image_mode, "cvat")
