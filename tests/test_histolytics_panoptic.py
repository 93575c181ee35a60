"""The histolytics importer's COCO panoptic output: files per split, categories with isthing,
one thing segment per nucleus instance, agreement with the VOC files written beside it,
PQ 1 of the ground truth against itself, and all-or-nothing writes. A synthetic source
stands in for the package (fast); the real package is used too when installed."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelwise.data.formats.coco_panoptic import panoptic_to_semantic_instance, read_panoptic_png
from pixelwise.data.importers import histolytics as hist_module
from pixelwise.data.importers import run_importer
from pixelwise.errors import DataError
from pixelwise.metrics import pq_compute

CATEGORIES = [(0, "background", 0), (1, "connective", 1), (2, "inflammatory", 1), (3, "neoplastic", 1)]


@pytest.fixture
def source(tmp_path) -> Path:
    """80x80 H&E stand-in: 24 discs of radius 6 (neighbours in a row touch), types 1..3;
    instance 23 is mostly type 1 and partly type 3; 6 type pixels lie outside every instance
    (they must become VOID)."""
    d = tmp_path / "hsrc"
    d.mkdir()
    yy, xx = np.mgrid[:80, :80]
    inst = np.zeros((80, 80), np.int32)
    types = np.zeros((80, 80), np.int32)
    k = 0
    for cy in range(10, 80, 20):
        for cx in range(8, 80, 12):
            k += 1
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
            inst[m & (inst == 0)] = 7 * k + 2  # ids not contiguous, as in the source
            types[m] = k % 3 + 1
    third = inst == 7 * 3 + 2  # k = 3: type 1, inside the first 40x40 crop
    types[third & (xx > np.median(xx[third]) + 1)] = 3
    types[38:40, 0:3] = 2  # type without instance
    rgb = np.stack([200 - 100 * (types > 0), 150 + 20 * types, np.full_like(types, 200)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(d / "hgsc_nest.jpg", quality=95)
    np.savez_compressed(d / "hgsc_nest_inst_mask.npz", nuc_raster=inst)
    np.savez_compressed(d / "hgsc_nest_type_mask.npz", nuc_raster=types)
    return d


def split_ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def check_panoptic(root: Path) -> dict[str, int]:
    """Every check that holds for any histolytics import; returns thing segments per split."""
    regions = json.loads((root / "regions.json").read_text())["regions"]
    things_per_split = {}
    for split in ("train", "val"):
        gt_json = root / "annotations" / f"panoptic_{split}.json"
        data = json.loads(gt_json.read_text())
        assert [(c["id"], c["name"], c["isthing"]) for c in data["categories"]] == CATEGORIES
        crops = split_ids(root, split)
        assert [a["file_name"] for a in data["annotations"]] == [f"{c}.png" for c in crops]
        assert [im["file_name"] for im in data["images"]] == [f"JPEGImages/{c}.png" for c in crops]
        assert [a["image_id"] for a in data["annotations"]] == list(range(1, len(crops) + 1))
        assert sorted(p.name for p in (root / "annotations" / f"panoptic_{split}").iterdir()) == \
            sorted(f"{c}.png" for c in crops)
        n_things = 0
        for crop, ann in zip(crops, data["annotations"]):
            segs = ann["segments_info"]
            things = [s for s in segs if s["category_id"] != 0]
            stuff = [s for s in segs if s["category_id"] == 0]
            obj = np.asarray(Image.open(root / "SegmentationObject" / f"{crop}.png"))
            assert len(things) == int(obj.max()) == regions[crop]["instances"]
            n_things += len(things)
            # the panoptic map is the VOC maps of a default import (no gaps): the same
            # instances, each of its majority type; background; VOID where a nucleus type
            # has no instance
            ids = read_panoptic_png(root / "annotations" / f"panoptic_{split}" / ann["file_name"])
            sem, ins = panoptic_to_semantic_instance(ids, segs, [{"id": c, "isthing": t} for c, _, t in CATEGORIES])
            voc_sem = np.asarray(Image.open(root / "SegmentationClass" / f"{crop}.png"))
            assert np.array_equal(ids == 0, (voc_sem > 0) & (obj == 0))
            assert np.array_equal(np.where(ids == 0, 0, ins), obj)
            background = (ids != 0) & (obj == 0)
            assert (sem[background] == 0).all() and (voc_sem[background] == 0).all()
            for k in range(1, int(obj.max()) + 1):
                want = np.bincount(voc_sem[obj == k], minlength=4)[1:].argmax() + 1
                assert (sem[obj == k] == want).all()
            assert len(stuff) == int(background.any())  # the background: one segment
            assert [s["area"] for s in segs] == [int((ids == s["id"]).sum()) for s in segs]
        r = pq_compute(gt_json, gt_json, workers=1)
        present = {s["category_id"] for a in data["annotations"] for s in a["segments_info"]}
        for name, group in (("All", present), ("Things", present - {0}), ("Stuff", present & {0})):
            assert r[name] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": len(group)}
        assert r["Things"]["n"] >= 1 and r["Stuff"]["n"] == 1
        assert sum(r["per_class"][c]["tp"] for c in (1, 2, 3)) == n_things
        things_per_split[split] = n_things
    return things_per_split


def test_panoptic_files_match_voc(source, tmp_path):
    out = run_importer("histolytics", tmp_path / "h", source=source, crop=40)
    per_split = check_panoptic(out)
    assert per_split["train"] > 0 and per_split["val"] > 0
    # the mixed nucleus (instance 23, in the first crop) is its majority type, connective
    ids = read_panoptic_png(out / "annotations/panoptic_train/hgsc_y0000_x0000.png")
    segs = json.loads((out / "annotations/panoptic_train.json").read_text())["annotations"][0]["segments_info"]
    inst = np.load(source / "hgsc_nest_inst_mask.npz")["nuc_raster"]
    (sid,) = np.unique(ids[(inst[:40, :40] == 23) & (ids > 0)])
    assert next(s["category_id"] for s in segs if s["id"] == sid) == 1
    assert (ids[38:40, 0:3] == 0).all()  # type pixels without instance: VOID


def test_separate_touching_keeps_whole_nuclei(source, tmp_path):
    """Gaps are cut into the semantic PNGs only; the panoptic segments keep every pixel."""
    a = run_importer("histolytics", tmp_path / "a", source=source, crop=40)
    b = run_importer("histolytics", tmp_path / "b", source=source, crop=40, separate_touching=True)
    name = "annotations/panoptic_train/hgsc_y0000_x0000.png"
    assert np.array_equal(read_panoptic_png(a / name), read_panoptic_png(b / name))
    sa = np.asarray(Image.open(a / "SegmentationClass/hgsc_y0000_x0000.png"))
    sb = np.asarray(Image.open(b / "SegmentationClass/hgsc_y0000_x0000.png"))
    assert (sb != sa).any()


def test_all_or_nothing(source, tmp_path, monkeypatch):
    real = hist_module.write_coco_panoptic

    def failing(root, split, *args, **kwargs):
        if split == "val":
            raise OSError("disk full")
        return real(root, split, *args, **kwargs)

    monkeypatch.setattr(hist_module, "write_coco_panoptic", failing)
    with pytest.raises(OSError, match="disk full"):
        run_importer("histolytics", tmp_path / "h", source=source, crop=40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hsrc"]  # no dataset, no temporary folder
    monkeypatch.setattr(hist_module, "write_coco_panoptic", real)
    out = run_importer("histolytics", tmp_path / "h", source=source, crop=40)
    with pytest.raises(DataError, match="not empty"):
        run_importer("histolytics", out, source=source, crop=40)
    run_importer("histolytics", out, source=source, crop=20, overwrite=True)
    assert len(split_ids(out, "train")) + len(split_ids(out, "val")) == 16
    assert len(list((out / "annotations/panoptic_train").iterdir())) == len(split_ids(out, "train"))


@pytest.mark.skipif(importlib.util.find_spec("histolytics") is None, reason="pip install --no-deps histolytics==0.3.0")
def test_real_histolytics_panoptic(tmp_path):
    out = run_importer("histolytics", tmp_path / "h")
    per_split = check_panoptic(out)
    regions = json.loads((out / "regions.json").read_text())["regions"]
    assert per_split["train"] + per_split["val"] == sum(r["instances"] for r in regions.values())
    assert len(split_ids(out, "val")) == 6
