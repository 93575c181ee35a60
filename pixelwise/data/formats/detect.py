"""One entry point for semantic datasets on disk: which layout a folder is, and its dataset.

=================  ==============================================================  ============
layout             what marks it                                                   module
=================  ==============================================================  ============
``cityscapes``     ``leftImg8bit/`` + ``gtFine/``                                  cityscapes
``cvat``           ``labelmap.txt`` + ``SegmentationClass/``                       cvat
``voc``            ``JPEGImages/`` or ``SegmentationClass[PNG]/`` (VOC, labelme)    voc
``ade20k``         ``images/`` + ``annotations/{training,validation}/``            ade20k
``folder``         ``images/`` + ``masks/``                                        folder
``folder-splits``  ``train/images/`` + ``train/masks/`` (+ ``val/``, ``test/``)     folder
=================  ==============================================================  ============

Layouts without split files (``images/`` + ``masks/``, VOC without ``ImageSets/``, CVAT's
single ``default`` subset) get the seeded automatic split of
:func:`~pixelwise.data.formats.folder.auto_split` for ``train`` / ``val``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pixelwise.data.formats.folder import split_folders
from pixelwise.errors import DataError

__all__ = ["LAYOUTS", "detect_layout", "open_semantic", "layout_splits"]

VOC_TABLES = ("classes.json", "class_names.txt", "classes.txt", "labelmap.txt")
"""Class tables a VOC-layout folder may hold, in order of precedence."""
LAYOUTS = ("cityscapes", "cvat", "voc", "ade20k", "folder", "folder-splits")


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of the dataset folder ``root`` (one of :data:`LAYOUTS`).

    Raises:
        DataError: ``root`` is not a folder, or holds none of the layouts (the message lists them).
    """
    from pixelwise.data.formats.ade20k import is_ade20k
    from pixelwise.data.formats.cityscapes import is_cityscapes
    from pixelwise.data.formats.cvat import is_cvat
    from pixelwise.data.formats.voc import CLASS_DIRS, IMAGE_DIR

    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found", "create one with `pixelwise data synth --out DIR`")
    if is_cityscapes(root):
        return "cityscapes"
    if is_cvat(root):
        return "cvat"
    if (root / IMAGE_DIR).is_dir() or any((root / d).is_dir() for d in CLASS_DIRS):
        return "voc"
    if is_ade20k(root):
        return "ade20k"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folder"
    if split_folders(root):
        return "folder-splits"
    if (root / "images").is_dir():
        raise DataError(root, "images/ but no masks/ folder next to it",
                        "put one mask per image (same file name, PNG or TIFF) in masks/")
    raise DataError(root, "no dataset found: expected images/ + masks/, train/{images,masks}, a VOC layout "
                    "(JPEGImages/, SegmentationClass/), CVAT (labelmap.txt), Cityscapes (leftImg8bit/, gtFine/) or "
                    "ADE20K (images/, annotations/)", "see docs/your_own_data.md")


def layout_splits(root: str | os.PathLike, layout: str | None = None) -> list[str]:
    """The splits a layout offers (``train`` and ``val`` for the automatic split)."""
    root = Path(root)
    layout = layout or detect_layout(root)
    if layout == "folder-splits":
        return split_folders(root)
    if layout == "cityscapes":
        return sorted(d.name for d in (root / "leftImg8bit").iterdir() if d.is_dir())
    if layout == "ade20k":
        return [s for s, d in (("train", "training"), ("val", "validation")) if (root / "images" / d).is_dir()]
    sets = root / "ImageSets" / "Segmentation"
    named = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
    if layout == "voc" and ("train" in named or "val" in named):
        return named
    return ["train", "val"]


def open_semantic(root: str | os.PathLike, split: str, transforms: Any = None, image_mode: str = "RGB",
                  with_instances: bool = False, val_fraction: float = 0.2, seed: int = 0,
                  colors: str | os.PathLike | None = None) -> Any:
    """The semantic dataset ``split`` of the folder ``root``, whatever its layout.

    The dataset has ``classes`` (:class:`~pixelwise.data.classes.ClassInfo` list),
    ``ignore_index``, ``load(i)``, ``transforms`` and ``notes`` (lines to tell the user, e.g.
    "masks are binary 0/255: ..."); samples are those of
    :class:`~pixelwise.data.formats.voc.VOCSegmentation`.

    Args:
        split: a split name of the layout; ``train`` / ``val`` are the automatic split where
            the layout has none; ``all`` is every labelled sample.
        with_instances: also load instance maps (VOC ``SegmentationObject``, CVAT, Cityscapes).
        val_fraction, seed: the automatic split (same values -> same split).
        colors: colour table for RGB masks (JSON or CVAT ``labelmap.txt``); overrides the
            dataset's own class table.

    Raises:
        DataError: one line naming the file and the problem: no layout, a missing split, an
            image without mask, mask values the class table does not explain, more than half
            of the pixels ignore, ...
    """
    root = Path(root)
    layout = detect_layout(root)
    common = {"transforms": transforms, "image_mode": image_mode}
    if with_instances and layout in ("folder", "folder-splits", "ade20k"):
        raise DataError(root, f"the {layout} layout has no instance maps",
                        "use a VOC layout with SegmentationObject/, or COCO for instances")
    if layout == "cityscapes":
        from pixelwise.data.formats.cityscapes import open_cityscapes

        return open_cityscapes(root, split, with_instances=with_instances, **common)
    if layout == "ade20k":
        from pixelwise.data.formats.ade20k import open_ade20k

        return open_ade20k(root, split, **common)
    if layout == "cvat":
        from pixelwise.data.formats.cvat import open_cvat

        return open_cvat(root, split, with_instances=with_instances, val_fraction=val_fraction, seed=seed,
                         colors=colors, **common)
    if layout == "voc":
        return _open_voc(root, split, with_instances, val_fraction, seed, colors, **common)
    from pixelwise.data.formats.folder import open_folder

    return open_folder(root, split, val_fraction=val_fraction, seed=seed, colors=colors, **common)


def _split_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read split file: {e}") from None
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _open_voc(root: Path, split: str, with_instances: bool, val_fraction: float, seed: int,
              colors: str | os.PathLike | None, transforms: Any, image_mode: str) -> Any:
    """VOC / labelme: VOCSegmentation when its masks are class ids of its class table, else
    the same files through a mask codec (binary 0/255 masks, RGB masks with ``colors``)."""
    from pixelwise.data.classes import VOC_CLASSES
    from pixelwise.data.formats.folder import (
        FolderSegmentation, Pair, auto_split, check_ignore_share, find_class_table, resolve_codec,
    )
    from pixelwise.data.formats.voc import CLASS_DIRS, SPLIT_DIR, VOCSegmentation, _label_dir

    label_dir = _label_dir(root, CLASS_DIRS)
    split_files = sorted((root / SPLIT_DIR).glob("*.txt")) if (root / SPLIT_DIR).is_dir() else []
    ids = None
    names = {p.stem: p for p in split_files}
    if label_dir is not None and split in ("train", "val") and "train" not in names and "val" not in names:
        # no train/val files: the seeded split of the one list there is (CVAT's default.txt), or of every label
        listed = next((names[n] for n in ("default", "trainval", "all") if n in names), None)
        every = _split_ids(listed) if listed is not None else [p.stem for p in label_dir.glob("*.png")]
        ids = auto_split(every, split, val_fraction, seed)
    voc = VOCSegmentation(root, split, transforms, with_instances=with_instances, image_mode=image_mode, ids=ids)
    masks = sorted(voc.label_dir.glob("*.png"))
    table = find_class_table(root, colors, names=VOC_TABLES)
    classes, codec = resolve_codec(root, masks, table, default_classes=VOC_CLASSES)
    check_ignore_share(root, masks, codec)
    if codec.kind == "index" and codec.lut is None and codec.note is None and colors is None and (
            table is None or table[2].name in ("classes.json", "class_names.txt")):
        voc.notes = []
        return voc
    pairs = [Pair(sid, image, voc.label_dir / f"{sid}.png",
                  voc.object_dir / f"{sid}.png" if voc.object_dir is not None else None)
             for sid, image in zip(voc.ids, voc.image_files)]
    return FolderSegmentation(root, split, pairs, classes, codec, transforms, image_mode, "voc", [codec.note or ""])
