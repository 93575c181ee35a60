"""COCO AP checked against hand-computed values (issues 14 and 17), on both backends.

COCOeval, as used here: 10 IoU thresholds t = 0.50, 0.55, ..., 0.95; detections sorted by
score, greedily matched to an unmatched ground truth with IoU >= t; precision made
monotone (p(r) = max precision at recall >= r) and read at the 101 recalls 0, 0.01, ..., 1
(a recall never reached reads 0); AP = mean over the 101 points, then over the thresholds.
Area ranges: small < 32^2 <= medium < 96^2 <= large; -1 where a range has no ground truth.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("faster_coco_eval")

from pixelwise.data.formats.coco import annotation_from_mask, encode_rle  # noqa: E402
from pixelwise.metrics.instance import coco_evaluate  # noqa: E402

BACKENDS = ("faster_coco_eval", "pycocotools")
# spelled out here, not imported, so a swap in the library's name table fails these tests
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
H = W = 64


def _gt(masks: list[np.ndarray]) -> dict:
    return {"images": [{"id": 1, "file_name": "1.png", "height": H, "width": W}],
            "annotations": [annotation_from_mask(m, 1, 1, i + 1, encoding="rle") for i, m in enumerate(masks)],
            "categories": [{"id": 1, "name": "thing"}]}


def _det(mask: np.ndarray, score: float, bbox: list[float] | None = None) -> dict:
    ys, xs = np.nonzero(mask)
    if bbox is None:
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
    return {"image_id": 1, "category_id": 1, "score": score, "segmentation": encode_rle(mask), "bbox": bbox}


def _square(y: int, x: int, side: int = 10) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y:y + side, x:x + side] = True
    return m


def _gt_square_and_l_shape(n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """A 10 x 10 ground-truth square (100 px) and a detection mask inside it with ``n_pixels``
    pixels whose bounding box is the whole square (first row full, first column full, then
    rows filled left to right): mask IoU = n_pixels / 100, box IoU = 1."""
    gt = _square(10, 10)
    det = np.zeros((H, W), bool)
    det[10, 10:20] = True
    det[10:20, 10] = True
    det[19, 10:20] = True  # last row too, so the box spans all 10 rows and columns
    need = n_pixels - int(det.sum())
    free = np.argwhere(gt & ~det)
    for y, x in free[:need]:
        det[y, x] = True
    assert int(det.sum()) == n_pixels and (det & ~gt).sum() == 0
    return gt, det


def _metrics(values: list[float]) -> dict[str, float]:
    return dict(zip(COCO_METRIC_NAMES, values))


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_above_a_match_at_iou_075(backend):
    """One GT (100 px, 'small'), a false positive scored 0.9 and a detection scored 0.8 at
    mask IoU 75/100 = 0.75 (its box equals the GT box: box IoU 1).

    segm, thresholds t <= 0.75 (0.50 ... 0.75: 6 of 10): ranked [FP, TP] -> precision
    [0/1, 1/2], recall [0, 1]; monotone precision [1/2, 1/2]; every recall 0..1 reads 1/2
    -> AP_t = 0.5. Thresholds 0.80 ... 0.95 (4): no match, recall stays 0, recall 0 reads
    precision 0 (the FP), higher recalls are never reached -> AP_t = 0.
    AP = 6 x 0.5 / 10 = 0.3, AP50 = AP75 = 0.5, APs = AP (the GT is small), APm = APl = -1
    (no medium/large GT). AR1: only the top detection (the FP) counts -> 0. AR10 = AR100 =
    mean recall over thresholds = 6/10 = 0.6 = ARs; ARm = ARl = -1.
    bbox: box IoU 1 matches at all 10 thresholds -> AP = AP50 = AP75 = 0.5, AR10 = 1.
    """
    gt_mask, det_mask = _gt_square_and_l_shape(75)
    gt = _gt([gt_mask])
    dets = [_det(_square(40, 40), 0.9), _det(det_mask, 0.8)]
    segm = coco_evaluate(gt, dets, "segm", backend=backend)
    want = _metrics([0.3, 0.5, 0.5, 0.3, -1, -1, 0.0, 0.6, 0.6, 0.6, -1, -1])
    for k in COCO_METRIC_NAMES:
        assert segm[k] == pytest.approx(want[k], abs=1e-9), (k, segm[k], want[k])
    bbox = coco_evaluate(gt, dets, "bbox", backend=backend)
    want_box = _metrics([0.5, 0.5, 0.5, 0.5, -1, -1, 0.0, 1.0, 1.0, 1.0, -1, -1])
    for k in COCO_METRIC_NAMES:
        assert bbox[k] == pytest.approx(want_box[k], abs=1e-9), (k, bbox[k], want_box[k])


@pytest.mark.parametrize("backend", BACKENDS)
def test_segm_and_bbox_differ_and_ap50_is_not_ap75(backend):
    """One GT, one detection (score 0.9) at mask IoU 65/100 = 0.65, box IoU 1.

    segm: matched for t = 0.50, 0.55, 0.60, 0.65 (4 of 10) with precision 1 at every recall
    -> AP_t = 1 there, 0 elsewhere: AP = 0.4, AP50 = 1, AP75 = 0; AR = 0.4 (recall 1 at 4
    thresholds). bbox: matched at all thresholds: AP = AP50 = AP75 = 1, AR = 1.
    So 'always bbox' or an AP50/AP75 swap both fail here.
    """
    gt_mask, det_mask = _gt_square_and_l_shape(65)
    gt = _gt([gt_mask])
    dets = [_det(det_mask, 0.9)]
    segm = coco_evaluate(gt, dets, "segm", backend=backend)
    want = _metrics([0.4, 1.0, 0.0, 0.4, -1, -1, 0.4, 0.4, 0.4, 0.4, -1, -1])
    for k in COCO_METRIC_NAMES:
        assert segm[k] == pytest.approx(want[k], abs=1e-9), (k, segm[k], want[k])
    bbox = coco_evaluate(gt, dets, "bbox", backend=backend)
    want_box = _metrics([1.0, 1.0, 1.0, 1.0, -1, -1, 1.0, 1.0, 1.0, 1.0, -1, -1])
    for k in COCO_METRIC_NAMES:
        assert bbox[k] == pytest.approx(want_box[k], abs=1e-9), (k, bbox[k], want_box[k])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_no_detections_matches_cocoeval(backend, iou_type):
    """No detections: COCOeval gives 0 for every AP/AR whose area range has ground truth and
    -1 for the others (here: one small and one large GT, no medium one)."""
    large = np.zeros((H, W), bool)
    large[:, :40] = True
    gt = _gt([_square(50, 50), large])
    gt["annotations"][1]["area"] = 100.0 ** 2  # 'large': COCOeval ranges GT by its area field
    got = coco_evaluate(gt, [], iou_type, backend=backend)
    want = _metrics([0.0, 0.0, 0.0, 0.0, -1, 0.0, 0.0, 0.0, 0.0, 0.0, -1, 0.0])
    assert got == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_detections_and_no_ground_truth_is_all_minus_one(backend):
    gt = _gt([])
    assert coco_evaluate(gt, [], "segm", backend=backend) == _metrics([-1.0] * 12)
