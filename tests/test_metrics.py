"""ConfusionMatrix (FCN §5 metrics) and box IoU, against numbers worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pixelwise.metrics import ConfusionMatrix, box_iou

I = 255  # ignore
TARGET = [
    [0, 0, 1, 1],
    [0, 0, 1, 1],
    [2, 2, 2, 2],
    [2, 2, I, I],
]
PRED = [
    [0, 1, 1, 1],
    [0, 0, 1, 2],
    [2, 2, 2, 0],
    [2, 1, 0, 1],  # the last two pixels are ignored
]
# Counted by hand, rows = ground truth: class 0 -> 3 right, 1 as class 1;
# class 1 -> 3 right, 1 as class 2; class 2 -> 4 right, 1 as 0, 1 as 1. 14 pixels.
CONFUSION = [[3, 1, 0], [0, 3, 1], [1, 1, 4]]
# t = (4, 4, 6), predicted = (4, 5, 5), diag = (3, 3, 4)
IOU = [3 / (4 + 4 - 3), 3 / (4 + 5 - 3), 4 / (6 + 5 - 4)]  # 3/5, 1/2, 4/7
DICE = [2 * 3 / (4 + 4), 2 * 3 / (4 + 5), 2 * 4 / (6 + 5)]  # 3/4, 2/3, 8/11
ACC = [3 / 4, 3 / 4, 4 / 6]


def _cm(pred, target, num_classes=3, **kw) -> ConfusionMatrix:
    cm = ConfusionMatrix(num_classes, **kw)
    cm.update(pred, target)
    return cm


def test_hand_computed_three_class_matrix():
    r = _cm(torch.tensor(PRED), torch.tensor(TARGET)).compute()
    assert r["confusion"] == CONFUSION
    assert r["num_pixels"] == 14
    assert r["pixel_accuracy"] == pytest.approx(10 / 14)
    assert r["mean_accuracy"] == pytest.approx(13 / 18)  # (3/4 + 3/4 + 2/3) / 3
    assert r["miou"] == pytest.approx(39 / 70)  # (3/5 + 1/2 + 4/7) / 3
    assert r["fwiou"] == pytest.approx(137 / 245)  # (4*3/5 + 4*1/2 + 6*4/7) / 14
    assert r["iou"] == pytest.approx(IOU)
    assert r["dice"] == pytest.approx(DICE)
    assert r["accuracy"] == pytest.approx(ACC)
    assert r["mean_dice"] == pytest.approx(sum(DICE) / 3)


def test_numpy_and_torch_inputs_agree():
    a = _cm(np.array(PRED, dtype=np.uint8), np.array(TARGET, dtype=np.uint8)).matrix
    b = _cm(torch.tensor(PRED), torch.tensor(TARGET)).matrix
    ro = np.array(TARGET)
    ro.flags.writeable = False  # e.g. an array straight from PIL
    c = _cm(np.array(PRED), ro).matrix
    assert a.dtype == torch.int64 and a.device.type == "cpu"
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.tolist() == CONFUSION


def test_any_shape_and_logits():
    pred, target = torch.tensor(PRED), torch.tensor(TARGET)
    flat = _cm(pred.flatten(), target.flatten()).matrix
    assert flat.tolist() == CONFUSION
    logits = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1)[None].float() * 5.0  # (1, 3, 4, 4)
    assert _cm(logits, target[None]).matrix.tolist() == CONFUSION
    rand = torch.randn(2, 3, 5, 6)
    tgt = torch.randint(0, 3, (2, 5, 6))
    assert torch.equal(_cm(rand, tgt).matrix, _cm(rand.argmax(1), tgt).matrix)
    with pytest.raises(ValueError, match="channels"):
        _cm(torch.randn(1, 4, 4, 4), target[None])
    with pytest.raises(ValueError, match="shape"):
        _cm(pred[:3], target)


def test_ignore_index_handling():
    target = torch.tensor(TARGET)
    pred = torch.tensor(PRED)
    pred[3, 2:] = 99  # predictions at ignored pixels do not matter
    assert _cm(pred, target).matrix.tolist() == CONFUSION
    # a different ignore value; 255 is then an error
    t2 = torch.where(target == I, torch.tensor(-1), target)
    assert _cm(torch.tensor(PRED), t2, ignore_index=-1).matrix.tolist() == CONFUSION
    with pytest.raises(ValueError, match="255"):
        _cm(torch.tensor(PRED), target, ignore_index=None)
    # everything ignored: nothing counted, scalars NaN
    r = _cm(pred, torch.full_like(target, I)).compute()
    assert r["num_pixels"] == 0 and math.isnan(r["miou"]) and math.isnan(r["pixel_accuracy"])


def test_absent_class_policy():
    # 4 classes: class 2 occurs only in the prediction, class 3 nowhere.
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    r = _cm(pred, target, num_classes=4).compute()
    assert r["iou"][:3] == pytest.approx([1 / 2, 1.0, 0.0])
    assert math.isnan(r["iou"][3]) and math.isnan(r["dice"][3])
    assert math.isnan(r["accuracy"][2]) and math.isnan(r["accuracy"][3])  # t_i = 0
    assert r["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)  # class 2 counts, class 3 does not
    assert r["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # classes with t_i > 0
    assert r["fwiou"] == pytest.approx((2 * 1 / 2 + 2 * 1) / 4)


def test_out_of_range_labels_raise():
    with pytest.raises(ValueError, match=r"target.*\b7\b"):
        _cm(torch.tensor([0, 1]), torch.tensor([7, 1]))
    with pytest.raises(ValueError, match=r"target.*-3"):
        _cm(torch.tensor([0, 1]), torch.tensor([-3, 1]))
    with pytest.raises(ValueError, match=r"pred.*\b5\b"):
        _cm(torch.tensor([5, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-integer"):
        _cm(torch.tensor([0.5, 1.0]), torch.tensor([0, 1]))


def test_merge_equals_single_update_and_state_dict():
    g = torch.Generator().manual_seed(0)
    p1, t1 = torch.randint(0, 4, (2, 7, 9), generator=g), torch.randint(0, 4, (2, 7, 9), generator=g)
    p2, t2 = torch.randint(0, 4, (3, 5, 4), generator=g), torch.randint(0, 4, (3, 5, 4), generator=g)
    t1[0, :2] = I
    whole = _cm(torch.cat([p1.flatten(), p2.flatten()]), torch.cat([t1.flatten(), t2.flatten()]), num_classes=4)
    a, b = _cm(p1, t1, num_classes=4), _cm(p2, t2, num_classes=4)
    a += b
    assert torch.equal(a.matrix, whole.matrix)
    assert a.compute() == whole.compute()
    c = ConfusionMatrix(4)
    c.load_state_dict({k: (v * 1 if k == "matrix" else v) for k, v in a.state_dict().items()})
    assert torch.equal(c.matrix, whole.matrix)
    # summing state_dict matrices (what an all-reduce does) is the whole story
    s = _cm(p1, t1, num_classes=4).state_dict()["matrix"] + _cm(p2, t2, num_classes=4).state_dict()["matrix"]
    d = ConfusionMatrix(4)
    d.load_state_dict({"matrix": s})
    assert torch.equal(d.matrix, whole.matrix)
    d.reset()
    assert int(d.matrix.sum()) == 0
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(3))


def _naive(pred: np.ndarray, target: np.ndarray, C: int, ignore: int):
    n = [[0] * C for _ in range(C)]
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if t != ignore:
            n[t][p] += 1
    iou, acc = [], []
    for i in range(C):
        ti = sum(n[i])
        pi = sum(n[j][i] for j in range(C))
        u = ti + pi - n[i][i]
        iou.append(n[i][i] / u if u else None)
        acc.append(n[i][i] / ti if ti else None)
    total = sum(map(sum, n))
    ious = [x for x in iou if x is not None]
    accs = [x for x in acc if x is not None]
    fw = sum(sum(n[i]) * iou[i] for i in range(C) if iou[i] is not None) / total
    return n, sum(n[i][i] for i in range(C)) / total, sum(accs) / len(accs), sum(ious) / len(ious), fw


def test_random_against_naive_double_loop():
    rng = np.random.default_rng(1)
    C = 5
    target = rng.integers(0, C, size=(3, 11, 13))
    target[rng.random(target.shape) < 0.1] = I
    target[target == 4] = 3  # class 4 absent from the ground truth ...
    pred = rng.integers(0, C - 1, size=target.shape)  # ... and from the prediction
    n, pa, ma, miou, fw = _naive(pred, target, C, I)
    r = _cm(pred, target, num_classes=C).compute()
    assert r["confusion"] == n
    assert r["pixel_accuracy"] == pytest.approx(pa, rel=1e-12)
    assert r["mean_accuracy"] == pytest.approx(ma, rel=1e-12)
    assert r["miou"] == pytest.approx(miou, rel=1e-12)
    assert r["fwiou"] == pytest.approx(fw, rel=1e-12)
    assert math.isnan(r["iou"][4])


def test_box_iou_lecture_exercise():
    # a 2x2 box and a 2x3 box overlapping in 1x1: 1 / (4 + 6 - 1)
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 4]).item() == 1 / 9
    assert box_iou(np.array([[0, 0, 2, 2]]), torch.tensor([[1.0, 1.0, 3.0, 4.0]])).item() == pytest.approx(1 / 9)
    m = box_iou(torch.tensor([[0.0, 0, 2, 2], [10, 10, 11, 11]]), [[0, 0, 2, 2], [1, 1, 3, 4], [50, 50, 60, 60]])
    assert m.shape == (2, 3)
    assert m[0].tolist() == pytest.approx([1.0, 1 / 9, 0.0])
    with pytest.raises(ValueError, match="xyxy"):
        box_iou([2, 2, 0, 0], [0, 0, 1, 1])
