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


def _alternate(fns: dict, reps: int) -> dict[str, tuple[float, float, float]]:
    """Medians of (wall, CPU of this process, CPU of finished children) over ``reps`` rounds,
    each round running every candidate once, in a rotating order (the load drifts)."""
    keys = list(fns)
    times: dict[str, list] = {k: [] for k in keys}
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[k].append(_timed(fns[k]))
    return {k: tuple(statistics.median(t[i] for t in v) for i in range(3)) for k, v in times.items()}


def confusion_rows() -> list[Row]:
    """ConfusionMatrix.update per image on 200 label maps 512x512 (21 classes, an ignored
    border of 255) vs torchmetrics MulticlassJaccardIndex, vs the plain uint8-key bincount
    (``np.bincount(t.astype(np.int32) * C + p)``, no checks), vs reading both maps once;
    uint8 maps (PNG labels) and int64 maps (what the evaluation loop passes)."""
    from torchmetrics.classification import MulticlassJaccardIndex

    from pixelwise.metrics.semantic import ConfusionMatrix

    n, c, reps = (40, 21, 3) if QUICK else (200, 21, 5)
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, c, (n, 512, 512), generator=g, dtype=torch.uint8)
    noise = torch.randint(0, c, (n, 512, 512), generator=g, dtype=torch.uint8)
    pred = torch.where(torch.rand(n, 512, 512, generator=g) < 0.7, target, noise)
    target[:, :8] = 255  # an ignored border
    maps = {"uint8": (pred, target), "int64": (pred.long(), target.long())}

    def ours(p_all, t_all):
        cm = ConfusionMatrix(c, ignore_index=255)
        for p, t in zip(p_all, t_all):
            cm.update(p, t)
        return cm.matrix

    def plain(p_all, t_all):  # the textbook one-liner: no range checks, ignore by slicing
        m = np.zeros(c * c, np.int64)
        for p, t in zip(p_all.numpy(), t_all.numpy()):
            m += np.bincount((t.astype(np.int32) * c + p).ravel(), minlength=c * c)[:c * c]
        return m.reshape(c, c)

    def ref(p_all, t_all):
        m = MulticlassJaccardIndex(num_classes=c, average=None, ignore_index=255)
        for p, t in zip(p_all, t_all):
            m.update(p[None].long(), t[None].long())
        return m.compute()

    def floor(p_all, t_all):  # read both maps once
        s = 0
        for p, t in zip(p_all, t_all):
            s += int(p.sum()) + int(t.sum())
        return s

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchmetrics' OpenMP regions stall on a busy machine; ours and numpy are serial
    try:
        return _confusion_rows(n, c, reps, maps, ours, plain, ref, floor)
    finally:
        torch.set_num_threads(threads)


def _confusion_rows(n, c, reps, maps, ours, plain, ref, floor) -> list[Row]:
    from pixelwise.metrics.semantic import ConfusionMatrix

    for p_all, t_all in maps.values():
        counts = ours(p_all, t_all)
        assert np.array_equal(counts.numpy(), plain(p_all, t_all))  # equal counts
        iou = ConfusionMatrix(c)
        iou.load_state_dict({"matrix": counts})
        np.testing.assert_allclose(np.asarray(iou.compute()["iou"], float), ref(p_all, t_all).numpy(), rtol=1e-5,
                                   atol=1e-6)
    rows = []
    for dtype, (p_all, t_all) in maps.items():
        fns = {"ours": lambda: ours(p_all, t_all), "plain": lambda: plain(p_all, t_all),
               "floor": lambda: floor(p_all, t_all)}
        if dtype == "uint8":
            fns["tm"] = lambda: ref(p_all, t_all)
        med = _alternate(fns, reps)
        a = med["ours"][0]
        what = f"ConfusionMatrix, {n} x 512x512 {dtype} maps, 21 classes, ignore 255"
        if dtype == "uint8":
            tm = med["tm"][0]
            rows.append(Row(what + " vs torchmetrics MulticlassJaccardIndex (1 torch thread)", fmt_s(a), fmt_s(tm),
                            ratio(a, tm), "same IoUs asserted; target >= 5x faster"))
        pl = med["plain"][0]
        rows.append(Row(what + " vs the plain bincount np.bincount(t.astype(int32) * C + p) (no checks)", fmt_s(a),
                        fmt_s(pl), ratio(a, pl), "same counts asserted; target <= 1.0x"
                        + ("" if dtype == "uint8" else "; the evaluation loop passes int64 maps")))
        f = med["floor"][0]
        rows.append(Row(what + " vs reading the two maps once", fmt_s(a), fmt_s(f), f"{a / f:.2f}x"))
    return rows


PQ_STUFF, PQ_THINGS = (1, 2, 3), (4, 5, 6)
PQ_CATEGORIES = ([{"id": c, "name": f"stuff{c}", "isthing": 0} for c in PQ_STUFF]
                 + [{"id": c, "name": f"thing{c}", "isthing": 1} for c in PQ_THINGS])


def _pq_scene(rng: np.random.Generator, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                              np.ndarray]:
    """(gt category, gt instance, pred category, pred instance) maps (h, w): three stuff
    bands with wavy borders and 5..25 overlapping thing ellipses/rectangles; the prediction is
    the scene shifted by up to 6 px with 10% of the things missed (stuff instead) and 10% of
    another thing category."""
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.ogrid[0:h, 0:w]
    b1 = h * 0.35 + 12 * np.sin(xx / 37.0 + rng.uniform(0, 6))
    b2 = h * 0.70 + 10 * np.sin(xx / 23.0 + rng.uniform(0, 6))
    cat = np.where(yy < b1, 1, np.where(yy < b2, 2, 3)).astype(np.int64)
    inst = np.zeros((h, w), np.int64)
    for i in range(1, int(rng.integers(5, 26)) + 1):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 60), rng.uniform(8, 60)
        y0, y1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
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
    area = np.bincount(key.ravel())
    segs = [{"id": int(lut[k]), "category_id": int(k // 1000), "iscrowd": 0, "area": int(area[k])}
            for k in present.tolist()]
    return lut[key], segs


def _write_pq_dataset(root: Path, n: int, size: int | tuple[int, int], seed: int = 0) -> tuple[Path, Path]:
    """n ground-truth / prediction pairs as COCO panoptic PNG + JSON under root; the ground
    truth has a VOID band on thing borders, the prediction covers every pixel."""
    from PIL import Image

    from pixelwise.data.formats.coco_panoptic import id2rgb

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

    from pixelwise.data.formats.coco_panoptic import read_panoptic_png as _read_id_png

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


_OFFSET = 256 ** 3


def _panopticapi_single_core(args: tuple) -> dict:
    """panopticapi's ``pq_compute_single_core``, step for step (its algorithm, rewritten here:
    panopticapi is not on PyPI): PIL decode + ``rgb2id`` in uint32, ``np.unique`` for the
    areas and for the (gt, pred) intersections over ``gt * 2^24 + pred`` in uint64, then
    Python loops over the pairs and segments. Ground-truth areas come from the JSON
    ``area`` (as in panopticapi), which the bench data carries. Returns {category: [tp, fp,
    fn, iou_sum]}."""
    from PIL import Image

    pairs, gt_folder, pred_folder, categories = args
    stat: dict = {}

    def cat(c):
        return stat.setdefault(c, [0, 0, 0, 0.0])

    for gt_ann, pred_ann in pairs:
        pan_gt = np.array(Image.open(gt_folder / gt_ann["file_name"]), dtype=np.uint32)
        pan_gt = pan_gt[:, :, 0] + 256 * pan_gt[:, :, 1] + 256 * 256 * pan_gt[:, :, 2]
        pan_pred = np.array(Image.open(pred_folder / pred_ann["file_name"]), dtype=np.uint32)
        pan_pred = pan_pred[:, :, 0] + 256 * pan_pred[:, :, 1] + 256 * 256 * pan_pred[:, :, 2]
        gt_segms = {el["id"]: dict(el) for el in gt_ann["segments_info"]}
        pred_segms = {el["id"]: dict(el) for el in pred_ann["segments_info"]}
        labels, labels_cnt = np.unique(pan_pred, return_counts=True)
        for label, label_cnt in zip(labels, labels_cnt):
            if label == 0:
                continue
            pred_segms[label]["area"] = label_cnt
            assert pred_segms[label]["category_id"] in categories
        pan_gt_pred = pan_gt.astype(np.uint64) * _OFFSET + pan_pred.astype(np.uint64)
        gt_pred_map = {}
        labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
        for label, intersection in zip(labels, labels_cnt):
            gt_pred_map[(label // _OFFSET, label % _OFFSET)] = intersection
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in gt_pred_map.items():
            if gt_label not in gt_segms or pred_label not in pred_segms:
                continue
            if gt_segms[gt_label]["iscrowd"] == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - intersection
                     - gt_pred_map.get((0, pred_label), 0))
            iou = intersection / union
            if iou > 0.5:
                s = cat(gt_segms[gt_label]["category_id"])
                s[0] += 1
                s[3] += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd_labels_dict = {}
        for gt_label, gt_info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt_info["iscrowd"] == 1:
                crowd_labels_dict[gt_info["category_id"]] = gt_label
                continue
            cat(gt_info["category_id"])[2] += 1
        for pred_label, pred_info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            intersection = gt_pred_map.get((0, pred_label), 0)
            if pred_info["category_id"] in crowd_labels_dict:
                intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
            if intersection / pred_info["area"] > 0.5:
                continue
            cat(pred_info["category_id"])[1] += 1
    return stat


def _panopticapi_pool(gt_json: Path, pred_json: Path, processes: int) -> dict:
    """panopticapi's ``pq_compute_multi_core``: the matched annotations split into one block
    per process (``np.array_split``), a ``multiprocessing.Pool`` of that many processes
    started per call, the per-category counts summed."""
    import multiprocessing

    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    preds = {a["image_id"]: a for a in pred["annotations"]}
    pairs = [(a, preds[a["image_id"]]) for a in gt["annotations"]]
    categories = {c["id"]: c for c in gt["categories"]}
    blocks = [pairs[b[0]:b[-1] + 1] for b in np.array_split(np.arange(len(pairs)), processes) if len(b)]
    with multiprocessing.get_context().Pool(processes) as pool:
        parts = pool.map(_panopticapi_single_core, [(b, gt_json.with_suffix(""), pred_json.with_suffix(""), categories)
                                                    for b in blocks])
    total: dict = {}
    for part in parts:
        for c, v in part.items():
            t = total.setdefault(c, [0, 0, 0, 0.0])
            for i in range(4):
                t[i] += v[i]
    return total


def _pq_size_rows(n: int, size: tuple[int, int], reps: int, with_torchmetrics: bool) -> list[Row]:
    import pixelwise.data.formats.coco_panoptic as fmt
    from pixelwise.metrics import panoptic
    from pixelwise.metrics.panoptic import pq_compute, rgb2id

    procs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        gt_json, pred_json = _write_pq_dataset(Path(tmp), n, size)
        pngs = sorted(Path(tmp).glob("*/*.png"))
        libpng = fmt._libpng_decode

        def floor_pil():  # decode every PNG to its id map in this process, PIL (the floor)
            fmt._libpng_decode = False
            try:
                for f in pngs:
                    fmt.read_panoptic_png(f)
            finally:
                fmt._libpng_decode = libpng

        def floor_libpng():  # the same with the libpng decoder pq_compute uses
            for f in pngs:
                fmt.read_panoptic_png(f)

        def naive_decode():
            from PIL import Image

            for f in pngs:
                with Image.open(f) as im:
                    rgb2id(np.asarray(im))

        res = pq_compute(gt_json, pred_json)
        assert pq_compute(gt_json, pred_json, workers=1) == res  # bit-identical with threads and processes
        assert pq_compute(gt_json, pred_json, workers=2) == res
        api = _panopticapi_pool(gt_json, pred_json, procs)
        for c, (tp, fp, fn, iou) in api.items():
            o = res["per_class"][c]
            assert (o["tp"], o["fp"], o["fn"]) == (tp, fp, fn) and abs(o["iou_sum"] - iou) <= 1e-12 * max(1, tp), c
        fmt.read_panoptic_png(pngs[0])  # libpng looked up before timing
        threads, load = min(panoptic._default_workers(), n // panoptic._IMAGES_PER_THREAD), os.getloadavg()[0]
        med = _alternate({"default": lambda: pq_compute(gt_json, pred_json),
                          "w1": lambda: pq_compute(gt_json, pred_json, workers=1),
                          "floor": floor_pil, "floor_libpng": floor_libpng,
                          "api": lambda: _panopticapi_pool(gt_json, pred_json, procs),
                          "naive": naive_decode}, reps)
        if with_torchmetrics:
            t = time.perf_counter()
            tm = _torchmetrics_pq(gt_json, pred_json)  # about 0.3-1 s per image: one run
            t_tm = time.perf_counter() - t

    (a, a_cpu, _), (w1, w1_cpu, _) = med["default"], med["w1"]
    (f, f_cpu, _), (fl, fl_cpu, _) = med["floor"], med["floor_libpng"]
    api_t, _, api_children = med["api"]
    h, w = size
    what = f"PQ, {n} COCO panoptic pairs {w}x{h} on disk"
    rows = [
        Row(what + ": pq_compute (default: a thread per idle CPU) vs decoding the PNGs to id maps in 1 process (PIL)",
            fmt_s(a), fmt_s(f), f"{a / f:.2f}x",
            f"target <= 1.0x; the default used {threads} thread(s) (1-min load {load:.1f} on {procs} CPUs); "
            f"CPU time {fmt_s(a_cpu)} vs {fmt_s(f_cpu)} ({a_cpu / f_cpu:.2f}x); "
            f"the same floor with the libpng decoder pq_compute uses: {fmt_s(fl)} (CPU {fmt_s(fl_cpu)}); "
            f"np.asarray(Image.open) + rgb2id: {fmt_s(med['naive'][0])}"),
        Row(what + f": pq_compute (default) vs panopticapi's algorithm in its {procs}-process pool", fmt_s(a),
            fmt_s(api_t), ratio(a, api_t), f"per-category TP/FP/FN equal, IoU sums to 1e-12 (asserted); the pool's "
            f"children used {fmt_s(api_children)} CPU"),
        Row(what + ": pq_compute workers=1 (one thread) vs decoding the PNGs in 1 process (PIL)", fmt_s(w1), fmt_s(f),
            f"{w1 / f:.2f}x", f"CPU time {fmt_s(w1_cpu)} vs {fmt_s(f_cpu)} ({w1_cpu / f_cpu:.2f}x)"),
    ]
    if with_torchmetrics:
        cats = sorted(PQ_THINGS) + sorted(PQ_STUFF)  # torchmetrics' order of categories
        for k, c in enumerate(cats):
            o = res["per_class"][c]
            assert (o["tp"], o["fp"], o["fn"]) == (int(tm.true_positives[k]), int(tm.false_positives[k]),
                                                   int(tm.false_negatives[k])), (c, o)
            # torchmetrics divides int tensors: each IoU is float32 (7 digits)
            assert abs(o["iou_sum"] - float(tm.iou_sum[k])) <= 1e-6 * max(1, o["tp"]), (c, o)
        pq_tm = float(tm.compute())
        assert abs(res["All"]["pq"] - pq_tm) < 1e-6, (res["All"], pq_tm)  # torchmetrics' RQ is float32
        rows.append(Row(what + ": pq_compute (default) vs torchmetrics PanopticQuality (1 run, 1 torch thread)",
                        fmt_s(a), fmt_s(t_tm), ratio(a, t_tm), f"PQ {res['All']['pq']:.4f} vs {pq_tm:.4f}; "
                        "per-category TP/FP/FN/IoU sums asserted equal; target >= 30x faster"))
    return rows


def pq_rows() -> list[Row]:
    """pq_compute on COCO panoptic pairs on disk, 120 of 256x320 and 200 of 512x512: default
    (a thread per idle CPU) and one thread vs the floor of only decoding the PNGs to ids in one process,
    vs panopticapi's algorithm in its process pool (one process per core), and (small set)
    vs torchmetrics PanopticQuality.

    torchmetrics follows panopticapi except that it also removes the prediction's VOID from
    the union and drops false negatives that the prediction mostly leaves VOID, and has no
    crowd: the predictions here cover every pixel and nothing is crowd, where the two
    definitions coincide, so per-category TP, FP, FN and IoU sums are asserted equal."""
    sets = [(40, (256, 320), 3, True), (40, (512, 512), 3, False)] if QUICK else \
        [(120, (256, 320), 5, True), (200, (512, 512), 5, False)]
    return [r for n, size, reps, tm in sets for r in _pq_size_rows(n, size, reps, tm)]


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
