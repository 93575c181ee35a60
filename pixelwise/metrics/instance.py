"""COCO instance metrics (mask AP and box AP) as pycocotools' COCOeval computes them.

:func:`coco_evaluate` runs faster-coco-eval (C++ matching and accumulation) by default and
pycocotools' COCOeval with ``backend="pycocotools"``; both give the same 12 numbers (a test
checks it): AP@[.50:.05:.95], AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
(101-point interpolated precision, greedy matching by score, crowd regions matched but
neither rewarded nor punished, area ranges small < 32^2 <= medium < 96^2 <= large).
A value is -1 where COCOeval gives -1 (no ground truth in that area range), also when
there are no detections at all: then COCOeval gives 0 for every AP/AR with ground truth and
-1 for the others (pycocotools' ``loadRes`` cannot take an empty list, so an empty results
set is built the way ``loadRes`` would build it).

:func:`detections_to_coco` turns one image's model output into COCO results (bbox
[x, y, w, h], score, category_id, RLE segmentation); :func:`write_coco_results` writes
them as the results JSON both tools read.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pixelwise.errors import PixelwiseError

__all__ = ["COCO_METRIC_NAMES", "coco_evaluate", "detections_to_coco", "write_coco_results", "format_coco_metrics"]

COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""Names of COCOeval's 12 summary numbers, in ``COCOeval.stats`` order."""


def _load(obj: Any) -> Any:
    if isinstance(obj, (str, os.PathLike)):
        try:
            return json.loads(Path(obj).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PixelwiseError(f"{obj}: cannot read COCO JSON ({e})") from None
    return copy.deepcopy(obj)


def _prepare_gt(gt: dict[str, Any]) -> dict[str, Any]:
    """Annotation ids must be >= 1 (COCOeval treats a matched id 0 as 'unmatched'):
    renumber them 1..N when any is 0. Fill ``area`` where missing; COCOeval needs it."""
    anns = gt.get("annotations", [])
    if any(int(a.get("id", 0)) <= 0 for a in anns):
        for i, a in enumerate(anns, start=1):
            a["id"] = i
    for a in anns:
        if "area" not in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3]) if "bbox" in a else 0.0
        a.setdefault("iscrowd", 0)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    return gt


def coco_evaluate(gt_json: str | os.PathLike | dict[str, Any], results_json: str | os.PathLike | list[dict[str, Any]],
                  iou_type: str = "segm", backend: str = "auto",
                  img_ids: Sequence[int] | None = None) -> dict[str, float]:
    """The 12 COCO summary metrics of ``results_json`` against ``gt_json`` as a dict.

    Args:
        gt_json: a COCO instance JSON (path or loaded dict).
        results_json: a COCO results JSON (path or list of {image_id, category_id, score,
            segmentation and/or bbox}).
        iou_type: ``"segm"`` (mask AP) or ``"bbox"`` (box AP).
        backend: ``"faster_coco_eval"``, ``"pycocotools"`` (the reference) or ``"auto"``
            (faster-coco-eval when installed, else pycocotools).
        img_ids: evaluate only these images (default: every image of the ground truth).
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    gt = _prepare_gt(_load(gt_json))
    dets = _load(results_json)
    if not isinstance(dets, list):
        raise PixelwiseError("results must be a list of COCO detections")
    if backend == "auto":
        try:
            import faster_coco_eval  # noqa: F401

            backend = "faster_coco_eval"
        except ImportError:
            backend = "pycocotools"
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster as Eval
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Eval
    else:
        raise ValueError(f"backend must be 'auto', 'faster_coco_eval' or 'pycocotools', got {backend!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:  # what loadRes makes of an empty list (pycocotools' own loadRes raises IndexError)
            coco_dt = COCO()
            coco_dt.dataset = {"images": copy.deepcopy(gt.get("images", [])), "annotations": [],
                               "categories": copy.deepcopy(gt.get("categories", []))}
            coco_dt.createIndex()
        ev = Eval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(COCO_METRIC_NAMES, np.asarray(ev.stats, dtype=float)[:12])}


def detections_to_coco(image_id: Any, output: dict[str, Any], category_ids: Sequence[int],
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """COCO results of one image. ``output``: ``boxes`` (K, 4) xyxy, ``scores``, ``labels``
    (contiguous, ``category_ids[label]`` is the COCO id) and optionally ``masks`` ((K, 1, H, W)
    probabilities, or (K, H, W) bool) which are thresholded at ``mask_threshold`` and
    RLE-encoded."""
    from pixelwise.data.formats.coco import encode_rle

    boxes = np.asarray(_np(output["boxes"]), dtype=float).reshape(-1, 4)
    scores = np.asarray(_np(output["scores"]), dtype=float).reshape(-1)
    labels = np.asarray(_np(output["labels"])).reshape(-1).astype(int)
    masks = output.get("masks")
    if masks is not None:
        masks = _np(masks)
        if masks.ndim == 4:
            masks = masks[:, 0]
        if masks.dtype != bool:
            masks = masks >= mask_threshold
    res = []
    for k in range(len(scores)):
        x1, y1, x2, y2 = boxes[k].tolist()
        d = {"image_id": image_id, "category_id": int(category_ids[labels[k]]),
             "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(float(scores[k]), 5)}
        if masks is not None:
            d["segmentation"] = encode_rle(masks[k])
        res.append(d)
    return res


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def write_coco_results(path: str | os.PathLike, results: list[dict[str, Any]]) -> Path:
    """Atomically write a COCO results JSON."""
    from pixelwise.data.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, separators=(",", ":")) + "\n", fsync=False)
    return path


def format_coco_metrics(metrics: dict[str, float], title: str = "") -> str:
    """One line: ``title AP 0.512  AP50 0.731 ...``."""
    return (title + "  " if title else "") + "  ".join(f"{k} {metrics[k]:.3f}" for k in COCO_METRIC_NAMES if k in metrics)
