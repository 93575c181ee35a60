"""COCO instance format: polygons / RLE / crowd, the reader on synthetic and real files, and the
synthetic generator's instances JSON."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from pixelwise.data.formats.coco import (  # noqa: E402
    CocoInstances, annotation_from_mask, decode_segmentation, encode_rle, find_coco_annotations, is_coco_dataset,
    mask_to_polygon, write_coco_instances,
)

LABELME_COCO = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco")
SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-panoptic-sample"


def _l_shape() -> np.ndarray:
    m = np.zeros((10, 12), bool)
    m[1:6, 2:6] = True
    m[4:8, 5:10] = True
    return m


def test_polygon_along_pixel_edges_is_exact():
    m = _l_shape()
    poly = mask_to_polygon(m)
    assert poly is not None and len(poly) % 2 == 0
    assert np.array_equal(decode_segmentation([poly], *m.shape), m)
    square = np.zeros((5, 5), bool)
    square[1:3, 2:4] = True
    assert sorted(zip(mask_to_polygon(square)[::2], mask_to_polygon(square)[1::2])) == [(2, 1), (2, 3), (4, 1), (4, 3)]


@pytest.mark.parametrize("kind", ["hole", "two_regions", "diagonal"])
def test_masks_without_a_single_polygon_fall_back_to_rle(kind):
    m = np.zeros((8, 8), bool)
    if kind == "hole":
        m[1:6, 1:6] = True
        m[3, 3] = False
    elif kind == "two_regions":
        m[1:3, 1:3] = True
        m[5:7, 5:7] = True
    else:
        m[2, 2] = m[3, 3] = True
    assert mask_to_polygon(m) is None
    ann = annotation_from_mask(m, 1, 3, 7)
    assert isinstance(ann["segmentation"], dict) and isinstance(ann["segmentation"]["counts"], str)
    assert np.array_equal(decode_segmentation(ann["segmentation"], 8, 8), m)
    assert ann["area"] == m.sum()
    with pytest.raises(ValueError):
        annotation_from_mask(m, 1, 3, 7, encoding="polygon")


def test_annotation_fields_and_uncompressed_rle():
    m = _l_shape()
    ann = annotation_from_mask(m, image_id=5, category_id=2, ann_id=9)
    assert isinstance(ann["segmentation"], list)
    assert ann["bbox"] == [2.0, 1.0, 8.0, 7.0] and ann["area"] == float(m.sum()) and ann["iscrowd"] == 0
    crowd = annotation_from_mask(m, 5, 2, 10, iscrowd=1)
    assert isinstance(crowd["segmentation"], dict) and crowd["iscrowd"] == 1
    # uncompressed RLE: column-major run lengths starting with background
    flat = m.flatten(order="F").astype(int)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    assert np.array_equal(decode_segmentation({"size": list(m.shape), "counts": runs}, *m.shape), m)
    assert np.array_equal(decode_segmentation(encode_rle(m), *m.shape), m)


def test_rle_encoder_matches_pycocotools():
    import pycocotools.mask as cm

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (64, 80), (300, 257)]:
        for p in (0.0, 0.02, 0.5, 1.0):
            m = rng.uniform(size=shape) < p
            if p == 0.5:  # long runs too
                m[: shape[0] // 2] = True
            ref = cm.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode("ascii")
            assert encode_rle(m)["counts"] == ref, (shape, p)


def test_synthetic_generator_writes_coco_instances(tmp_path):
    from pixelwise.data.synthetic import generate_shapes, iter_shapes

    root = generate_shapes(tmp_path / "s", num_train=6, num_val=2, size=64, seed=3)
    doc = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in doc["categories"]] == [3, 4, 5]
    kinds = {type(a["segmentation"]).__name__ for a in doc["annotations"]}
    assert "list" in kinds  # polygons (and RLE for occluded / split shapes)
    assert is_coco_dataset(root, "val") and not is_coco_dataset(tmp_path, "val")
    ds = CocoInstances(root, "train")
    assert [c.name for c in ds.classes] == ["background", "circle", "rectangle", "triangle"]
    assert ds.category_ids == [0, 3, 4, 5]
    for k, (_, sample) in enumerate(iter_shapes("train", 6, 64, 3)):
        s = ds[k]
        assert np.array_equal(s["instances"]["masks"].numpy(), sample.masks())
        assert s["instances"]["labels"].tolist() == [i.class_id - 2 for i in sample.instances]
        assert torch.equal(s["image"], torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255)
        x1, y1, w, h = sample.instances[0].bbox
        assert s["instances"]["boxes"][0].tolist() == [x1, y1, x1 + w, y1 + h]


def test_crowd_regions_are_read_and_left_out_of_training_targets(tmp_path):
    from PIL import Image

    from pixelwise.data.transforms import RandomHorizontalFlip
    from pixelwise.engine.instance import instance_collate

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    m1 = np.zeros((20, 30), bool)
    m1[2:8, 3:9] = True
    m2 = np.zeros((20, 30), bool)
    m2[10:18, 12:28] = True
    anns = [annotation_from_mask(m1, 1, 7, 1), annotation_from_mask(m2, 1, 7, 2, iscrowd=1)]
    write_coco_instances(tmp_path / "annotations" / "instances_val.json",
                         [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}], anns,
                         [{"id": 7, "name": "thing"}])
    assert find_coco_annotations(tmp_path, "val")[1] == tmp_path
    ds = CocoInstances(tmp_path, "val")
    s = ds[0]
    assert s["instances"]["iscrowd"].tolist() == [False, True]
    batch = instance_collate([s])
    assert batch["targets"][0]["labels"].tolist() == [1]
    torch.manual_seed(0)
    flipped = RandomHorizontalFlip(1.0)(s)
    assert flipped["instances"]["boxes"][0].tolist() == [30 - 9, 2, 30 - 3, 8]
    assert flipped["instances"]["iscrowd"].tolist() == [False, True]


@pytest.mark.skipif(not LABELME_COCO.is_dir(), reason=f"labelme-examples not installed ({LABELME_COCO} missing; "
                                                       "apt-get install labelme-examples)")
def test_labelme_examples_real_coco_file():
    ds = CocoInstances(LABELME_COCO / "annotations.json")
    assert len(ds) == 3
    assert ds.classes[0].name == "background" and "_background_" not in [c.name for c in ds.classes]
    assert len(ds.classes) == 21  # VOC's 20 object classes + background
    raw = json.loads((LABELME_COCO / "annotations.json").read_text())
    area = {a["id"]: a["area"] for a in raw["annotations"]}
    n = 0
    for i in range(len(ds)):
        s = ds[i]
        inst = s["instances"]
        assert inst["masks"].shape[1:] == s["image"].shape[1:]
        for k, ann_id in enumerate(inst["ann_ids"].tolist()):
            assert abs(int(inst["masks"][k].sum()) - area[ann_id]) <= 0.05 * area[ann_id] + 20
            n += 1
    assert n == 12
    names = {ds.classes[int(lbl)].name for i in range(len(ds)) for lbl in ds[i]["instances"]["labels"]}
    assert "person" in names


@pytest.mark.skipif(not (SHARED_SAMPLE / "panoptic_coco_detection_format.json").is_file(),
                    reason="shared COCO sample not present")
def test_real_coco_rle_with_crowd():
    ds = CocoInstances(SHARED_SAMPLE / "panoptic_coco_detection_format.json", image_root=SHARED_SAMPLE / "input_images")
    assert len(ds) == 2
    crowd = sum(int(ds[i]["instances"]["iscrowd"].sum()) for i in range(2))
    total = sum(len(ds[i]["instances"]["labels"]) for i in range(2))
    assert (crowd, total) == (3, 50)
    raw = json.loads((SHARED_SAMPLE / "panoptic_coco_detection_format.json").read_text())
    area = {a["id"]: a["area"] for a in raw["annotations"]}
    s = ds[0]
    for k, ann_id in enumerate(s["instances"]["ann_ids"].tolist()):
        assert int(s["instances"]["masks"][k].sum()) == area[ann_id]


def test_missing_files_give_clear_errors(tmp_path):
    from pixelwise.errors import DataError

    with pytest.raises(DataError, match="no COCO annotation file"):
        CocoInstances(tmp_path, "train")
    write_coco_instances(tmp_path / "x.json", [{"id": 1, "file_name": "nope.png", "height": 4, "width": 4}], [],
                         [{"id": 1, "name": "a"}])
    ds = CocoInstances(tmp_path / "x.json")
    with pytest.raises(DataError, match="not found"):
        ds[0]
