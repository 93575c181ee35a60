"""Metric rows: confusion matrix vs torchmetrics (+ the read floor), PQ vs torchmetrics (+ the
PNG decode floor, + 2 workers), mask AP with faster-coco-eval vs pycocotools."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

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


PQ_STUFF, PQ_THINGS = (1, 2, 3), (4, 5, 6)
PQ_CATEGORIES = ([{"id": c, "name": f"stuff{c}", "isthing": 0} for c in PQ_STUFF]
                 + [{"id": c, "name": f"thing{c}", "isthing": 1} for c in PQ_THINGS])


def _pq_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gt category, gt instance, pred category, pred instance) maps (size, size): three stuff
    bands with wavy borders and 5..25 overlapping thing ellipses/rectangles; the prediction is
    the scene shifted by up to 6 px with 10% of the things missed (stuff instead) and 10% of
    another thing category."""
    yy, xx = np.ogrid[0:size, 0:size]
    b1 = size * 0.35 + 12 * np.sin(xx / 37.0 + rng.uniform(0, 6))
    b2 = size * 0.70 + 10 * np.sin(xx / 23.0 + rng.uniform(0, 6))
    cat = np.where(yy < b1, 1, np.where(yy < b2, 2, 3)).astype(np.int64)
    inst = np.zeros((size, size), np.int64)
    for i in range(1, int(rng.integers(5, 26)) + 1):
        cy, cx, ry, rx = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(8, 60), rng.uniform(8, 60)
        y0, y1 = max(0, int(cy - ry)), min(size, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(size, int(cx + rx) + 1)
        ly, lx = yy[y0:y1] - cy, xx[:, x0:x1] - cx
        m = (ly / ry) ** 2 + (lx / rx) ** 2 <= 1 if rng.random() < 0.5 else (np.abs(ly) <= ry) & (np.abs(lx) <= rx)
        cat[y0:y1, x0:x1][m] = int(rng.choice(PQ_THINGS))
        inst[y0:y1, x0:x1][m] = i
    dy, dx = (int(v) for v in rng.integers(-6, 7, 2))
    pcat, pinst = np.roll(cat, (dy, dx), (0, 1)), np.roll(inst, (dy, dx), (0, 1))
    for i in np.unique(pinst)[1:]:
        r, m = rng.random(), pinst == i
        if r < 0.1:
            pcat[m], pinst[m] = 2, 0
        elif r < 0.2:
            pcat[m] = int(rng.choice(PQ_THINGS))
    return cat, inst, pcat, pinst


def _pq_ids(rng: np.random.Generator, cat: np.ndarray, inst: np.ndarray, void: np.ndarray | None):
    """COCO-like random segment ids in 1..2^24-1 (one per stuff category, one per thing
    instance), 0 = VOID, and the segments_info."""
    key = cat * 1000 + np.where(cat > len(PQ_STUFF), inst, 0)
    if void is not None:
        key[void] = 0
    present = np.flatnonzero(np.bincount(key.ravel()))
    present = present[present > 0]
    lut = np.zeros(int(key.max()) + 1, np.uint32)
    lut[present] = 1 + rng.choice((1 << 24) - 1, size=len(present), replace=False)
    segs = [{"id": int(lut[k]), "category_id": int(k // 1000), "iscrowd": 0} for k in present.tolist()]
    return lut[key], segs


def _write_pq_dataset(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """n ground-truth / prediction pairs as COCO panoptic PNG + JSON under root; the ground
    truth has a VOID band on thing borders, the prediction covers every pixel."""
    from PIL import Image

    from pixelwise.metrics.panoptic import id2rgb

    rng = np.random.default_rng(seed)
    anns: dict[str, list] = {"gt": [], "pred": []}
    for name in anns:
        (root / name).mkdir(parents=True)
    for i in range(n):
        cat, inst, pcat, pinst = _pq_scene(rng, size)
        border = (inst != np.roll(inst, 1, 0)) | (inst != np.roll(inst, 1, 1))
        for name, ids_segs in (("gt", _pq_ids(rng, cat, inst, border)), ("pred", _pq_ids(rng, pcat, pinst, None))):
            ids, segs = ids_segs
            file_name = f"{i:06d}.png"
            Image.fromarray(id2rgb(ids)).save(root / name / file_name)
            anns[name].append({"image_id": i, "file_name": file_name, "segments_info": segs})
    (root / "gt.json").write_text(json.dumps({"annotations": anns["gt"], "categories": PQ_CATEGORIES}))
    (root / "pred.json").write_text(json.dumps({"annotations": anns["pred"]}))
    return root / "gt.json", root / "pred.json"


def _timed(fn) -> tuple[float, float, float]:
    """Wall-clock, CPU (this process) and CPU (finished child processes) seconds of ``fn()``."""
    t, c = time.perf_counter(), os.times()
    fn()
    wall, d = time.perf_counter() - t, os.times()
    return wall, d.user - c.user + d.system - c.system, (d.children_user - c.children_user
                                                         + d.children_system - c.children_system)


def _torchmetrics_pq(gt_json: Path, pred_json: Path):
    """torchmetrics PanopticQuality over the same files: each PNG decoded (the same fast
    decode as pq_compute) and turned into (category, instance) pairs, one update per image,
    one torch thread."""
    from torchmetrics.detection import PanopticQuality

    from pixelwise.metrics.panoptic import _read_id_png

    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    preds = {a["image_id"]: a for a in pred["annotations"]}

    def cat_inst(path: Path, segs: list) -> torch.Tensor:
        ids = _read_id_png(path).astype(np.int64)
        sid = np.array([s["id"] for s in segs], np.int64)
        order = np.argsort(sid)
        sid, cats = sid[order], np.array([s["category_id"] for s in segs], np.int64)[order]
        pos = np.minimum(np.searchsorted(sid, ids), len(sid) - 1)
        known = sid[pos] == ids  # VOID -> category 0, which torchmetrics maps to its void colour
        return torch.from_numpy(np.stack([np.where(known, cats[pos], 0), np.where(known, pos + 1, 0)], -1))[None]

    m = PanopticQuality(things=set(PQ_THINGS), stuffs=set(PQ_STUFF))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker, as pq_compute's
    try:
        for a in gt["annotations"]:
            p = preds[a["image_id"]]
            m.update(cat_inst(pred_json.with_suffix("") / p["file_name"], p["segments_info"]),
                     cat_inst(gt_json.with_suffix("") / a["file_name"], a["segments_info"]))
    finally:
        torch.set_num_threads(threads)
    return m


def pq_rows() -> list[Row]:
    """pq_compute on 200 COCO panoptic pairs of 512x512 on disk: 1 worker vs torchmetrics
    PanopticQuality, vs the floor of only decoding the PNGs to ids (1 worker), and 2 workers
    vs 1.

    torchmetrics follows panopticapi except that it also removes the prediction's VOID from
    the union and drops false negatives that the prediction mostly leaves VOID, and has no
    crowd: the predictions here cover every pixel and nothing is crowd, where the two
    definitions coincide, so per-category TP, FP, FN and IoU sums are asserted equal."""
    from pixelwise.metrics.panoptic import _read_id_png, pq_compute, rgb2id

    n, size, reps = (40, 512, 3) if QUICK else (200, 512, 5)
    with tempfile.TemporaryDirectory() as tmp:
        gt_json, pred_json = _write_pq_dataset(Path(tmp), n, size)
        pngs = sorted(Path(tmp).glob("*/*.png"))

        def ours():
            return pq_compute(gt_json, pred_json, workers=1)

        def ours2():
            return pq_compute(gt_json, pred_json, workers=2)

        def floor():  # decode every PNG to its id map, nothing else
            for f in pngs:
                _read_id_png(f)

        def naive_decode():
            from PIL import Image

            for f in pngs:
                with Image.open(f) as im:
                    rgb2id(np.asarray(im))

        res = ours()
        assert ours2() == res  # bit-identical with any number of workers
        floor()
        naive_decode()
        # alternate the candidates rep by rep (the machine's load drifts); medians
        times: dict[str, list] = {"ours": [], "ours2": [], "floor": [], "naive": []}
        for _ in range(reps):
            for key, fn in (("ours", ours), ("floor", floor), ("ours2", ours2), ("naive", naive_decode)):
                times[key].append(_timed(fn))
        med = {k: [statistics.median(t[i] for t in v) for i in range(3)] for k, v in times.items()}
        t = time.perf_counter()
        tm = _torchmetrics_pq(gt_json, pred_json)  # about 1 s per image: one run
        t_tm = time.perf_counter() - t

    cats = sorted(PQ_THINGS) + sorted(PQ_STUFF)  # torchmetrics' order of categories
    for k, c in enumerate(cats):
        ours_c = res["per_class"][c]
        assert (ours_c["tp"], ours_c["fp"], ours_c["fn"]) == (int(tm.true_positives[k]), int(tm.false_positives[k]),
                                                              int(tm.false_negatives[k])), (c, ours_c)
        # torchmetrics divides int tensors: each IoU is float32 (7 digits)
        assert abs(ours_c["iou_sum"] - float(tm.iou_sum[k])) <= 1e-6 * max(1, ours_c["tp"]), (c, ours_c)
    pq_tm = float(tm.compute())
    assert abs(res["All"]["pq"] - pq_tm) < 1e-6, (res["All"], pq_tm)  # torchmetrics' RQ is float32

    (a, a_cpu, _), (f, f_cpu, _), (nv, _, _) = med["ours"], med["floor"], med["naive"]
    b2, _, b2_children = med["ours2"]
    what = f"PQ, {n} COCO panoptic pairs {size}x{size} on disk (PNG decode included): pq_compute 1 worker"
    return [
        Row(what + " vs torchmetrics PanopticQuality (1 run)", fmt_s(a), fmt_s(t_tm), ratio(a, t_tm),
            f"PQ {res['All']['pq']:.4f} vs {pq_tm:.4f}; per-category TP/FP/FN/IoU sums asserted equal; "
            "target >= 30x faster"),
        Row(what + " vs decoding the PNGs to id maps only (PIL decode + ids, 1 worker)", fmt_s(a), fmt_s(f),
            f"{a / f:.2f}x", f"CPU time {fmt_s(a_cpu)} vs {fmt_s(f_cpu)}: {a_cpu / f_cpu:.2f}x; target <= 1.5x; "
            f"np.asarray(Image.open) + rgb2id decode alone: {fmt_s(nv)}"),
        Row(f"PQ, {n} pairs {size}x{size}: pq_compute 2 workers vs 1 worker", fmt_s(b2), fmt_s(a),
            ratio(b2, a), f"same result asserted; ideal 2x on 2 idle cores; the workers got {b2_children / b2:.2f} cores "
            f"on average (their CPU time {fmt_s(b2_children)} / wall)"),
    ]


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
