"""Metric rows: confusion matrix vs torchmetrics (+ the read floor), PQ vs torchmetrics (+ the
PNG decode floor), mask AP with faster-coco-eval vs pycocotools."""
from __future__ import annotations

import io

import numpy as np
import torch

from bench.common import QUICK, Row, fmt_s, ratio, side_by_side


def confusion_rows() -> list[Row]:
    from torchmetrics.classification import MulticlassJaccardIndex

    from pixelwise.metrics.semantic import ConfusionMatrix

    n, c = (40 if QUICK else 200), 21
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, c, (n, 512, 512), generator=g)
    pred = torch.where(torch.rand(n, 512, 512, generator=g) < 0.7, target, torch.randint(0, c, (n, 512, 512), generator=g))
    target[:, :8] = 255  # an ignored border

    def ours():
        cm = ConfusionMatrix(c, ignore_index=255)
        for p, t in zip(pred, target):
            cm.update(p, t)
        return cm.compute()["iou"]

    def ref():
        m = MulticlassJaccardIndex(num_classes=c, average=None, ignore_index=255)
        for p, t in zip(pred, target):
            m.update(p[None], t[None])
        return m.compute()

    np.testing.assert_allclose(np.asarray(ours(), float), ref().numpy(), rtol=1e-5, atol=1e-6)

    def floor():  # read both tensors once
        s = 0
        for p, t in zip(pred, target):
            s += int(p.sum()) + int(t.sum())
        return s

    a, b = side_by_side(ours, ref, reps=3)
    _, f = side_by_side(ours, floor, reps=3)
    what = f"ConfusionMatrix, {n} x 512x512, 21 classes"
    return [Row(what + " vs torchmetrics MulticlassJaccardIndex", fmt_s(a), fmt_s(b), ratio(a, b), "same IoUs asserted"),
            Row(what + " vs reading the two tensors once", fmt_s(a), fmt_s(f), ratio(a, f))]


def _panoptic_pair(rng: np.random.Generator, h: int = 256, w: int = 256):
    """A ground-truth id map with segments and a prediction that moves/mislabels some."""
    cat = np.zeros((h, w), np.int64)  # stuff 1 (top), 2 (bottom)
    cat[h // 2:] = 2
    cat[: h // 2] = 1
    inst = np.zeros((h, w), np.int64)
    k = int(rng.integers(3, 8))
    for i in range(1, k + 1):
        y, x, s = rng.integers(0, h - 40), rng.integers(0, w - 40), rng.integers(10, 40)
        cat[y:y + s, x:x + s] = 3 + int(rng.integers(0, 2))
        inst[y:y + s, x:x + s] = i
    pcat, pinst = cat.copy(), inst.copy()
    dy, dx = rng.integers(-4, 5, 2)
    pcat = np.roll(pcat, (dy, dx), (0, 1))
    pinst = np.roll(pinst, (dy, dx), (0, 1))
    return (cat, inst), (pcat, pinst)


def _ids(cat, inst):
    ids = cat * 1000 + inst
    segs = [{"id": int(v), "category_id": int(v // 1000), "iscrowd": 0} for v in np.unique(ids) if v]
    return ids, segs


def pq_rows() -> list[Row]:
    from PIL import Image
    from torchmetrics.detection import PanopticQuality

    from pixelwise.metrics.panoptic import PQStat, id2rgb, pq_single_image, rgb2id

    n = 40 if QUICK else 200
    rng = np.random.default_rng(0)
    pairs = [_panoptic_pair(rng) for _ in range(n)]
    cats = [{"id": 1, "isthing": 0}, {"id": 2, "isthing": 0}, {"id": 3, "isthing": 1}, {"id": 4, "isthing": 1}]
    pngs = []
    for (gc, gi), (pc, pi) in pairs:
        gids, gsegs = _ids(gc, gi)
        pids, psegs = _ids(pc, pi)
        enc = []
        for ids in (gids, pids):
            buf = io.BytesIO()
            Image.fromarray(id2rgb(ids)).save(buf, format="PNG")
            enc.append(buf.getvalue())
        pngs.append((enc, gsegs, psegs))

    def ours():  # decode the PNGs, then count (what pq_compute does per image)
        stat = PQStat()
        for (g, p), gsegs, psegs in pngs:
            gids = rgb2id(np.asarray(Image.open(io.BytesIO(g))))
            pids = rgb2id(np.asarray(Image.open(io.BytesIO(p))))
            stat += pq_single_image(gids, gsegs, pids, psegs, cats)
        return stat.pq_average(cats)["pq"]

    def ref():
        m = PanopticQuality(things={3, 4}, stuffs={1, 2}, allow_unknown_preds_category=True)
        for (g, p), _, _ in pngs:
            gids = rgb2id(np.asarray(Image.open(io.BytesIO(g)))).astype(np.int64)
            pids = rgb2id(np.asarray(Image.open(io.BytesIO(p)))).astype(np.int64)
            t = torch.from_numpy(np.stack([gids // 1000, gids % 1000], -1))[None]
            q = torch.from_numpy(np.stack([pids // 1000, pids % 1000], -1))[None]
            m.update(q, t)
        return float(m.compute())

    def floor():
        for (g, p), _, _ in pngs:
            np.asarray(Image.open(io.BytesIO(g)))
            np.asarray(Image.open(io.BytesIO(p)))

    pq_a, pq_b = ours(), ref()
    same = abs(pq_a * (100 if pq_a <= 1 else 1) - pq_b * 100) < 1e-3 or abs(pq_a - pq_b) < 1e-5
    a, b = side_by_side(ours, ref, reps=3)
    _, f = side_by_side(ours, floor, reps=3)
    what = f"PQ, {n} panoptic images 256x256 (PNG decode included)"
    return [Row(what + " vs torchmetrics PanopticQuality", fmt_s(a), fmt_s(b), ratio(a, b),
                f"PQ {pq_a:.4f} vs {pq_b:.4f}" + ("" if same else " (DIFFER)")),
            Row(what + " vs PNG decode floor", fmt_s(a), fmt_s(f), f"{a / f:.2f}x")]


def mask_ap_rows() -> list[Row]:
    from pycocotools import mask as mask_util

    from pixelwise.metrics.instance import coco_evaluate

    n = 50 if QUICK else 200
    rng = np.random.default_rng(0)
    images, anns, dets = [], [], []
    for i in range(n):
        images.append({"id": i + 1, "width": 128, "height": 128})
        for k in range(int(rng.integers(2, 6))):
            m = np.zeros((128, 128), np.uint8, order="F")
            y, x, s = rng.integers(0, 90), rng.integers(0, 90), rng.integers(8, 38)
            m[y:y + s, x:x + s] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            cat = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "segmentation": rle,
                         "area": float(m.sum()), "bbox": [float(x), float(y), float(s), float(s)], "iscrowd": 0})
            for _ in range(2):
                d = np.roll(m, tuple(rng.integers(-5, 6, 2)), (0, 1))
                r = mask_util.encode(np.asfortranarray(d))
                r["counts"] = r["counts"].decode()
                dets.append({"image_id": i + 1, "category_id": cat if rng.random() < 0.8 else 1 + cat % 3,
                             "segmentation": r, "score": float(rng.random())})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    ra = coco_evaluate(gt, dets, "segm", backend="faster_coco_eval")
    rb = coco_evaluate(gt, dets, "segm", backend="pycocotools")
    k = next(iter(ra))
    same = all(abs(ra[key] - rb[key]) < 1e-4 for key in ra)
    a, b = side_by_side(lambda: coco_evaluate(gt, dets, "segm", backend="faster_coco_eval"),
                        lambda: coco_evaluate(gt, dets, "segm", backend="pycocotools"), reps=3)
    return [Row(f"Mask AP, {n} images, {len(dets)} detections: faster-coco-eval backend vs pycocotools", fmt_s(a), fmt_s(b),
                ratio(a, b), f"{k} {ra[k]:.4f} vs {rb[k]:.4f}" + ("" if same else " (DIFFER)"))]
