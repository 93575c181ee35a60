"""COCO mask/box AP: faster-coco-eval gives pycocotools' 12 numbers on a non-trivial case
(several images, crowd regions, many scores, false positives, duplicates, wrong classes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("faster_coco_eval")

from pixelwise.data.formats.coco import annotation_from_mask, decode_segmentation, encode_rle  # noqa: E402
from pixelwise.metrics import coco_evaluate  # noqa: E402
from pixelwise.metrics.instance import COCO_METRIC_NAMES, detections_to_coco, write_coco_results  # noqa: E402

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-panoptic-sample"


def _synthetic_gt(n_images: int = 6, seed: int = 0) -> dict:
    """Several images of random rectangles/disks of 3 categories, all three COCO area ranges,
    and a crowd region in every other image."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    yy, xx = np.mgrid[0:160, 0:200]
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "height": 160, "width": 200})
        for _ in range(int(rng.integers(3, 8))):
            size = int(rng.choice([5, 12, 60]))  # small (< 32^2), medium, large (> 96^2) areas
            cy, cx = int(rng.integers(size, 160 - size)), int(rng.integers(size, 200 - size))
            if rng.uniform() < 0.5:
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= size ** 2
            else:
                m = (abs(yy - cy) <= size) & (abs(xx - cx) <= int(size * rng.uniform(0.5, 1.5)))
            anns.append(annotation_from_mask(m, i, int(rng.integers(1, 4)), len(anns) + 1))
        if i % 2 == 0:
            crowd = np.zeros((160, 200), bool)
            crowd[120:155, 10:80] = True
            anns.append(annotation_from_mask(crowd, i, 1, len(anns) + 1, iscrowd=1))
    return {"images": images, "annotations": anns,
            "categories": [{"id": k, "name": f"c{k}"} for k in (1, 2, 3)]}


def _perturbed_detections(gt: dict, seed: int = 1) -> list[dict]:
    """Shifted/eroded copies of the ground truth with random scores, plus duplicates, wrong
    classes, detections inside crowd regions and pure false positives."""
    rng = np.random.default_rng(seed)
    size = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    dets = []

    def add(image_id, cat, mask, score):
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            return
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        dets.append({"image_id": image_id, "category_id": cat, "score": float(score), "segmentation": encode_rle(mask),
                     "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})

    for a in gt["annotations"]:
        h, w = size[a["image_id"]]
        m = decode_segmentation(a["segmentation"], h, w)
        if a["iscrowd"]:
            part = np.zeros_like(m)
            part[125:140, 20:40] = True
            add(a["image_id"], a["category_id"], part & m, rng.uniform(0.3, 1.0))  # inside a crowd: ignored
            continue
        if rng.uniform() < 0.15:
            continue  # missed
        shifted = np.roll(m, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        add(a["image_id"], a["category_id"], shifted, rng.uniform(0.2, 1.0))
        if rng.uniform() < 0.3:  # duplicate with a lower score
            add(a["image_id"], a["category_id"], np.roll(m, 2, axis=1), rng.uniform(0.0, 0.5))
        if rng.uniform() < 0.2:  # wrong class
            add(a["image_id"], a["category_id"] % 3 + 1, m, rng.uniform(0.0, 1.0))
    for im in gt["images"]:  # false positives
        h, w = size[im["id"]]
        for _ in range(3):
            m = np.zeros((h, w), bool)
            y, x = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
            m[y:y + int(rng.integers(3, 20)), x:x + int(rng.integers(3, 20))] = True
            add(im["id"], int(rng.integers(1, 4)), m, rng.uniform(0.0, 0.9))
    return dets


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_faster_coco_eval_equals_pycocotools_synthetic(iou_type):
    gt = _synthetic_gt()
    dets = _perturbed_detections(gt)
    assert sum(a["iscrowd"] for a in gt["annotations"]) >= 3 and len(dets) > 40
    fast = coco_evaluate(gt, dets, iou_type, backend="faster_coco_eval")
    ref = coco_evaluate(gt, dets, iou_type, backend="pycocotools")
    assert list(fast) == list(COCO_METRIC_NAMES)
    for k in COCO_METRIC_NAMES:
        assert fast[k] == pytest.approx(ref[k], abs=1e-12), (k, fast[k], ref[k])
    assert 0.1 < fast["AP"] < 0.9 and 0.1 < fast["APs"] and 0.1 < fast["APl"]  # non-trivial


@pytest.mark.skipif(not (SHARED_SAMPLE / "panoptic_coco_detection_format.json").is_file(),
                    reason="shared COCO sample not present")
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_faster_coco_eval_equals_pycocotools_real_coco(iou_type):
    gt = json.loads((SHARED_SAMPLE / "panoptic_coco_detection_format.json").read_text())
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 3
    dets = _perturbed_detections(gt, seed=5)
    fast = coco_evaluate(gt, dets, iou_type, backend="faster_coco_eval")
    ref = coco_evaluate(gt, dets, iou_type, backend="pycocotools")
    for k in COCO_METRIC_NAMES:
        assert fast[k] == pytest.approx(ref[k], abs=1e-12), (k, fast[k], ref[k])
    assert 0.05 < fast["AP"] < 0.95


def test_perfect_detections_score_one_and_zero_ids_are_renumbered(tmp_path):
    gt = _synthetic_gt(3, seed=4)
    for i, a in enumerate(gt["annotations"]):
        a["id"] = i  # labelme writes id 0; COCOeval would take a match with id 0 for 'unmatched'
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0 - 0.01 * k,
             "segmentation": a["segmentation"] if isinstance(a["segmentation"], dict)
             else encode_rle(decode_segmentation(a["segmentation"], 160, 200)), "bbox": a["bbox"]}
            for k, a in enumerate(gt["annotations"]) if not a["iscrowd"]]
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    write_coco_results(res_path, dets)
    for backend in ("faster_coco_eval", "pycocotools"):
        m = coco_evaluate(gt_path, res_path, "segm", backend=backend)
        assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0), backend
    assert coco_evaluate(gt, [], "segm")["AP"] == 0.0


def test_detections_to_coco_writes_rle_and_category_ids():
    import torch

    masks = torch.zeros(2, 1, 10, 12)
    masks[0, 0, 2:5, 3:7] = 0.9
    masks[1, 0, 6:9, 1:4] = 0.4  # below the 0.5 threshold: empty mask
    out = {"boxes": torch.tensor([[3.0, 2, 7, 5], [1, 6, 4, 9]]), "scores": torch.tensor([0.9, 0.3]),
           "labels": torch.tensor([2, 1]), "masks": masks}
    res = detections_to_coco(42, out, [0, 11, 22])
    assert [r["category_id"] for r in res] == [22, 11]
    assert res[0]["bbox"] == [3.0, 2.0, 4.0, 3.0] and res[0]["image_id"] == 42
    assert decode_segmentation(res[0]["segmentation"], 10, 12).sum() == 12
    assert decode_segmentation(res[1]["segmentation"], 10, 12).sum() == 0
    json.dumps(res)
