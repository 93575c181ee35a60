"""``pixelwise data import histolytics``: the histolytics package's real H&E image as a dataset.

Source: PyPI ``histolytics==0.3.0`` ships ``histolytics/data/hgsc_nest.jpg`` (1500 x 1500 RGB
H&E tissue, high-grade serous carcinoma) with ``hgsc_nest_inst_mask.npz`` (1294 nuclei,
instance ids) and ``hgsc_nest_type_mask.npz`` (nucleus types), both under the key
``nuc_raster``. The labels are model-made (good quality). The package is located with
``importlib.util.find_spec`` and never imported (``pip install --no-deps`` suffices).

What is written (VOC layout, see :func:`~pixelwise.data.importers._common.write_voc_crops`):

- images: RGB PNG crops (lossless copies of the decoded JPEG's pixels).
- classes: 0 background, 1 connective, 2 inflammatory, 3 neoplastic (the type mask).
- instances: ``SegmentationObject`` (nuclei, ids 1..K per crop).
- split: ``crop`` x ``crop`` windows (default 250: a 6 x 6 grid); in raster order the last
  ``val_fraction`` of them (default 1/6: the bottom row) are ``val``. No shared pixel.

and the same crops and splits in the COCO panoptic format
(:mod:`pixelwise.data.formats.coco_panoptic`): ``annotations/panoptic_{train,val}.json`` +
``annotations/panoptic_{train,val}/`` PNGs. Background is the one *stuff* category, each
nucleus is a *thing* segment of its type (the k-th instance of ``SegmentationObject``;
the majority type if its pixels disagree, which 4 of the 1294 do); nucleus-type pixels
outside every instance (43 pixels in the source) are VOID. The panoptic maps use the types
as given, also with ``separate_touching`` (segments need no gap to stay apart). Image ids
are 1, 2, ... in split-file order.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.data.classes import ClassInfo
from pixelwise.data.formats.coco_panoptic import semantic_instance_to_panoptic, write_coco_panoptic
from pixelwise.data.importers._common import Crop, grid_crops, relabel, separation_lines, source_files, write_voc_crops
from pixelwise.data.io import atomic_directory, read_image
from pixelwise.errors import DataError

__all__ = ["import_histolytics", "HISTOLYTICS_CLASSES", "PIP_SPEC"]

PIP_SPEC = "histolytics==0.3.0"
FILES = ("hgsc_nest.jpg", "hgsc_nest_inst_mask.npz", "hgsc_nest_type_mask.npz")
HISTOLYTICS_CLASSES = (
    ClassInfo(0, "background", False, (0, 0, 0)),
    ClassInfo(1, "connective", True, (0, 200, 100)),
    ClassInfo(2, "inflammatory", True, (255, 60, 60)),
    ClassInfo(3, "neoplastic", True, (80, 120, 255)),
)


def _read_npz(path: Path, key: str = "nuc_raster") -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(path, f"no array {key!r} (has {', '.join(z.files)})")
            return np.asarray(z[key])
    except DataError:
        raise
    except Exception as e:
        raise DataError(path, f"cannot read .npz: {e}") from None


def _panoptic_records(types: np.ndarray, instances: np.ndarray, crops: Sequence[Crop],
                      split: str) -> Iterator[dict[str, Any]]:
    """One COCO panoptic record per crop of ``split`` (for :func:`write_coco_panoptic`): the
    crop's instances numbered as in its ``SegmentationObject`` PNG (:func:`relabel`)."""
    for k, c in enumerate(cr for cr in crops if cr.split == split):
        win = (slice(c.y, c.y + c.h), slice(c.x, c.x + c.w))
        id_map, segments = semantic_instance_to_panoptic(types[win], relabel(instances[win]), HISTOLYTICS_CLASSES)
        yield {"image_id": k + 1, "file_name": f"JPEGImages/{c.id}.png", "id_map": id_map, "segments": segments}


def import_histolytics(out: str | Path, source: str | Path | None = None, crop: int = 250,
                       val_fraction: float = 1 / 6, separate_touching: bool = False,
                       overwrite: bool = False) -> Path:
    """Write the histolytics H&E image as a 4-class VOC-layout dataset in ``out``, with the
    same crops and splits in COCO panoptic format (``out/annotations/panoptic_{split}.json``).

    Args:
        source: a folder holding the three files (default: the installed package's ``data``).
        crop, val_fraction: the spatial split (module docstring).
        separate_touching: put a 1 px background gap between touching nuclei in the semantic
            map (default off: the types are kept as given).

    Raises:
        MissingPackageError: histolytics is not installed; says what to pip install.
        DataError: bad files, or ``out`` exists and is not empty (without ``overwrite``).
    Nothing is left in ``out`` unless the whole dataset was written.
    """
    folder = source_files(source, "histolytics", PIP_SPEC, "data", FILES)
    image = read_image(folder / "hgsc_nest.jpg", "RGB")
    instances = _read_npz(folder / "hgsc_nest_inst_mask.npz").astype(np.int64)
    types = _read_npz(folder / "hgsc_nest_type_mask.npz").astype(np.int64)
    if instances.shape != image.shape[:2] or types.shape != image.shape[:2]:
        raise DataError(folder, f"image {image.shape[:2]}, instance mask {instances.shape} and type mask "
                        f"{types.shape} differ in size")
    if types.min() < 0 or types.max() >= len(HISTOLYTICS_CLASSES):
        raise DataError(folder / FILES[2], f"type values {int(types.min())}..{int(types.max())}, expected 0..3")
    semantic = types.astype(np.uint8)
    if separate_touching:
        semantic[separation_lines(instances)] = 0
    crops = grid_crops(image.shape[0], image.shape[1], crop, val_fraction, "hgsc")
    info = {
        "source": {"package": PIP_SPEC, "files": [str(folder / f) for f in FILES],
                   "what": "H&E tissue (high-grade serous carcinoma), model-made nucleus instance and type masks",
                   "licence": "BSD-3"},
        "image_mode": "RGB",
        "semantic": "0 background, 1 connective, 2 inflammatory, 3 neoplastic",
        "split": f"{crop} px crops in raster order; the last {val_fraction:.4g} of them are val (no shared pixel)",
        "panoptic": "annotations/panoptic_{train,val}.json + PNG folders (COCO panoptic): background is stuff, "
                    "each nucleus a thing segment of its type",
    }
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:  # VOC and panoptic files, or nothing
        write_voc_crops(tmp, image, semantic, instances, crops, HISTOLYTICS_CLASSES, info)
        for split in ("train", "val"):
            write_coco_panoptic(tmp, split, _panoptic_records(types, instances, crops, split), HISTOLYTICS_CLASSES,
                                info={"description": f"histolytics hgsc_nest {split} crops, COCO panoptic",
                                      "source": PIP_SPEC})
    return Path(out)
