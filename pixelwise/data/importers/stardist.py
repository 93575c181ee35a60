"""``pixelwise data import stardist``: the stardist package's real nuclei image as a dataset.

Source: PyPI ``stardist==0.9.2`` ships ``stardist/data/images/img2d.tif`` (512 x 512 uint16
fluorescence image of cell nuclei from the 2018 Data Science Bowl, CC0) and ``mask2d.tif``
(a hand-made instance mask, 125 nuclei, many touching, non-contiguous ids). The package is
located with ``importlib.util.find_spec`` and never imported (``pip install --no-deps``
suffices); the .tif files are read with tifffile.

What is written (VOC layout, see :func:`~pixelwise.data.importers._common.write_voc_crops`):

- images: 8-bit GRAYSCALE PNGs (1 channel; the uint16 values are scaled linearly from
  [min, max] of the whole image to [0, 255]); train with ``image_mode: L``.
- classes: 0 background, 1 nucleus. Where two nuclei touch, the pixels of one along the
  contact are set to background (:func:`separation_lines`): a 1 px gap, as in the U-Net
  paper's targets, so the connected components of a perfect prediction are the nuclei.
- instances: ``SegmentationObject`` holds the nuclei (complete, ids 1..K per crop).
- split: the image is cut into ``crop`` x ``crop`` windows (default 256: four quadrants);
  in raster order the last ``val_fraction`` of them (default 1 of 4: the bottom-right
  quadrant) is ``val``, the others ``train``. Train and val share no pixel; a nucleus cut
  by the split line appears in part in both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pixelwise.data.classes import ClassInfo
from pixelwise.data.importers._common import (
    MissingPackageError, grid_crops, separation_lines, source_files, write_voc_crops,
)
from pixelwise.errors import DataError

__all__ = ["import_stardist", "STARDIST_CLASSES", "PIP_SPEC"]

PIP_SPEC = "stardist==0.9.2"
FILES = ("img2d.tif", "mask2d.tif")
STARDIST_CLASSES = (ClassInfo(0, "background", False, (0, 0, 0)), ClassInfo(1, "nucleus", True, (255, 200, 0)))


def _read_tif(path: Path) -> np.ndarray:
    try:
        import tifffile
    except ImportError:
        raise MissingPackageError(f"reading {path.name} needs tifffile: pip install tifffile "
                                  "(or pip install 'pixelwise[extra]')") from None
    try:
        return np.asarray(tifffile.imread(path))
    except Exception as e:  # corrupt file
        raise DataError(path, f"cannot read TIFF: {e}") from None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Linear [min, max] -> [0, 255] (a constant image becomes 0)."""
    a = image.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def import_stardist(out: str | Path, source: str | Path | None = None, crop: int = 256,
                    val_fraction: float = 0.25, separate_touching: bool = True, overwrite: bool = False) -> Path:
    """Write the stardist nuclei image as a VOC-layout dataset in ``out`` (module docstring).

    Args:
        source: a folder holding ``img2d.tif`` and ``mask2d.tif`` (default: the installed
            stardist package's ``data/images``).
        crop, val_fraction: the spatial split (see module docstring).
        separate_touching: put a 1 px background gap between touching nuclei in the
            semantic map (the instance map is unchanged).

    Raises:
        MissingPackageError: stardist (or tifffile) is not installed; says what to pip install.
        DataError: bad files, or ``out`` exists and is not empty (without ``overwrite``).
    Nothing is left in ``out`` unless the whole VOC dataset was written; the COCO instance
    JSON files (``annotations/instances_{train,val}.json``) are then written beside it.
    """
    folder = source_files(source, "stardist", PIP_SPEC, "data/images", FILES)
    image = _read_tif(folder / "img2d.tif")
    mask = _read_tif(folder / "mask2d.tif")
    if image.ndim != 2 or mask.shape != image.shape:
        raise DataError(folder, f"expected a 2-D image and a mask of its size, got {image.shape} and {mask.shape}")
    instances = mask.astype(np.int64)
    semantic = (instances > 0).astype(np.uint8)
    if separate_touching:
        semantic[separation_lines(instances)] = 0
    crops = grid_crops(image.shape[0], image.shape[1], crop, val_fraction, "stardist")
    info = {
        "source": {"package": PIP_SPEC, "files": [str(folder / f) for f in FILES],
                   "what": "2018 Data Science Bowl nuclei (fluorescence), hand-made instance mask",
                   "licence": "CC0 data"},
        "image_mode": "L",
        "intensity": "uint16 scaled linearly from [min, max] of the image to 0..255",
        "semantic": "0 background, 1 nucleus" + ("; 1 px background gap between touching nuclei" if separate_touching
                                                  else ""),
        "split": f"{crop} px crops in raster order; the last {val_fraction:g} of them are val (no shared pixel)",
    }
    root = write_voc_crops(out, to_uint8(image), semantic, instances, crops, STARDIST_CLASSES, info, overwrite)
    # The same nuclei as COCO instances (annotations/instances_{split}.json), for Mask R-CNN.
    from pixelwise.data.formats.coco import voc_to_coco_instances

    voc_to_coco_instances(root)
    return root
