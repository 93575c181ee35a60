"""Datasets in PASCAL VOC layout (VOC itself, the built-in shapes dataset, labelme exports).

Layout::

    root/
      JPEGImages/{id}.jpg|.jpeg|.png          images
      SegmentationClass/{id}.png              palette/index PNG of class ids, 255 = ignore
      SegmentationObject/{id}.png             (optional) instance ids, 0 = none, 255 = ignore
      ImageSets/Segmentation/{split}.txt      (optional) one id a line
      classes.json | class_names.txt          (optional) class list; default: the 21 VOC classes

labelme's ``labelme2voc`` writes the label folders as ``SegmentationClassPNG`` /
``SegmentationObjectPNG`` (its ``SegmentationClass`` holds .npy files) and no ImageSets:
both are understood. Split ``"all"`` means every labelled image (or ``all.txt`` when it
exists), and is the only split of a dataset without ImageSets.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pixelwise.data.formats.base import SampleDataset
from pixelwise.data.classes import (
    IGNORE_INDEX,
    VOC_CLASSES,
    ClassInfo,
    load_class_file,
    load_class_names_txt,
)
from pixelwise.data.io import read_image, read_label
from pixelwise.errors import DataError

__all__ = ["VOCSegmentation", "find_voc_classes", "image_to_tensor", "label_map_problem"]

Sample = dict[str, Any]

IMAGE_DIR = "JPEGImages"
CLASS_DIRS = ("SegmentationClass", "SegmentationClassPNG")
OBJECT_DIRS = ("SegmentationObject", "SegmentationObjectPNG")
SPLIT_DIR = Path("ImageSets") / "Segmentation"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) array -> float32 (C, H, W) tensor with values in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


def find_voc_classes(root: str | Path) -> tuple[list[ClassInfo], int]:
    """The class list of a VOC-layout folder and its ignore index.

    ``classes.json`` if present, else labelme's ``class_names.txt``, else the 21 VOC classes.
    """
    root = Path(root)
    if (root / "classes.json").is_file():
        return load_class_file(root / "classes.json")
    if (root / "class_names.txt").is_file():
        return load_class_names_txt(root / "class_names.txt"), IGNORE_INDEX
    return list(VOC_CLASSES), IGNORE_INDEX


def _label_dir(root: Path, names: Sequence[str]) -> Path | None:
    """The first of the candidate folders that holds PNG files."""
    for name in names:
        folder = root / name
        if folder.is_dir() and any(e.name.lower().endswith(".png") for e in os.scandir(folder)):
            return folder
    return None


def _index_images(folder: Path) -> dict[str, Path]:
    """Map id -> image file; with several extensions for one id, the first of IMAGE_EXTENSIONS wins."""
    found: dict[str, Path] = {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    for entry in os.scandir(folder):
        stem, ext = os.path.splitext(entry.name)
        ext = ext.lower()
        if ext in rank and (stem not in found or rank[ext] < rank[found[stem].suffix.lower()]):
            found[stem] = Path(entry.path)
    return found


def label_map_problem(label: np.ndarray, path: str | Path, image_hw: tuple[int, int], num_classes: int | None,
                      ignore_index: int = IGNORE_INDEX) -> DataError | None:
    """The problem with a label map, as a DataError to raise or report, or None.

    Checks that ``label`` (H, W) has the image's size and, unless ``num_classes`` is None
    (instance maps), that every value is a class id ``0 .. num_classes - 1`` or ``ignore_index``.
    """
    if label.shape != tuple(image_hw):
        (lh, lw), (ih, iw) = label.shape, image_hw
        return DataError(path, f"mask {lw}x{lh} but image {iw}x{ih} (width x height)",
                         "the label map must have the size of its image")
    if num_classes is None:
        return None
    bad = label >= num_classes
    if ignore_index >= num_classes:
        bad &= label != ignore_index
    bad |= label < 0
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if values.size > 10 else "")
        return DataError(path, f"label values {shown} are not class ids (classes 0..{num_classes - 1}, "
                         f"{ignore_index} = ignore)", "check the class list (classes.json) or convert the labels")
    return None


class VOCSegmentation(SampleDataset):
    """A semantic (and optionally instance) segmentation dataset in VOC layout.

    Args:
        root: the dataset folder (holding ``JPEGImages`` etc.).
        split: name of a file in ``ImageSets/Segmentation`` (``"train"``, ``"val"``, ...), or
            ``"all"``: every labelled image (``all.txt`` if present).
        transforms: called on each sample dict (see :mod:`pixelwise.data.transforms`).
        classes: the class list; default :func:`find_voc_classes` (classes.json,
            class_names.txt or the VOC classes).
        with_instances: also load ``SegmentationObject`` as ``instance_map``.
        image_mode: ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        ids: the sample ids of ``split`` when it has no split file (the automatic split of
            :func:`pixelwise.data.formats.folder.auto_split`); default: read the split file.

    A sample is a dict: ``image`` float32 (C, H, W) in [0, 1]; ``semantic`` int64 (H, W)
    with 255 = ignore; ``instance_map`` int64 (H, W) (0 = none, 255 = ignore) when
    ``with_instances``; ``meta`` = {"id", "file", "size": (H, W)}. Then ``transforms(sample)``.

    Raises:
        DataError: at construction for a missing folder, a missing or empty split file, an
            id without image or label file; when loading a sample for unreadable files, a
            label map whose size differs from the image, or label values that are no class id.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Callable[[Sample], Sample] | None = None,
        classes: Sequence[ClassInfo] | None = None,
        with_instances: bool = False,
        image_mode: Literal["RGB", "L"] = "RGB",
        ids: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.with_instances = with_instances
        if image_mode not in ("RGB", "L"):
            raise ValueError(f"image_mode must be 'RGB' or 'L', got {image_mode!r}")
        self.image_mode = image_mode

        if not self.root.is_dir():
            raise DataError(self.root, "dataset folder not found")
        if classes is None:
            self.classes, self.ignore_index = find_voc_classes(self.root)
        else:
            self.classes, self.ignore_index = list(classes), IGNORE_INDEX
        if not self.classes:
            raise ValueError("classes must not be empty")

        image_dir = self.root / IMAGE_DIR
        if not image_dir.is_dir():
            raise DataError(image_dir, "image folder not found", "a VOC-layout dataset keeps its images in JPEGImages/")
        label_dir = _label_dir(self.root, CLASS_DIRS)
        if label_dir is None:
            raise DataError(self.root, f"no label folder with PNG files ({' or '.join(CLASS_DIRS)})",
                            "put one palette/index PNG per image in SegmentationClass/")
        self.label_dir = label_dir
        self.object_dir: Path | None = None
        if with_instances:
            self.object_dir = _label_dir(self.root, OBJECT_DIRS)
            if self.object_dir is None:
                raise DataError(self.root, f"no instance folder with PNG files ({' or '.join(OBJECT_DIRS)})",
                                "pass with_instances=False, or add SegmentationObject/ PNGs")

        self.ids = list(ids) if ids is not None else self._read_ids(split)
        if not self.ids:
            raise DataError(self.root, f"split {split!r} is empty", "check the split (and --val-fraction)")
        images = _index_images(image_dir)
        self.image_files: list[Path] = []
        for sample_id in self.ids:
            if sample_id not in images:
                raise DataError(image_dir / sample_id, f"no image for id {sample_id!r} of split {split!r}",
                                f"expected {sample_id}.jpg, .jpeg or .png in {image_dir}")
            self.image_files.append(images[sample_id])
            for folder in (self.label_dir, self.object_dir):
                if folder is not None and not (folder / f"{sample_id}.png").is_file():
                    raise DataError(folder / f"{sample_id}.png", f"label file for id {sample_id!r} not found")

    # -- construction helpers -------------------------------------------------------------

    def _read_ids(self, split: str) -> list[str]:
        split_dir = self.root / SPLIT_DIR
        split_file = split_dir / f"{split}.txt"
        if split == "all" and not split_file.is_file():
            ids = sorted(p.stem for p in self.label_dir.iterdir() if p.suffix.lower() == ".png")
            if not ids:  # pragma: no cover - _label_dir only returns folders with PNG files
                raise DataError(self.label_dir, "no label files")
            return ids
        if not split_file.is_file():
            available = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
            fix = (f"available splits: {', '.join(available)}" if available
                   else "this dataset has no ImageSets/Segmentation: use split='all', or open it with "
                        "pixelwise.data.formats.detect.open_semantic (as train does) for the automatic train/val split")
            if available and "all" not in available:
                fix += ", or 'all' for every labelled image"
            raise DataError(split_file, f"split file for split {split!r} not found", fix)
        try:
            lines = split_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(split_file, f"cannot read split file: {e}") from None
        ids = [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not ids:
            raise DataError(split_file, "split file is empty", "list one image id (file name without extension) a line")
        return ids

    # -- Dataset protocol -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"n={len(self)}, classes={self.num_classes}, with_instances={self.with_instances}, "
                f"transforms={self.transforms!r})")

    def _check_label(self, label: np.ndarray, path: Path, image_hw: tuple[int, int], instance: bool) -> None:
        error = label_map_problem(label, path, image_hw, None if instance else self.num_classes, self.ignore_index)
        if error is not None:
            raise error

    def load(self, index: int) -> Sample:
        """The sample at ``index`` before ``transforms``."""
        sample_id, image_file = self.ids[index], self.image_files[index]
        image = read_image(image_file, self.image_mode)
        hw = (int(image.shape[0]), int(image.shape[1]))
        label_file = self.label_dir / f"{sample_id}.png"
        semantic = read_label(label_file)
        self._check_label(semantic, label_file, hw, instance=False)
        sample: Sample = {"image": image_to_tensor(image), "semantic": torch.from_numpy(semantic)}
        if self.object_dir is not None:
            object_file = self.object_dir / f"{sample_id}.png"
            instance_map = read_label(object_file)
            self._check_label(instance_map, object_file, hw, instance=True)
            sample["instance_map"] = torch.from_numpy(instance_map)
        sample["meta"] = {"id": sample_id, "file": str(image_file), "size": hw}
        return sample


def iter_voc_splits(root: str | Path, splits: Sequence[str], **kwargs: Any) -> Iterator[tuple[str, "VOCSegmentation"]]:
    """``(split, VOCSegmentation)`` for each of ``splits`` that has a split file (others are
    skipped): the loop every VOC -> COCO converter runs."""
    root = Path(root)
    for split in splits:
        if (root / "ImageSets" / "Segmentation" / f"{split}.txt").is_file():
            yield split, VOCSegmentation(root, split, **kwargs)
