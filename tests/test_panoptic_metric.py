"""Panoptic quality (SPEC §8): hand-computed cases, properties, an independent loop-based
reference on real PNG + JSON files, the real COCO sample, and every input check."""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelwise.data.formats import coco_panoptic as fmt
from pixelwise.errors import DataError
from pixelwise.metrics import PQStat, panoptic, pq_compute, pq_single_image
from pixelwise.metrics.panoptic import format_pq_table, id2rgb, rgb2id

_REPO = Path(__file__).resolve().parents[1]
COCO = next((p for p in (_REPO / "shared", _REPO.parent / "shared")
             if (p / "data/coco-panoptic-sample/panoptic_examples.json").is_file()),
            _REPO.parent / "shared") / "data/coco-panoptic-sample"
needs_coco = pytest.mark.skipif(not (COCO / "panoptic_examples.json").is_file(), reason="COCO sample not present")


def seg(sid: int, cat: int, crowd: int = 0) -> dict:
    return {"id": sid, "category_id": cat, "iscrowd": crowd}


# ---------------------------------------------------------------------------------------
# an independent reference: SPEC §8 word for word, one boolean mask per segment
# ---------------------------------------------------------------------------------------


def ref_image(gt: np.ndarray, gt_segs: list, pred: np.ndarray, pred_segs: list, stats: dict) -> None:
    """Add one image's [tp, fp, fn, iou_sum] per category into ``stats``."""
    void = gt == 0
    gmask = {s["id"]: gt == s["id"] for s in gt_segs}
    pmask = {s["id"]: pred == s["id"] for s in pred_segs}
    g_matched, p_matched = set(), set()
    for g in gt_segs:
        if g.get("iscrowd", 0) == 1:
            continue  # crowd takes no part in matching
        for p in pred_segs:
            if p["category_id"] != g["category_id"]:
                continue
            inter = int(np.sum(gmask[g["id"]] & pmask[p["id"]]))
            # |p| + |g| - |p∩g| - |p∩void| = |p ∪ g| - |p ∩ void|
            union = int(np.sum(gmask[g["id"]] | pmask[p["id"]])) - int(np.sum(pmask[p["id"]] & void))
            if inter / union > 0.5:
                stats[g["category_id"]][0] += 1
                stats[g["category_id"]][3] += inter / union
                g_matched.add(g["id"])
                p_matched.add(p["id"])
    for g in gt_segs:
        if g["id"] not in g_matched and g.get("iscrowd", 0) != 1:
            stats[g["category_id"]][2] += 1
    for p in pred_segs:
        if p["id"] in p_matched:
            continue
        crowd = np.zeros(gt.shape, bool)
        for g in gt_segs:
            if g.get("iscrowd", 0) == 1 and g["category_id"] == p["category_id"]:
                crowd |= gmask[g["id"]]
        area = int(np.sum(pmask[p["id"]]))
        if int(np.sum(pmask[p["id"]] & (void | crowd))) / area > 0.5:
            continue  # mostly on void / same-category crowd: ignored
        stats[p["category_id"]][1] += 1


def ref_results(stats: dict, categories: list) -> dict:
    out = {}
    for name, want in (("All", None), ("Things", 1), ("Stuff", 0)):
        vals = []
        for c in categories:
            if want is not None and c["isthing"] != want:
                continue
            tp, fp, fn, iou = stats.get(c["id"], [0, 0, 0, 0.0])
            if tp + fp + fn == 0:
                continue
            vals.append((iou / (tp + fp / 2 + fn / 2), iou / tp if tp else 0.0, tp / (tp + fp / 2 + fn / 2)))
        n = len(vals)
        out[name] = {"pq": sum(v[0] for v in vals) / n, "sq": sum(v[1] for v in vals) / n,
                     "rq": sum(v[2] for v in vals) / n, "n": n} if n else {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    return out


def read_png_ids(path: Path) -> np.ndarray:
    a = np.array(Image.open(path).convert("RGB"), dtype=np.int64)
    return a[:, :, 0] + 256 * a[:, :, 1] + 256 * 256 * a[:, :, 2]


def ref_pq_files(gt_json: Path, pred_json: Path) -> tuple[dict, dict]:
    gt_data, pred_data = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    preds = {a["image_id"]: a for a in pred_data["annotations"]}
    stats: dict = defaultdict(lambda: [0, 0, 0, 0.0])
    for ga in gt_data["annotations"]:
        pa = preds[ga["image_id"]]
        ref_image(read_png_ids(gt_json.with_suffix("") / ga["file_name"]), ga["segments_info"],
                  read_png_ids(pred_json.with_suffix("") / pa["file_name"]), pa["segments_info"], stats)
    return ref_results(stats, gt_data["categories"]), dict(stats)


def assert_results_close(got: dict, ref: dict, ref_stats: dict, tol: float = 1e-9) -> None:
    for name in ("All", "Things", "Stuff"):
        assert got[name]["n"] == ref[name]["n"], name
        for k in ("pq", "sq", "rq"):
            assert got[name][k] == pytest.approx(ref[name][k], abs=tol), (name, k)
    for cid, pc in got["per_class"].items():
        tp, fp, fn, iou = ref_stats.get(cid, [0, 0, 0, 0.0])
        assert (pc["tp"], pc["fp"], pc["fn"]) == (tp, fp, fn), cid
        assert pc["iou_sum"] == pytest.approx(iou, abs=tol), cid


def assert_stats_close(a: PQStat, b: PQStat) -> None:
    assert a.category_ids == b.category_ids
    for c in a.category_ids:
        x, y = a[c], b[c]
        assert (x["tp"], x["fp"], x["fn"]) == (y["tp"], y["fp"], y["fn"]), c
        assert x["iou_sum"] == pytest.approx(y["iou_sum"], abs=1e-12), c


def stats_of(s: PQStat) -> dict:
    return {c: [s[c]["tp"], s[c]["fp"], s[c]["fn"], s[c]["iou_sum"]] for c in s.category_ids}


# ---------------------------------------------------------------------------------------
# writing COCO panoptic files
# ---------------------------------------------------------------------------------------


def write_png(path: Path, ids: np.ndarray) -> None:
    ids = np.asarray(ids, np.int64)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def write_dataset(root: Path, name: str, images: list, categories: list | None) -> Path:
    """images: (image_id, id map, segments); writes root/name.json + root/name/*.png."""
    anns = []
    (root / name).mkdir(parents=True, exist_ok=True)
    for iid, ids, segs in images:
        fname = f"{iid:012d}.png"
        write_png(root / name / fname, ids)
        anns.append({"image_id": iid, "file_name": fname, "segments_info": segs})
    data = {"annotations": anns}
    if categories is not None:
        data["categories"] = categories
        data["images"] = [{"id": iid, "file_name": f"{iid:012d}.jpg"} for iid, _, _ in images]
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------
# id <-> colour
# ---------------------------------------------------------------------------------------


def test_rgb2id_id2rgb():
    assert rgb2id((1, 2, 3)) == 1 + 256 * 2 + 256 * 256 * 3
    assert id2rgb(1 + 256 * 2 + 256 * 256 * 3) == (1, 2, 3)
    ids = np.random.default_rng(0).integers(0, 256 ** 3, (7, 5))
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (7, 5, 3)
    back = rgb2id(rgb)
    assert back.dtype == np.uint32 and (back == ids).all()
    rgba = np.concatenate([rgb, np.full((7, 5, 1), 255, np.uint8)], -1)
    assert (rgb2id(rgba) == ids).all()  # alpha is dropped
    assert (rgb2id(rgb.astype(np.int64)) == ids).all()
    with pytest.raises(ValueError, match="0..16777215"):
        id2rgb(np.array([256 ** 3]))
    with pytest.raises(ValueError, match="0..255"):
        rgb2id(np.array([[300, 0, 0]]))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        rgb2id(np.zeros((4, 5), np.uint8))


# ---------------------------------------------------------------------------------------
# (1) the lecture's example
# ---------------------------------------------------------------------------------------

SKY, GRASS, PERSON, DOG = 1, 2, 3, 4
LECTURE_CATS = [
    {"id": SKY, "name": "sky", "isthing": 0},
    {"id": GRASS, "name": "grass", "isthing": 0},
    {"id": PERSON, "name": "person", "isthing": 1},
    {"id": DOG, "name": "dog", "isthing": 1},
]


def lecture_example():
    """8 x 10 pixels. GT: sky (rows 0-1), grass (rows 6-7), persons A (cols 0-2, 12 px),
    B (col 3, 4 px), C (cols 4-5, 8 px) and dog D (cols 6-9, 16 px) in rows 2-5.
    Prediction: sky exact; grass only cols 0-7 (cols 8-9 unlabelled = VOID in the
    prediction); A and B merged into one person (cols 0-3); C exact; the dog called a person."""
    gt = np.zeros((8, 10), np.int64)
    gt[0:2] = 11
    gt[6:8] = 12
    gt[2:6, 0:3] = 21
    gt[2:6, 3] = 22
    gt[2:6, 4:6] = 23
    gt[2:6, 6:10] = 31
    gt_segs = [seg(11, SKY), seg(12, GRASS), seg(21, PERSON), seg(22, PERSON), seg(23, PERSON), seg(31, DOG)]
    pred = np.zeros((8, 10), np.int64)
    pred[0:2] = 5
    pred[6:8, 0:8] = 6
    pred[2:6, 0:4] = 7
    pred[2:6, 4:6] = 8
    pred[2:6, 6:10] = 9
    pred_segs = [seg(5, SKY), seg(6, GRASS), seg(7, PERSON), seg(8, PERSON), seg(9, PERSON)]
    return gt, gt_segs, pred, pred_segs


# Worked out by hand:
#   sky    TP (IoU 20/20 = 1)
#   grass  TP (IoU 16 / (16 + 20 - 16) = 0.8: the prediction's void pixels are simply missing)
#   person merged A+B vs A: 12 / (16 + 12 - 12) = 0.75 > 0.5 -> TP; vs B: 4/16 -> B is a FN;
#          C: IoU 1 -> TP; the "person" on the dog matches no person -> FP.
#          TP = 2, FP = 1, FN = 1, sum IoU = 1.75: PQ = 1.75 / 3, SQ = 0.875, RQ = 2/3
#   dog    FN = 1 (its only segment was called a person): PQ = SQ = RQ = 0, but it counts.
LECTURE_PER_CLASS = {
    SKY: {"tp": 1, "fp": 0, "fn": 0, "iou_sum": 1.0, "pq": 1.0, "sq": 1.0, "rq": 1.0},
    GRASS: {"tp": 1, "fp": 0, "fn": 0, "iou_sum": 0.8, "pq": 0.8, "sq": 0.8, "rq": 1.0},
    PERSON: {"tp": 2, "fp": 1, "fn": 1, "iou_sum": 1.75, "pq": 1.75 / 3, "sq": 0.875, "rq": 2 / 3},
    DOG: {"tp": 0, "fp": 0, "fn": 1, "iou_sum": 0.0, "pq": 0.0, "sq": 0.0, "rq": 0.0},
}
LECTURE_RESULTS = {
    "All": {"pq": (1 + 0.8 + 1.75 / 3 + 0) / 4, "sq": (1 + 0.8 + 0.875 + 0) / 4, "rq": (1 + 1 + 2 / 3 + 0) / 4, "n": 4},
    "Things": {"pq": (1.75 / 3) / 2, "sq": 0.875 / 2, "rq": (2 / 3) / 2, "n": 2},
    "Stuff": {"pq": 0.9, "sq": 0.9, "rq": 1.0, "n": 2},
}
LECTURE_TABLE = """\
          |    PQ     SQ     RQ     N
--------------------------------------
All       |  59.6   66.9   66.7     4
Things    |  29.2   43.8   33.3     2
Stuff     |  90.0   90.0  100.0     2"""


def check_lecture_results(r: dict) -> None:
    for name, want in LECTURE_RESULTS.items():
        assert r[name]["n"] == want["n"]
        for k in ("pq", "sq", "rq"):
            assert r[name][k] == pytest.approx(want[k], abs=1e-12), (name, k)
    assert set(r["per_class"]) == {SKY, GRASS, PERSON, DOG}
    for cid, want in LECTURE_PER_CLASS.items():
        assert r["per_class"][cid] == pytest.approx(want, abs=1e-12), cid


def test_lecture_example_in_memory():
    stat = pq_single_image(*lecture_example(), LECTURE_CATS)
    check_lecture_results(stat.results(LECTURE_CATS))
    assert format_pq_table(stat.results(LECTURE_CATS)) == LECTURE_TABLE
    assert stat.pq_average(LECTURE_CATS, isthing=True) == pytest.approx(LECTURE_RESULTS["Things"])
    assert stat[PERSON] == pytest.approx({"tp": 2, "fp": 1, "fn": 1, "iou_sum": 1.75})
    torch = pytest.importorskip("torch")
    gt, gs, pred, ps = lecture_example()
    assert pq_single_image(torch.from_numpy(gt), gs, torch.from_numpy(pred), ps, {c["id"]: c for c in LECTURE_CATS}) == stat


@pytest.mark.parametrize("workers", [1, 2])
def test_lecture_example_files(tmp_path, workers):
    gt, gt_segs, pred, pred_segs = lecture_example()
    gt_json = write_dataset(tmp_path, "gt", [(1, gt, gt_segs)], LECTURE_CATS)
    pred_json = write_dataset(tmp_path, "pred", [(1, pred, pred_segs)], None)
    r = pq_compute(gt_json, pred_json, workers=workers)
    check_lecture_results(r)
    assert format_pq_table(r) == LECTURE_TABLE
    # loaded dicts and explicit folders give the same
    r2 = pq_compute(json.loads(gt_json.read_text()), str(pred_json), gt_folder=tmp_path / "gt", workers=1)
    assert r2 == r


# ---------------------------------------------------------------------------------------
# (2) void and crowd, by hand
# ---------------------------------------------------------------------------------------

CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "dog", "isthing": 1},
        {"id": 3, "name": "sky", "isthing": 0}]


def one(gt_row: list, gt_segs: list, pred_row: list, pred_segs: list) -> PQStat:
    return pq_single_image(np.array([gt_row]), gt_segs, np.array([pred_row]), pred_segs, CATS)


def test_void_shrinks_the_union():
    # g = 6 px; p = the same 6 px + 2 px on VOID: IoU = 6 / (8 + 6 - 6 - 2) = 1 (not 6/8)
    s = one([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], [seg(1, 1)],
            [5, 5, 5, 5, 5, 5, 5, 5, 0, 0], [seg(5, 1)])
    assert s[1] == {"tp": 1, "fp": 0, "fn": 0, "iou_sum": 1.0}
    # g = 4 px, p = 2 of them + 6 px of VOID: IoU = 2 / (8 + 4 - 2 - 6) = 0.5 -> no match
    # (it would be 2 / 10 without the void rule); p is then ignored: 6/8 of it is VOID.
    s = one([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [seg(1, 1)],
            [0, 0, 5, 5, 5, 5, 5, 5, 5, 5], [seg(5, 1)])
    assert s[1] == {"tp": 0, "fp": 0, "fn": 1, "iou_sum": 0.0}
    # g = 4 px, p = 3 of them + 4 void: IoU = 3 / (7 + 4 - 3 - 4) = 0.75 -> TP
    s = one([1, 1, 1, 1, 0, 0, 0, 0, 3, 3], [seg(1, 1), seg(3, 3)],
            [0, 5, 5, 5, 5, 5, 5, 5, 6, 6], [seg(5, 1), seg(6, 3)])
    assert s[1] == {"tp": 1, "fp": 0, "fn": 0, "iou_sum": 0.75}
    assert s[3] == {"tp": 1, "fp": 0, "fn": 0, "iou_sum": 1.0}


def test_false_positive_mostly_on_void_is_ignored():
    sky = [3] * 4
    # p: 3 px on VOID + 2 on sky -> 3/5 > 0.5: ignored; the sky is split: its 2 remaining
    # px match nothing (2/4 = 0.5 is not > 0.5) -> sky FN and sky prediction FP.
    s = one(sky + [0, 0, 0], [seg(3, 3)],
            [7, 7, 5, 5, 5, 5, 5], [seg(5, 1), seg(7, 3)])
    assert s[1] == {"tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0}
    assert s[3] == {"tp": 0, "fp": 1, "fn": 1, "iou_sum": 0.0}
    # exactly half on VOID is NOT more than half: counted as FP
    # p = {sky px 3, void px 4}: 1 of 2 on VOID; sky: 3 of 4 px -> TP (IoU 3 / (3 + 4 - 3 - 0))
    s = one(sky + [0, 0], [seg(3, 3)], [6, 6, 6, 5, 5, 0], [seg(6, 3), seg(5, 1)])
    assert s[1] == {"tp": 0, "fp": 1, "fn": 0, "iou_sum": 0.0}
    assert s[3] == {"tp": 1, "fp": 0, "fn": 0, "iou_sum": 0.75}


def test_crowd():
    crowd_person = seg(9, 1, crowd=1)
    # crowd GT is never a FN, and a prediction on it is neither TP nor (mostly crowd) FP
    s = one([9, 9, 9, 9, 3, 3], [crowd_person, seg(3, 3)], [4, 4, 4, 4, 6, 6], [seg(4, 1), seg(6, 3)])
    assert s.category_ids == [3]
    assert s[1] == {"tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0}
    assert s[3] == {"tp": 1, "fp": 0, "fn": 0, "iou_sum": 1.0}
    # the same region predicted as a DOG: the person crowd does not excuse it -> dog FP
    s = one([9, 9, 9, 9, 3, 3], [crowd_person, seg(3, 3)], [4, 4, 4, 4, 6, 6], [seg(4, 2), seg(6, 3)])
    assert s[2] == {"tp": 0, "fp": 1, "fn": 0, "iou_sum": 0.0}
    assert s[1] == {"tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0}
    # void and crowd add up: p = 2 void + 2 crowd + 3 sky: 4/7 > 0.5 -> ignored ...
    gt = [0, 0, 9, 9, 3, 3, 3, 3, 3, 3, 3]
    pred = [4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6]
    s = one(gt, [crowd_person, seg(3, 3)], pred, [seg(4, 1), seg(6, 3)])
    assert s[1] == {"tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0}
    # (sky: 4 of 7 px predicted, IoU 4/7 -> TP)
    assert s[3] == pytest.approx({"tp": 1, "fp": 0, "fn": 0, "iou_sum": 4 / 7})
    # ... but as a dog only the 2 void px excuse it: 2/7 -> dog FP
    s = one(gt, [crowd_person, seg(3, 3)], pred, [seg(4, 2), seg(6, 3)])
    assert s[2] == {"tp": 0, "fp": 1, "fn": 0, "iou_sum": 0.0}
    # a non-crowd person next to the crowd is matched normally; IoU with the crowd is ignored
    s = one([9, 9, 9, 1, 1, 1], [crowd_person, seg(1, 1)], [4, 4, 4, 5, 5, 5], [seg(4, 1), seg(5, 1)])
    assert s[1] == {"tp": 1, "fp": 0, "fn": 0, "iou_sum": 1.0}
    # two crowd regions of the same category count as one region: 3 + 3 of 10 px -> ignored
    # (panopticapi would keep only the last crowd segment: 3/10 -> FP; COCO never has two)
    s = one([8, 8, 8, 9, 9, 9, 3, 3, 3, 3], [seg(8, 1, crowd=1), crowd_person, seg(3, 3)],
            [4] * 10, [seg(4, 1)])
    assert s[1] == {"tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0}
    assert s[3] == {"tp": 0, "fp": 0, "fn": 1, "iou_sum": 0.0}


def test_only_false_positives_count_with_pq_zero():
    s = one([3, 3, 3, 3], [seg(3, 3)], [5, 5, 6, 6], [seg(5, 1), seg(6, 3)])
    r = s.results(CATS)
    assert r["per_class"][1] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1, "fn": 0, "iou_sum": 0.0}
    assert r["Things"]["n"] == 1 and r["Things"]["pq"] == 0.0
    # sky: 2/4 is not a match -> FN + FP: PQ = 0 as well
    assert r["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}
    # a group with nothing to average
    empty = PQStat().results(CATS)
    assert empty["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


# ---------------------------------------------------------------------------------------
# random data
# ---------------------------------------------------------------------------------------

RAND_CATS = [{"id": c, "name": f"thing{c}", "isthing": 1} for c in (1, 2, 3)] + \
            [{"id": c, "name": f"stuff{c}", "isthing": 0} for c in (10, 11, 12)]


def random_ids(rng, n: int, high: int = 256 ** 3) -> list[int]:
    """n distinct random ids in 1 .. high - 1."""
    out: list[int] = []
    while len(out) < n:
        v = int(rng.integers(1, high))
        if v not in out:
            out.append(v)
    return out


def random_gt(rng, h: int, w: int):
    """Stuff bands, thing rectangles (some crowd), VOID rectangles and noise."""
    label = np.zeros((h, w), np.int64)
    segs = []
    ids = iter(random_ids(rng, 40))
    cuts = sorted(rng.choice(np.arange(1, h), rng.integers(1, 4), replace=False).tolist())
    for a, b in zip([0] + cuts, cuts + [h]):
        sid = next(ids)
        label[a:b] = sid
        segs.append(seg(sid, int(rng.choice([10, 11, 12])), crowd=int(rng.random() < 0.1)))
    for _ in range(rng.integers(2, 8)):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        sid = next(ids)
        label[y:y + rng.integers(2, h // 2), x:x + rng.integers(2, w // 2)] = sid
        segs.append(seg(sid, int(rng.integers(1, 4)), crowd=int(rng.random() < 0.2)))
    for _ in range(rng.integers(0, 3)):
        y, x = rng.integers(0, h), rng.integers(0, w)
        label[y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = 0
    label[rng.random((h, w)) < 0.03] = 0
    present = set(np.unique(label).tolist())
    return label, [s for s in segs if s["id"] in present]


def random_pred(rng, gt: np.ndarray, gt_segs: list):
    """Edit the ground truth: move, grow, recolour, drop, add segments and VOID; new ids."""
    h, w = gt.shape
    pred = gt.copy()
    cat = {s["id"]: s["category_id"] for s in gt_segs}
    fresh = iter(random_ids(rng, 40))
    for _ in range(rng.integers(2, 8)):
        y, x = rng.integers(0, h), rng.integers(0, w)
        box = (slice(y, y + rng.integers(1, h // 2)), slice(x, x + rng.integers(1, w // 2)))
        r = rng.random()
        if r < 0.3:  # a new segment
            sid = next(fresh)
            cat[sid] = int(rng.choice([1, 2, 3, 10, 11, 12]))
            pred[box] = sid
        elif r < 0.6 and cat:  # grow an existing segment
            pred[box] = int(rng.choice(sorted(cat)))
        elif r < 0.7:  # a hole of VOID
            pred[box] = 0
        elif r < 0.8:  # a new small segment where the ground truth is VOID
            ys, xs = np.nonzero(gt == 0)
            if len(ys):
                k = int(rng.integers(0, len(ys)))
                sid = next(fresh)
                cat[sid] = int(rng.choice([1, 2, 3, 10, 11, 12]))
                pred[ys[k]:ys[k] + 2, xs[k]:xs[k] + 3] = sid
        elif r < 0.9 and cat:  # keep exactly half of a segment: IoU 0.5 is not a match
            ys, xs = np.nonzero(pred == int(rng.choice(sorted(cat))))
            pred[ys[len(ys) // 2:], xs[len(xs) // 2:]] = 0
        else:  # shift everything a little
            pred = np.roll(pred, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
    if rng.random() < 0.7:  # a segment mostly on VOID, plus a few pixels of something else
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        box = np.zeros((h, w), bool)
        box[y:y + 8, x:x + 8] = True
        sid = next(fresh)
        cat[sid] = int(rng.choice([1, 2, 3, 10, 11, 12]))
        pred[box & (gt == 0)] = sid
        pred[y, x:x + int(rng.integers(1, 4))] = sid
    for sid in list(cat):
        if rng.random() < 0.15:
            cat[sid] = int(rng.choice([1, 2, 3, 10, 11, 12]))
    present = [int(v) for v in np.unique(pred) if v != 0]
    new = dict(zip(present, random_ids(rng, len(present))))
    out = np.zeros_like(pred)
    for old, nid in new.items():
        out[pred == old] = nid
    return out, [seg(new[i], cat[i]) for i in present]


def random_dataset(rng, n: int, size=(24, 32)):
    images = []
    for i in range(n):
        h, w = size[0] + int(rng.integers(0, 8)), size[1] + int(rng.integers(0, 8))
        gt, gt_segs = random_gt(rng, h, w)
        pred, pred_segs = random_pred(rng, gt, gt_segs)
        images.append((100 + i, gt, gt_segs, pred, pred_segs))
    return images


def ref_stat(images) -> dict:
    stats: dict = defaultdict(lambda: [0, 0, 0, 0.0])
    for _, gt, gs, pred, ps in images:
        ref_image(gt, gs, pred, ps, stats)
    return {c: v for c, v in stats.items()}


def relabel(rng, ids: np.ndarray, segs: list, high: int):
    new = dict(zip([s["id"] for s in segs], random_ids(rng, len(segs), high)))
    out = np.zeros_like(ids, dtype=np.int64)
    for old, nid in new.items():
        out[ids == old] = nid
    return out, [{**s, "id": new[s["id"]]} for s in segs]


# (3) properties ---------------------------------------------------------------------------


def test_identical_maps_give_one():
    rng = np.random.default_rng(1)
    total = PQStat()
    for _ in range(5):
        gt, segs = random_gt(rng, 30, 40)
        total += pq_single_image(gt, segs, gt, [{**s, "iscrowd": 0} for s in segs], RAND_CATS)
    r = total.results(RAND_CATS)
    assert r["All"]["n"] > 0
    for name in ("All", "Things", "Stuff"):
        if r[name]["n"]:
            assert r[name]["pq"] == r[name]["sq"] == r[name]["rq"] == 1.0
    assert all(v["fp"] == 0 and v["fn"] == 0 for v in r["per_class"].values())


@pytest.mark.parametrize("high", [256 ** 3, 1 << 40])  # 2^40: int64 ids that no PNG can hold
def test_relabelling_ids_changes_nothing(high):
    rng = np.random.default_rng(2)
    for _, gt, gs, pred, ps in random_dataset(rng, 6):
        base = pq_single_image(gt, gs, pred, ps, RAND_CATS)
        gt2, gs2 = relabel(rng, gt, gs, high)
        pred2, ps2 = relabel(rng, pred, ps, high)
        rng.shuffle(gs2)
        rng.shuffle(ps2)
        assert_stats_close(pq_single_image(gt2, gs2, pred2, ps2, RAND_CATS), base)
        # dtypes do not matter either
        assert_stats_close(pq_single_image(gt.astype(np.uint32), gs, pred.astype(np.int32), ps, RAND_CATS), base)


def test_split_and_sum_equals_one_pass():
    rng = np.random.default_rng(3)
    images = random_dataset(rng, 10)
    one_pass = PQStat()
    for _, gt, gs, pred, ps in images:
        one_pass += pq_single_image(gt, gs, pred, ps, RAND_CATS)
    parts = [PQStat(), PQStat(), PQStat()]
    for k, (_, gt, gs, pred, ps) in enumerate(images):
        parts[k % 3] += pq_single_image(gt, gs, pred, ps, RAND_CATS)
    # through the serialisable forms, as another process would send them
    a = PQStat().load_state_dict(json.loads(json.dumps(parts[0].state_dict())))
    ids = [c["id"] for c in RAND_CATS]
    b = PQStat.from_array(ids, parts[1].to_array(ids))
    summed = a + b
    summed += parts[2]
    assert_stats_close(summed, one_pass)
    r1, r2 = summed.results(RAND_CATS), one_pass.results(RAND_CATS)
    for name in ("All", "Things", "Stuff"):
        assert r1[name] == pytest.approx(r2[name], abs=1e-12)
    ref = ref_stat(images)
    assert_stats_close(one_pass, PQStat.from_array(sorted(ref), [ref[c] for c in sorted(ref)]))


def test_pq_stat_api():
    s = PQStat()
    s.add(1, tp=2, iou_sum=1.5)
    s.add(2, fp=1)
    assert s[1] == {"tp": 2, "fp": 0, "fn": 0, "iou_sum": 1.5}
    assert s[99] == {"tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0}
    assert s.state_dict() == {"category_ids": [1, 2], "tp": [2, 0], "fp": [0, 1], "fn": [0, 0], "iou_sum": [1.5, 0.0]}
    assert PQStat().load_state_dict(s.state_dict()) == s
    t = s.copy()
    t += s
    assert t[1]["tp"] == 4 and s[1]["tp"] == 2
    with pytest.raises(ValueError, match="not in category_ids"):
        s.to_array([1])
    # counts of categories that are not listed are left out, as in panopticapi
    assert s.pq_average([1]) == {"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 1}
    with pytest.raises(ValueError, match="isthing"):
        s.pq_average([1, 2], isthing=True)


# (4) the loop-based reference on real files -----------------------------------------------


def write_random_pair(tmp_path: Path, images) -> tuple[Path, Path]:
    gt_json = write_dataset(tmp_path, "panoptic_gt", [(i, g, gs) for i, g, gs, _, _ in images], RAND_CATS)
    preds = [(i, p, ps) for i, _, _, p, ps in images]
    preds.append((99999, np.ones((4, 4), np.int64), [seg(1, 1)]))  # not in the GT: ignored
    pred_json = write_dataset(tmp_path, "panoptic_pred", preds[::-1], None)  # any order
    return gt_json, pred_json


@pytest.fixture(scope="module")
def random_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pq_random")
    images = random_dataset(np.random.default_rng(4), 12)
    gt_json, pred_json = write_random_pair(tmp, images)
    ref, ref_stats = ref_pq_files(gt_json, pred_json)
    return gt_json, pred_json, ref, ref_stats


def test_matches_reference_on_files(random_files):
    gt_json, pred_json, ref, ref_stats = random_files
    got = pq_compute(gt_json, pred_json, workers=1)
    assert_results_close(got, ref, ref_stats)
    # the per-image stats are summed in image order: bit-identical with any number of workers
    assert pq_compute(gt_json, pred_json, workers=2) == got
    assert pq_compute(gt_json, pred_json, workers=3) == got
    # the dataset exercises what it should
    assert sum(v[1] for v in ref_stats.values()) > 0 and sum(v[2] for v in ref_stats.values()) > 0
    assert ref["Things"]["n"] > 0 and ref["Stuff"]["n"] > 0


def test_large_image_counted_in_blocks():
    """A 300 x 400 image is counted in several row blocks; the sums must be the same."""
    rng = np.random.default_rng(7)
    gt, gs = random_gt(rng, 300, 400)
    pred, ps = random_pred(rng, gt, gs)
    assert 300 * 400 > panoptic._CHUNK_PIXELS
    want: dict = defaultdict(lambda: [0, 0, 0, 0.0])
    ref_image(gt, gs, pred, ps, want)
    got = pq_single_image(gt, gs, pred, ps, RAND_CATS)
    assert_stats_close(got, PQStat.from_array(sorted(want), [want[c] for c in sorted(want)]))


def test_slow_paths_match_reference(random_files, monkeypatch):
    """Binary-search indexing and sort-based pair counting (used for ids >= 2^24, huge
    segment counts or sparse pair tables) give the same numbers as the fast path."""
    gt_json, pred_json, ref, ref_stats = random_files
    monkeypatch.setattr(panoptic, "_LUT_MAX_SEGMENTS", 0)
    monkeypatch.setattr(panoptic, "_DENSE_MAX_CELLS", 0)
    assert_results_close(pq_compute(gt_json, pred_json, workers=1), ref, ref_stats)
    # many tiny segments: more (gt, pred) cells than pixels -> np.unique counting
    rng = np.random.default_rng(5)
    for _ in range(5):
        gt = rng.integers(0, 30, (6, 6))
        pred = rng.integers(0, 30, (6, 6))
        gs = [seg(int(i), int(rng.choice([1, 2, 10])), int(rng.random() < 0.2)) for i in np.unique(gt) if i]
        ps = [seg(int(i), int(rng.choice([1, 2, 10]))) for i in np.unique(pred) if i]
        want: dict = defaultdict(lambda: [0, 0, 0, 0.0])
        ref_image(gt, gs, pred, ps, want)
        got = pq_single_image(gt, gs, pred, ps, RAND_CATS)
        assert_stats_close(got, PQStat.from_array(sorted(want), [want[c] for c in sorted(want)]))


# ---------------------------------------------------------------------------------------
# (5) the real COCO sample
# ---------------------------------------------------------------------------------------


@needs_coco
@pytest.mark.parametrize("workers", [1, 2])
def test_coco_sample_against_itself(workers):
    gt_json = COCO / "panoptic_examples.json"
    r = pq_compute(gt_json, gt_json, workers=workers)
    data = json.loads(gt_json.read_text())
    present = {s["category_id"] for a in data["annotations"] for s in a["segments_info"] if not s["iscrowd"]}
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": len(present)}
    assert r["Things"]["pq"] == r["Stuff"]["pq"] == 1.0
    assert r["Things"]["n"] + r["Stuff"]["n"] == len(present)
    for cid in present:
        assert r["per_class"][cid]["pq"] == 1.0 and r["per_class"][cid]["fp"] == 0
    assert len(r["per_class"]) == 133


@needs_coco
def test_coco_sample_perturbed(tmp_path):
    data = json.loads((COCO / "panoptic_examples.json").read_text())
    shutil.copytree(COCO / "panoptic_examples", tmp_path / "gt")
    (tmp_path / "gt.json").write_text(json.dumps(data))
    cats = {c["id"]: c for c in data["categories"]}
    pred_anns = []
    for ann in data["annotations"]:
        ids = read_png_ids(COCO / "panoptic_examples" / ann["file_name"])
        segs = [dict(s) for s in ann["segments_info"]]
        persons = [s for s in segs if s["category_id"] == 1 and not s["iscrowd"]]
        # drop a person (it becomes VOID) ...
        ids[ids == persons[0]["id"]] = 0
        # ... merge two other persons ...
        ids[ids == persons[2]["id"]] = persons[1]["id"]
        drop = {persons[0]["id"], persons[2]["id"]}
        # ... and call the largest stuff segment another stuff category
        stuff = max((s for s in segs if not cats[s["category_id"]]["isthing"]), key=lambda s: s["area"])
        other = next(c for c in cats if not cats[c]["isthing"] and c != stuff["category_id"])
        stuff["category_id"] = other
        segs = [{k: v for k, v in s.items() if k != "area"} for s in segs if s["id"] not in drop]
        write_png(tmp_path / "pred" / ann["file_name"], ids)
        pred_anns.append({"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segs})
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    ref, ref_stats = ref_pq_files(tmp_path / "gt.json", tmp_path / "pred.json")
    got = pq_compute(tmp_path / "gt.json", tmp_path / "pred.json", workers=2)
    assert_results_close(got, ref, ref_stats)
    assert got["per_class"][1]["fn"] >= 2 and got["All"]["pq"] < 1.0
    assert got == pq_compute(tmp_path / "gt.json", tmp_path / "pred.json", workers=1)


# ---------------------------------------------------------------------------------------
# (6) input checks
# ---------------------------------------------------------------------------------------


def test_in_memory_input_checks():
    gt, gs, pred, ps = lecture_example()
    with pytest.raises(DataError, match=r"prediction: image 7: segment ids 9 are in the PNG but not in segments_info"):
        pq_single_image(gt, gs, pred, ps[:-1], LECTURE_CATS, image_id=7)
    with pytest.raises(DataError, match=r"ground truth: the image: segment ids 31 are in the PNG but not in"):
        pq_single_image(gt, gs[:-1], pred, ps, LECTURE_CATS)
    with pytest.raises(DataError, match=r"prediction: the image: segment ids 77 are in segments_info but not in"):
        pq_single_image(gt, gs, pred, ps + [seg(77, PERSON)], LECTURE_CATS)
    with pytest.raises(DataError, match=r"ground truth: the image: segment ids 77 are in segments_info but not"):
        pq_single_image(gt, gs + [seg(77, PERSON)], pred, ps, LECTURE_CATS)
    with pytest.raises(DataError, match=r"prediction: the image: segment id 9 has unknown category_id 42"):
        pq_single_image(gt, gs, pred, ps[:-1] + [seg(9, 42)], LECTURE_CATS)
    with pytest.raises(DataError, match=r"ground truth: the image: segment id 11 has unknown category_id 5"):
        pq_single_image(gt, [seg(11, 5)] + gs[1:], pred, ps, LECTURE_CATS)
    with pytest.raises(DataError, match=r"segment id 8 appears twice in segments_info"):
        pq_single_image(gt, gs, pred, ps + [seg(8, PERSON)], LECTURE_CATS)
    with pytest.raises(DataError, match=r"segment id 0 is not allowed \(0 is VOID"):
        pq_single_image(gt, gs, pred, ps + [seg(0, PERSON)], LECTURE_CATS)
    with pytest.raises(DataError, match=r"segment #0 must be a dict with 'id' and 'category_id'"):
        pq_single_image(gt, [{"id": 11}] + gs[1:], pred, ps, LECTURE_CATS)
    with pytest.raises(DataError, match=r"the prediction is 10x7 pixels but the ground truth is 10x8"):
        pq_single_image(gt, gs, pred[:7], ps, LECTURE_CATS)
    with pytest.raises(ValueError, match="integer segment ids"):
        pq_single_image(gt.astype(float), gs, pred, ps, LECTURE_CATS)
    with pytest.raises(ValueError, match="non-negative"):
        pq_single_image(-gt, gs, pred, ps, LECTURE_CATS)
    with pytest.raises(ValueError, match="2-D id map"):
        pq_single_image(gt[None], gs, pred, ps, LECTURE_CATS)
    many = np.arange(1, 13).reshape(3, 4)
    with pytest.raises(DataError, match=r"segment ids 1, 2, .*, 10, \.\.\. \(12 in all\) are in the PNG"):
        pq_single_image(many, [], many, [], LECTURE_CATS)


def _files(tmp_path):
    gt, gs, pred, ps = lecture_example()
    gt_json = write_dataset(tmp_path, "gt", [(1, gt, gs), (2, gt, gs)], LECTURE_CATS)
    pred_json = write_dataset(tmp_path, "pred", [(1, pred, ps), (2, pred, ps)], None)
    return gt_json, pred_json


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("workers", [1, 2])
def test_file_input_checks(tmp_path, workers):
    gt_json, pred_json = _files(tmp_path)
    # a segment of the PNG missing from the JSON (image 2 of the prediction)
    _edit(pred_json, lambda d: d["annotations"][1]["segments_info"].pop())
    with pytest.raises(DataError, match=r"pred/000000000002.png \(.*pred.json\): image 2: segment ids 9 are in "
                                        r"the PNG but not in segments_info") as e:
        pq_compute(gt_json, pred_json, workers=workers)
    assert e.value.fix and "segments_info" in e.value.fix
    # a JSON segment missing from the PNG
    _edit(pred_json, lambda d: d["annotations"][1]["segments_info"].extend([seg(9, PERSON), seg(1234, PERSON)]))
    with pytest.raises(DataError, match=r"image 2: segment ids 1234 are in segments_info but not in the PNG"):
        pq_compute(gt_json, pred_json, workers=workers)
    _edit(pred_json, lambda d: d["annotations"][1]["segments_info"].pop())
    # an unknown category
    _edit(gt_json, lambda d: d["annotations"][0]["segments_info"][0].update(category_id=77))
    with pytest.raises(DataError, match=r"gt.json: image 1: segment id 11 has unknown category_id 77"):
        pq_compute(gt_json, pred_json, workers=workers)
    _edit(gt_json, lambda d: d["annotations"][0]["segments_info"][0].update(category_id=SKY))
    # duplicate segment ids
    _edit(gt_json, lambda d: d["annotations"][1]["segments_info"].append(seg(12, SKY)))
    with pytest.raises(DataError, match=r"gt.json: image 2: segment id 12 appears twice in segments_info"):
        pq_compute(gt_json, pred_json, workers=workers)
    _edit(gt_json, lambda d: d["annotations"][1]["segments_info"].pop())
    fixed = pq_compute(gt_json, pred_json, workers=workers)  # both images are the lecture's
    assert fixed["per_class"][PERSON] == pytest.approx({**LECTURE_PER_CLASS[PERSON], "tp": 4, "fp": 2, "fn": 2,
                                                        "iou_sum": 3.5})


def test_dataset_level_checks(tmp_path):
    gt_json, pred_json = _files(tmp_path)
    # a ground-truth image without prediction
    _edit(pred_json, lambda d: d["annotations"].pop(0))
    with pytest.raises(DataError, match=r"pred.json: no prediction for the image with id 1 \(000000000001.png\)"):
        pq_compute(gt_json, pred_json, workers=1)
    _edit(pred_json, lambda d: d["annotations"].append(dict(d["annotations"][0])))
    with pytest.raises(DataError, match=r"pred.json: image_id 2 has two annotations"):
        pq_compute(gt_json, pred_json, workers=1)
    gt_json, pred_json = _files(tmp_path / "b")
    # PNG problems
    write_png(tmp_path / "b" / "pred" / "000000000002.png", lecture_example()[2][:7])
    with pytest.raises(DataError, match=r"000000000002.png .*image 2: the prediction is 10x7 pixels but the "
                                        r"ground truth is 10x8"):
        pq_compute(gt_json, pred_json, workers=1)
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "b" / "pred" / "000000000002.png")
    with pytest.raises(DataError, match=r"000000000002.png: panoptic PNG has 1 channel\(s\), not RGB"):
        pq_compute(gt_json, pred_json, workers=1)
    (tmp_path / "b" / "pred" / "000000000002.png").unlink()
    with pytest.raises(DataError, match=r"000000000002.png: image file not found"):
        pq_compute(gt_json, pred_json, workers=2)
    # files and folders
    with pytest.raises(DataError, match=r"missing.json: ground-truth JSON file not found"):
        pq_compute(tmp_path / "missing.json", pred_json)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: prediction JSON file is not valid JSON"):
        pq_compute(gt_json, bad)
    with pytest.raises(DataError, match=r"nowhere: folder with the prediction PNGs does not exist"):
        pq_compute(gt_json, pred_json, pred_folder=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"has no 'annotations' list"):
        pq_compute(gt_json, {"images": []}, pred_folder=tmp_path)
    with pytest.raises(DataError, match=r"has no 'categories' list"):
        pq_compute({"annotations": []}, pred_json, gt_folder=tmp_path)
    with pytest.raises(DataError, match=r"category 3 has no 'isthing'"):
        pq_compute({"annotations": [], "categories": [{"id": 3}]}, pred_json, gt_folder=tmp_path)
    with pytest.raises(DataError, match=r"annotation #0 needs 'image_id', 'file_name' and 'segments_info'"):
        pq_compute({"annotations": [{"image_id": 1}], "categories": LECTURE_CATS}, pred_json, gt_folder=tmp_path)
    with pytest.raises(ValueError, match="gt_folder is required"):
        pq_compute(json.loads(gt_json.read_text()), pred_json)
    with pytest.raises(ValueError, match="workers"):
        pq_compute(gt_json, pred_json, workers=0)


def test_no_images_and_default_workers(tmp_path):
    gt_json = write_dataset(tmp_path, "gt", [], LECTURE_CATS)
    pred_json = write_dataset(tmp_path, "pred", [], None)
    r = pq_compute(gt_json, pred_json)
    assert r["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert set(r["per_class"]) == {SKY, GRASS, PERSON, DOG}


@pytest.fixture(params=["libpng", "pil"])
def decoder(request, monkeypatch):
    """Each PNG decoder: libpng (torchvision's operator, the default) and PIL (the fallback)."""
    if request.param == "pil":
        monkeypatch.setattr(fmt, "_libpng_decode", False)
    else:
        fmt._decode_libpng(Path(__file__))  # looks the operator up
        if fmt._libpng_decode is False:
            pytest.skip("torchvision has no PNG decoder here")
    return request.param


def test_png_variants(tmp_path, monkeypatch, decoder):
    """Palette and RGBA PNGs decode to the same ids; truncated files and JPEGs are refused
    (also when PIL is told to load truncated images); with either decoder."""
    gt_json, pred_json = _files(tmp_path)
    want = pq_compute(gt_json, pred_json, workers=1)
    png = tmp_path / "pred" / "000000000002.png"
    rgb = np.asarray(Image.open(png).convert("RGB"))
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(png)
    assert Image.open(png).mode == "P"
    assert pq_compute(gt_json, pred_json, workers=1) == want
    Image.fromarray(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], -1)).save(png)
    assert Image.open(png).mode == "RGBA"
    assert pq_compute(gt_json, pred_json, workers=1) == want
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"000000000002.png: image file is (truncated|corrupt)"):
        pq_compute(gt_json, pred_json, workers=1)
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match=r"000000000002.png: image file is (truncated|corrupt)"):
        pq_compute(gt_json, pred_json, workers=1)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    Image.fromarray(rgb).save(png, format="JPEG")
    with pytest.raises(DataError, match=r"000000000002.png: panoptic id map is a JPEG"):
        pq_compute(gt_json, pred_json, workers=1)


def test_no_state_left_after_errors_and_thread_safe():
    gt, gs, pred, ps = lecture_example()
    with pytest.raises(DataError, match="segment ids 77 are in segments_info but not in the PNG"):
        pq_single_image(gt, gs + [seg(77, PERSON)], pred, ps, LECTURE_CATS)
    gt77 = gt.copy()
    gt77[0, 0] = 77  # 77 must not be remembered from the failed call
    with pytest.raises(DataError, match="segment ids 77 are in the PNG but not in segments_info"):
        pq_single_image(gt77, gs, pred, ps, LECTURE_CATS)
    from concurrent.futures import ThreadPoolExecutor
    images = random_dataset(np.random.default_rng(6), 16)
    serial = [pq_single_image(g, gs_, p, ps_, RAND_CATS) for _, g, gs_, p, ps_ in images]
    with ThreadPoolExecutor(4) as ex:
        threaded = list(ex.map(lambda im: pq_single_image(im[1], im[2], im[3], im[4], RAND_CATS), images))
    assert threaded == serial


# (6) the fast paths of the counting and the decoding --------------------------------------


def relabel_to(ids: np.ndarray, segs: list, new_ids: list):
    new = dict(zip([s["id"] for s in segs], new_ids))
    out = np.zeros_like(ids, dtype=np.int64)
    for old, nid in new.items():
        out[ids == old] = nid
    return out, [{**s, "id": new[s["id"]]} for s in segs]


@pytest.mark.parametrize("make_ids, table", [
    (lambda n: [7 + 65536 * (j + 1) for j in range(n)], True),  # same low 16 bits: the table keys on bits 8..23
    (lambda n: [65536 * (j + 1) for j in range(n)], True),  # low 16 bits 0, as VOID's
    (lambda n: [3 + (j + 1) * (1 << 24) for j in range(n)], True),  # int64 ids: the table keys on bits 16..31
    (lambda n: ([0x000001, 0x010001, 0x020202, 0x020203] + [0x100000 + 0x101 * j for j in range(n)])[:n],
     False),  # bits 0..15 and bits 8..23 both collide: binary search
    (lambda n: [1 + j for j in range(n)], True),  # small ids
], ids=["low-bits-collide", "low-bits-void", "high-ids", "binary-search", "small"])
def test_any_ids_count_alike(make_ids, table, monkeypatch):
    """Ids that defeat the 16-bit table (and VOID sharing its key) give the same numbers;
    only ids that no 16 bits tell apart fall back to binary search."""
    rng = np.random.default_rng(8)
    for _, gt, gs, pred, ps in random_dataset(rng, 4):
        base = pq_single_image(gt, gs, pred, ps, RAND_CATS)
        gt2, gs2 = relabel_to(gt, gs, make_ids(len(gs)))
        pred2, ps2 = relabel_to(pred, ps, make_ids(len(ps))[::-1])
        assert_stats_close(pq_single_image(gt2, gs2, pred2, ps2, RAND_CATS), base)
        with pytest.raises(DataError, match="are in the PNG but not in segments_info"):
            pq_single_image(np.where(gt2 == gs2[0]["id"], gs2[0]["id"] + 256, gt2), gs2, pred2, ps2, RAND_CATS)
    # the lookup itself, with VOID and an unknown id among the values
    segs = panoptic._Segments([seg(i, 1) for i in make_ids(20)], {1}, "gt", "image")
    values = np.array([0, *make_ids(20)[::-1], make_ids(20)[3] + 256, 0], np.int64)
    calls = []
    real_searchsorted = np.searchsorted
    monkeypatch.setattr(panoptic.np, "searchsorted", lambda *a, **k: calls.append(1) or real_searchsorted(*a, **k))
    assert panoptic._index(values, segs).tolist() == [1, *range(21, 1, -1), 0, 1]
    assert bool(calls) == (not table)


def test_decode_without_arrow_export(tmp_path, monkeypatch):
    """The id maps read in place through Pillow's Arrow export equal those of the copying
    fallback (older Pillow, or image memory in several blocks) and of rgb2id."""
    gt_json, pred_json = _files(tmp_path)
    want = pq_compute(gt_json, pred_json, workers=1)
    monkeypatch.setattr(fmt, "_libpng_decode", False)  # the PIL path is the one tested here
    png = tmp_path / "pred" / "000000000002.png"
    ids = rgb2id(np.asarray(Image.open(png).convert("RGB")))
    fast = panoptic._decode_png(png)
    assert fast.dtype == np.uint32 and np.array_equal(fast & 0xFFFFFF, ids)
    assert np.array_equal(panoptic._read_id_png(png), ids)
    if hasattr(Image.Image, "__arrow_c_array__"):  # Pillow >= 11.2: read in place, not copied out
        with monkeypatch.context() as m:
            m.setattr(Image.Image, "tobytes", lambda *a, **k: pytest.fail("pixels copied"))
            assert np.array_equal(panoptic._decode_png(png) & 0xFFFFFF, ids)

    def no_rows(self, *a, **k):
        raise ValueError("Image rows are not contiguous in memory.")

    for patch in ("several-blocks", "old-pillow"):
        if patch == "several-blocks":
            monkeypatch.setattr(Image.Image, "__arrow_c_array__", no_rows, raising=False)
        else:  # raising=False: Pillow < 11.2 (allowed by pyproject) has no Arrow export at all
            monkeypatch.delattr(Image.Image, "__arrow_c_array__", raising=False)
        assert np.array_equal(panoptic._decode_png(png) & 0xFFFFFF, ids)
        assert pq_compute(gt_json, pred_json, workers=1) == want


# ---------------------------------------------------------------------------------------
# speed paths: libpng decoding, threads by default
# ---------------------------------------------------------------------------------------


def test_libpng_decode_equals_pil(tmp_path, monkeypatch, decoder):
    """RGB, RGBA, palette, 16-bit and gray PNGs give the same uint32 ids (or the same
    DataError) with libpng as with PIL; the libpng path does not touch PIL at all."""
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 1 << 24, size=(37, 53)).astype(np.uint32)
    ids[:10] = 0
    rgb = id2rgb(ids)
    files = {"rgb": rgb, "rgba": np.concatenate([rgb, rng.integers(0, 256, (37, 53, 1), dtype=np.uint8)], -1)}
    for name, a in files.items():
        Image.fromarray(a).save(tmp_path / f"{name}.png")
    many = id2rgb((np.arange(40).reshape(5, 8) * 104729) % (1 << 24))  # 40 colours: an 8-bit palette
    few = id2rgb(np.array([[0, 5, 70000], [5, 5, 1 << 23]] * 3))  # 4 colours: a 2-bit palette
    for name, a, colors in (("p", many, 64), ("p2", few, 4)):
        Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=colors).save(tmp_path / f"{name}.png")
    assert (tmp_path / "p.png").read_bytes()[24:26] == b"\x08\x03" and (tmp_path / "p2.png").read_bytes()[24] == 2
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.png")
    for name in ("rgb", "rgba"):
        assert np.array_equal(fmt.read_panoptic_png(tmp_path / f"{name}.png"), ids)
    for name in ("p", "p2"):  # the palette's colours (torchvision 0.29's decode_png misreads both)
        want = rgb2id(np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB")))
        assert len(np.unique(want)) > 2 and np.array_equal(fmt.read_panoptic_png(tmp_path / f"{name}.png"), want)
    with pytest.raises(DataError, match=r"gray.png: panoptic PNG has 1 channel\(s\), not RGB"):
        fmt.read_panoptic_png(tmp_path / "gray.png")
    if decoder == "libpng":
        monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("PIL used"))
        for name in ("rgb", "rgba"):
            assert fmt._decode_libpng(tmp_path / f"{name}.png") is not None
            fmt.read_panoptic_png(tmp_path / f"{name}.png")
        for name in ("gray", "p", "p2"):  # left to PIL (which refuses gray)
            assert fmt._decode_libpng(tmp_path / f"{name}.png") is None
        import zlib

        data = bytearray((tmp_path / "rgb.png").read_bytes())  # the same header marked interlaced
        data[28] = 1
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
        (tmp_path / "interlaced.png").write_bytes(bytes(data))
        monkeypatch.setattr(fmt, "_libpng_decode", lambda data: pytest.fail("an interlaced file reached libpng"))
        assert fmt._decode_libpng(tmp_path / "interlaced.png") is None


def test_default_threads_equal_the_loop_reference(random_files, monkeypatch):
    """workers=None evaluates in threads (no process pool), gives exactly the numbers of one
    process, and those of the loop reference to 1e-12."""
    gt_json, pred_json, ref, ref_stats = random_files
    made = []
    real = panoptic.ThreadPoolExecutor
    monkeypatch.setattr(panoptic, "ThreadPoolExecutor", lambda n, **k: made.append(n) or real(n, **k))
    monkeypatch.setattr(panoptic, "_default_workers", lambda: 3)
    monkeypatch.setattr(panoptic.multiprocessing, "get_context", lambda *a: pytest.fail("a process pool"))
    got = pq_compute(gt_json, pred_json)
    assert made == [3]  # 12 images: 3 threads
    assert got == pq_compute(gt_json, pred_json, workers=1)
    assert_results_close(got, ref, ref_stats, tol=1e-12)
    made.clear()
    monkeypatch.setattr(panoptic, "_THREAD_CHUNK", 1)
    assert pq_compute(gt_json, pred_json) == got and made == [3]


def test_thread_errors_name_the_file_and_stop_the_rest(tmp_path, monkeypatch):
    gt, gs, pred, ps = lecture_example()
    n = 150
    gt_json = write_dataset(tmp_path, "gt", [(i, gt, gs) for i in range(n)], LECTURE_CATS)
    pred_json = write_dataset(tmp_path, "pred", [(i, pred, ps) for i in range(n)], None)
    _edit(pred_json, lambda d: d["annotations"][1]["segments_info"].pop())
    monkeypatch.setattr(panoptic, "_default_workers", lambda: 2)
    monkeypatch.setattr(panoptic, "_THREAD_CHUNK", 1)
    evaluated = []
    real = panoptic._evaluate_chunk
    monkeypatch.setattr(panoptic, "_evaluate_chunk", lambda args: evaluated.append(1) or real(args))
    with pytest.raises(DataError, match=r"pred/000000000001.png \(.*pred.json\): image 1: segment ids 9 are in "
                                        r"the PNG but not in segments_info"):
        pq_compute(gt_json, pred_json)
    assert len(evaluated) < n  # the images queued after the error are not evaluated


def test_default_threads_follow_the_idle_cpus(monkeypatch):
    """One thread per CPU that other work leaves idle: all of them on an idle machine, one
    when the load average fills every core."""
    monkeypatch.setattr(panoptic.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(panoptic.os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert panoptic._default_workers() == 4
    monkeypatch.setattr(panoptic.os, "getloadavg", lambda: (2.2, 2.0, 1.0))
    assert panoptic._default_workers() == 3  # 1.2 of other work: 2.8 CPUs free, rounded
    monkeypatch.setattr(panoptic.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(panoptic.os, "getloadavg", lambda: (1.04, 1.0, 0.9))  # only this process running
    assert panoptic._default_workers() == 2  # (truncating 1.96 gave 1 thread on an idle 2-core machine)
    monkeypatch.setattr(panoptic.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(panoptic.os, "getloadavg", lambda: (9.5, 9.0, 8.0))
    assert panoptic._default_workers() == 1
    monkeypatch.setattr(panoptic.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(panoptic.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert panoptic._default_workers() == 8
