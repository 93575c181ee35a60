"""Cityscapes fine annotations, read with the official label table.

Layout (as downloaded: ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    root/
      leftImg8bit/{train,val,test}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
      gtFine/{train,val,test}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
                                     ..._gtFine_instanceIds.png   (optional)

``*_labelIds.png`` hold the 34 label ids; they are mapped to the 19 train ids of the
official table (``cityscapesscripts/helpers/labels.py``), every other id to 255 = ignore.
"""
from __future__ import annotations

import os
from pathlib import Path

from pixelwise.data.classes import IGNORE_INDEX, ClassInfo
from pixelwise.data.formats.folder import FolderSegmentation, MaskCodec, Pair, check_ignore_share
from pixelwise.errors import DataError

__all__ = ["CITYSCAPES_CLASSES", "LABEL_TO_TRAIN_ID", "is_cityscapes", "open_cityscapes"]

# (label id, name, train id, has instances, colour) of the official table; train id 255 = ignore
_TABLE = [
    (0, "unlabeled", 255, False, (0, 0, 0)), (1, "ego vehicle", 255, False, (0, 0, 0)),
    (2, "rectification border", 255, False, (0, 0, 0)), (3, "out of roi", 255, False, (0, 0, 0)),
    (4, "static", 255, False, (0, 0, 0)), (5, "dynamic", 255, False, (111, 74, 0)),
    (6, "ground", 255, False, (81, 0, 81)), (7, "road", 0, False, (128, 64, 128)),
    (8, "sidewalk", 1, False, (244, 35, 232)), (9, "parking", 255, False, (250, 170, 160)),
    (10, "rail track", 255, False, (230, 150, 140)), (11, "building", 2, False, (70, 70, 70)),
    (12, "wall", 3, False, (102, 102, 156)), (13, "fence", 4, False, (190, 153, 153)),
    (14, "guard rail", 255, False, (180, 165, 180)), (15, "bridge", 255, False, (150, 100, 100)),
    (16, "tunnel", 255, False, (150, 120, 90)), (17, "pole", 5, False, (153, 153, 153)),
    (18, "polegroup", 255, False, (153, 153, 153)), (19, "traffic light", 6, False, (250, 170, 30)),
    (20, "traffic sign", 7, False, (220, 220, 0)), (21, "vegetation", 8, False, (107, 142, 35)),
    (22, "terrain", 9, False, (152, 251, 152)), (23, "sky", 10, False, (70, 130, 180)),
    (24, "person", 11, True, (220, 20, 60)), (25, "rider", 12, True, (255, 0, 0)),
    (26, "car", 13, True, (0, 0, 142)), (27, "truck", 14, True, (0, 0, 70)),
    (28, "bus", 15, True, (0, 60, 100)), (29, "caravan", 255, True, (0, 0, 90)),
    (30, "trailer", 255, True, (0, 0, 110)), (31, "train", 16, True, (0, 80, 100)),
    (32, "motorcycle", 17, True, (0, 0, 230)), (33, "bicycle", 18, True, (119, 11, 32)),
]  # fmt: skip

LABEL_TO_TRAIN_ID: dict[int, int] = {lid: tid for lid, _, tid, _, _ in _TABLE}
"""Label id (``*_labelIds.png``) -> train id (0..18, 255 = ignore)."""

CITYSCAPES_CLASSES: tuple[ClassInfo, ...] = tuple(
    ClassInfo(tid, name, things, color) for _, name, tid, things, color in sorted(
        (row for row in _TABLE if row[2] != 255), key=lambda row: row[2]))
"""The 19 evaluated classes, by train id."""

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def is_cityscapes(root: Path) -> bool:
    return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()


def _pairs(root: Path, split: str, with_instances: bool) -> list[Pair]:
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        available = sorted(d.name for d in (root / "leftImg8bit").iterdir() if d.is_dir())
        raise DataError(image_dir, f"split {split!r} not found", f"available splits: {', '.join(available) or 'none'}")
    pairs = []
    for dirpath, _, files in sorted(os.walk(image_dir)):
        for name in sorted(files):
            if not name.endswith(IMAGE_SUFFIX):
                continue
            image = Path(dirpath, name)
            stem = name[: -len(IMAGE_SUFFIX)]
            gt = root / "gtFine" / split / image.parent.relative_to(image_dir)
            label = gt / (stem + LABEL_SUFFIX)
            if not label.is_file():
                raise DataError(label, f"label file of {name} not found",
                                "unpack gtFine_trainvaltest.zip next to leftImg8bit/")
            inst = gt / (stem + INSTANCE_SUFFIX) if with_instances else None
            if inst is not None and not inst.is_file():
                raise DataError(inst, f"instance file of {name} not found")
            pairs.append(Pair(stem, image, label, inst))
    if not pairs:
        raise DataError(image_dir, f"no *{IMAGE_SUFFIX} images in split {split!r}")
    return pairs


def open_cityscapes(root: str | Path, split: str, *, transforms=None, image_mode: str = "RGB",
                    with_instances: bool = False) -> FolderSegmentation:
    """Cityscapes ``split`` (train, val, test) with the 19 train-id classes, 255 = ignore.

    Cityscapes' instance ids (``26001`` = car instance 1) are kept as stored in ``instance_map``.
    """
    root = Path(root)
    splits = ["train", "val"] if split == "all" else [split]
    pairs = [p for s in splits for p in _pairs(root, s, with_instances)]
    codec = MaskCodec("index", len(CITYSCAPES_CLASSES), IGNORE_INDEX, lut=dict(LABEL_TO_TRAIN_ID),
                      table="the Cityscapes label table (label ids 0..33)")
    check_ignore_share(root, [p.mask for p in pairs], codec)
    return FolderSegmentation(root, split, pairs, CITYSCAPES_CLASSES, codec, transforms, image_mode, "cityscapes")
