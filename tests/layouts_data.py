"""Dataset folders in every supported layout, built from the real data the tests use: the
stardist nuclei image (grayscale fluorescence, hand-made instance mask) and the histolytics
H&E image (4 nucleus types). Crops are small so the tests stay fast; nothing is committed:
each builder writes into a tmp folder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelwise.data.formats.cityscapes import _TABLE

tifffile = pytest.importorskip("tifffile")

CROP = 64


def _package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"pip install --no-deps {name}")
    return Path(spec.submodule_search_locations[0]) / "data"


def stardist_crops(n: int = 6, crop: int = CROP) -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint16 image, instance mask) crops of the stardist image, raster order."""
    d = _package("stardist") / "images"
    image, inst = tifffile.imread(d / "img2d.tif"), tifffile.imread(d / "mask2d.tif")
    out = []
    for k in range(n):
        y, x = (k // 4) * crop * 2, (k % 4) * crop * 2
        out.append((image[y:y + crop, x:x + crop], inst[y:y + crop, x:x + crop].astype(np.int64)))
    return out


def histolytics_crops(n: int = 4, crop: int = CROP) -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGB uint8 image, type map 0..3) crops of the histolytics H&E image."""
    d = _package("histolytics")
    rgb = np.asarray(Image.open(d / "hgsc_nest.jpg").convert("RGB"))
    types = np.load(d / "hgsc_nest_type_mask.npz")["nuc_raster"].astype(np.int64)
    out = []
    for k in range(n):
        y, x = 300 + (k // 2) * crop * 3, 300 + (k % 2) * crop * 3
        out.append((rgb[y:y + crop, x:x + crop], types[y:y + crop, x:x + crop]))
    return out


def gray8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return np.clip((a - a.min()) / max(a.max() - a.min(), 1) * 255, 0, 255).astype(np.uint8)


def images_masks(root: Path, value: int = 255, n: int = 6, mask_ext: str = ".png", image_ext: str = ".png") -> Path:
    """``images/`` + ``masks/`` of stardist crops with binary masks 0/``value``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k, (image, inst) in enumerate(stardist_crops(n)):
        if image_ext == ".tif":
            tifffile.imwrite(root / "images" / f"sd{k}.tif", image)  # 16-bit, as the microscope wrote it
        else:
            Image.fromarray(gray8(image)).save(root / "images" / f"sd{k}{image_ext}")
        mask = ((inst > 0) * value).astype(np.uint8)
        if mask_ext == ".tif":
            tifffile.imwrite(root / "masks" / f"sd{k}.tif", mask)
        else:
            Image.fromarray(mask).save(root / "masks" / f"sd{k}{mask_ext}")
    return root


def split_folders(root: Path) -> Path:
    """``train/`` + ``val/`` (+ ``test/``) with images/ + masks/ of histolytics crops (index PNGs 0..3)."""
    crops = histolytics_crops(4)
    for split, ks in (("train", [0, 1]), ("val", [2]), ("test", [3])):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for k in ks:
            Image.fromarray(crops[k][0]).save(root / split / "images" / f"h{k}.jpg", quality=95)
            Image.fromarray(crops[k][1].astype(np.uint8)).save(root / split / "masks" / f"h{k}.png")
    return root


def histolytics_instances(n: int = 4, crop: int = CROP) -> list[np.ndarray]:
    """The nucleus instance ids of the crops of :func:`histolytics_crops` (0 = none)."""
    inst = np.load(_package("histolytics") / "hgsc_nest_inst_mask.npz")["nuc_raster"].astype(np.int64)
    return [inst[300 + (k // 2) * crop * 3:][:crop, 300 + (k % 2) * crop * 3:][:, :crop] for k in range(n)]


HIST_COLORS = {"background": (0, 0, 0), "connective": (0, 200, 0), "inflammatory": (255, 255, 0),
               "neoplastic": (200, 0, 0)}


def cvat_export(root: Path) -> Path:
    """A CVAT "Segmentation mask 1.1" export of histolytics crops: RGB masks, labelmap.txt, default.txt."""
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    lines = ["# label:color_rgb:parts:actions"] + [f"{n}:{r},{g},{b}::" for n, (r, g, b) in HIST_COLORS.items()]
    (root / "labelmap.txt").write_text("\n".join(lines) + "\n")
    colors = np.array(list(HIST_COLORS.values()), np.uint8)
    names = []
    for k, (image, types) in enumerate(histolytics_crops(4)):
        name = f"frame_{k:06d}"
        names.append(name)
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        Image.fromarray(colors[types]).save(root / "SegmentationClass" / f"{name}.png")
        inst = histolytics_instances(4)[k]
        ids, inverse = np.unique(inst, return_inverse=True)
        palette = np.random.default_rng(k).integers(1, 255, (len(ids), 3)).astype(np.uint8)  # one colour a nucleus
        palette[ids == 0] = 0
        Image.fromarray(palette[inverse.reshape(inst.shape)]).save(root / "SegmentationObject" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "default.txt").write_text("\n".join(names) + "\n")
    return root


def cityscapes_tree(root: Path) -> Path:
    """A Cityscapes-style tree: histolytics crops as leftImg8bit, their types written as label ids
    of the official table (0 -> road 7, 1 -> car 26, 2 -> person 24, 3 -> sky 23) plus a void
    border (label id 0) and a 'parking' patch (9, not evaluated)."""
    label_id = {name: lid for lid, name, _, _, _ in _TABLE}
    lut = np.array([label_id["road"], label_id["car"], label_id["person"], label_id["sky"]], np.uint8)
    for split, ks in (("train", [0, 1]), ("val", [2])):
        for d in ("leftImg8bit", "gtFine"):
            (root / d / split / "aachen").mkdir(parents=True)
        for k in ks:
            image, types = histolytics_crops(4)[k]
            ids = lut[types]
            ids[:2, :] = label_id["unlabeled"]
            ids[10:14, 10:14] = label_id["parking"]
            stem = f"aachen_{k:06d}_000019"
            Image.fromarray(image).save(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png")
            Image.fromarray(ids).save(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png")
    return root


def ade20k_tree(root: Path) -> Path:
    """ADEChallengeData2016-style: histolytics crops, types 0..3 stored as ADE values 1, 5, 13, 150
    and a 3-row border of 0 ("other" = ignore)."""
    stored = np.array([1, 5, 13, 150], np.uint8)
    for folder, ks in (("training", [0, 1]), ("validation", [2])):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for k in ks:
            image, types = histolytics_crops(4)[k]
            name = f"ADE_{folder[:5]}_{k:08d}"
            Image.fromarray(image).save(root / "images" / folder / f"{name}.jpg", quality=95)
            ann = stored[types]
            ann[-3:, :] = 0
            Image.fromarray(ann).save(root / "annotations" / folder / f"{name}.png")
    return root


def voc_binary(root: Path, with_imagesets: bool = False) -> Path:
    """VOC layout (JPEGImages + SegmentationClass) of stardist crops with 0/255 masks."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    names = []
    for k, (image, inst) in enumerate(stardist_crops(6)):
        names.append(f"sd{k}")
        Image.fromarray(gray8(image)).convert("RGB").save(root / "JPEGImages" / f"sd{k}.png")
        Image.fromarray(((inst > 0) * 255).astype(np.uint8)).save(root / "SegmentationClass" / f"sd{k}.png")
    if with_imagesets:
        (root / "ImageSets" / "Segmentation").mkdir(parents=True)
        (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names[:4]) + "\n")
        (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[4:]) + "\n")
    return root
