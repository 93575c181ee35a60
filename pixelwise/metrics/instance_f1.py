"""Instance-level F1 by one-to-one matching at an IoU threshold (object detection style).

Used to measure what U-Net's border weight map is for: separating touching objects. The
predicted instances are typically the connected components of a semantic prediction
(:func:`pixelwise.postprocess.connected_components`), the ground truth an instance map.

A predicted instance p and a ground-truth instance g MATCH when IoU(p, g) >= ``threshold``;
each instance is matched at most once (pairs are taken greedily by decreasing IoU; at
thresholds >= 0.5 a match is unique anyway, as in PQ). Then, summed over all images,

    TP = matches, FP = unmatched predictions, FN = unmatched ground truth,
    precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN).

Pixels where the ground truth is ``ignore_index`` are removed from both maps first (a
prediction lying only on ignored pixels disappears). Id 0 is "no instance" in both maps.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["instance_f1", "match_instances"]

ArrayLike = np.ndarray | torch.Tensor


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def match_instances(pred: ArrayLike, gt: ArrayLike, threshold: float = 0.5,
                    ignore_index: int | None = 255) -> dict[str, Any]:
    """Match the instances of one image: ``{"tp", "fp", "fn", "ious"}`` (IoUs of the matches)."""
    p, g = _np(pred).astype(np.int64), _np(gt).astype(np.int64)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in size")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    keep = np.ones(g.shape, bool) if ignore_index is None else g != ignore_index
    p, g = p[keep], g[keep]
    p_ids, p_idx = np.unique(p, return_inverse=True)  # index 0 is id 0 when present
    g_ids, g_idx = np.unique(g, return_inverse=True)
    p_has0 = p_ids.size > 0 and p_ids[0] == 0
    g_has0 = g_ids.size > 0 and g_ids[0] == 0
    n_p, n_g = p_ids.size, g_ids.size
    joint = np.bincount(g_idx * n_p + p_idx, minlength=n_g * n_p).reshape(n_g, n_p)
    area_g, area_p = joint.sum(1), joint.sum(0)
    # drop the "no instance" rows/columns
    joint = joint[int(g_has0):, int(p_has0):]
    area_g, area_p = area_g[int(g_has0):], area_p[int(p_has0):]
    num_g, num_p = joint.shape
    if num_g == 0 or num_p == 0:
        return {"tp": 0, "fp": num_p, "fn": num_g, "ious": []}
    iou = joint / (area_g[:, None] + area_p[None, :] - joint)
    gi, pi = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[gi, pi], kind="stable")
    used_g, used_p, ious = set(), set(), []
    for k in order:
        a, b = int(gi[k]), int(pi[k])
        if a in used_g or b in used_p:
            continue
        used_g.add(a)
        used_p.add(b)
        ious.append(float(iou[a, b]))
    tp = len(ious)
    return {"tp": tp, "fp": num_p - tp, "fn": num_g - tp, "ious": ious}


def instance_f1(pred: ArrayLike | Sequence[ArrayLike], gt: ArrayLike | Sequence[ArrayLike],
                threshold: float = 0.5, ignore_index: int | None = 255) -> dict[str, Any]:
    """Instance precision, recall and F1 at IoU ``threshold`` of one image or, given lists,
    of a whole set (counts summed over images).

    Args:
        pred, gt: (H, W) instance id maps (0 = none), or equally long lists of them.

    Returns:
        ``{"tp", "fp", "fn", "precision", "recall", "f1", "mean_matched_iou", "threshold",
        "num_pred", "num_gt"}``; a ratio with a zero denominator is NaN (F1 is 1 when there
        is nothing to find and nothing was found).
    """
    if isinstance(pred, (list, tuple)) != isinstance(gt, (list, tuple)):
        raise TypeError("pass two maps or two lists of maps")
    preds = list(pred) if isinstance(pred, (list, tuple)) else [pred]
    gts = list(gt) if isinstance(gt, (list, tuple)) else [gt]
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth maps")
    tp = fp = fn = 0
    ious: list[float] = []
    for p, g in zip(preds, gts):
        r = match_instances(p, g, threshold, ignore_index)
        tp, fp, fn = tp + r["tp"], fp + r["fp"], fn + r["fn"]
        ious.extend(r["ious"])
    return summarize_counts(tp, fp, fn, ious, threshold)


def summarize_counts(tp: int, fp: int, fn: int, ious: Sequence[float] = (), threshold: float = 0.5) -> dict[str, Any]:
    """Precision / recall / F1 from summed counts (see :func:`instance_f1`)."""
    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    f1 = ratio(2 * tp, 2 * tp + fp + fn) if (tp + fp + fn) > 0 else 1.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "f1": f1, "mean_matched_iou": float(np.mean(ious)) if len(ious) else math.nan,
            "threshold": threshold, "num_pred": tp + fp, "num_gt": tp + fn}
